"""Before Tune starts: which trials train, which reuse a finished run, which are done already.

    plans = plan_trials(sweep, trials, parent_run_id, no_reuse)     # MLflow lookups by identity
    print(dry_run_lines(sweep, plans))                               # --dry-run
    pending = link_reused(sweep, plans, parent_run_id, pool)        # child runs linking originals
    ... tuner.fit() on [p.cfg for p in plans if p.action in ("train", "wait")] ...
    results = finish_reused(pending)                                 # after their evaluations
    results |= link_duplicates(plans, parent_run_id)                 # after Tune

Actions:
- done:  this sweep's parent run (an interrupted attempt being continued) already has a
         FINISHED run of this identity; nothing to do.
- reuse: a FINISHED run of this identity exists (any experiment): a link child run is made
         (tracking/reuse.py); evaluations the YAML asks for that the original lacks, or computed
         with other settings, run on the original's final checkpoint in the evaluation pool.
- wait:  another sweep is training this identity now: the trial goes to Tune last and waits
         there for its twin, then links to it (train/continuity.py).
- duplicate: the identity appears earlier in this sweep (e.g. builtin:photos and
         builtin:photos?seed=0): linked to that trial's run once Tune is done.
- train: everything else, and everything with --no-reuse.
"""

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditsweep.config import Sweep, TrialConfig
from ditsweep.config.identity import CODE_VERSION, recipe_key, trial_identity
from ditsweep.sweep.estimate import trial_gpu_hours

log = logging.getLogger(__name__)

# The MLflow metrics each evaluation writes (all of them are recomputed together), and the
# eval settings that do not change its numbers (a difference there does not trigger a rerun).
METRIC_KEYS = {"psnr_gap": ("psnr_gap_mean", "psnr_train_t", "psnr_test_t", "psnr_gap_t"),
               "fid": ("fid",), "attention": ("attn_",), "jacobian": ("jacobian_",), "samples": (),
               "attention_pca": ("attention_pca_",)}
NEUTRAL_SETTINGS = ("enabled", "every", "batch_size", "feature_extractor_weights_path")


@dataclass
class Planned:
    cfg: TrialConfig
    recipe: str
    action: str = "train"
    original: Any = None                                 # the mlflow Run reused or already done
    recompute: list[str] = field(default_factory=list)   # evaluations to run on its checkpoint
    note: str = ""


def plan_trials(sweep: Sweep, trials: list[TrialConfig], parent_run_id: str | None = None,
                no_reuse: bool = False, dry_run: bool = False) -> list[Planned]:
    """Identity per trial (set on each cfg) and what to do with it. A dry run opens no dataset
    (identities of S3 datasets stay unknown: those trials are matched by `ditsweep.recipe`) and
    creates no tracking store."""
    plans = [Planned(t.model_copy(update={"identity": _identity(t, dry_run), "reuse": not no_reuse}),
                     recipe_key(t)) for t in trials]
    client = _client(trials[0].tracking_uri, dry_run)
    seen: set[str] = set()
    for p in plans:
        key = p.cfg.identity or p.recipe
        if key in seen:
            p.action, p.note = "duplicate", "same identity as an earlier trial of this sweep: linked to it"
            continue
        seen.add(key)
        if client is None:
            continue
        try:
            _decide(client, p, parent_run_id, no_reuse, dry_run)
        except Exception as e:  # a dry run still prints its plan when MLflow does not answer
            if not dry_run:
                raise
            print(f"warning: no reuse lookup (tracking server: {type(e).__name__})", file=sys.stderr)
            client = None
    return plans


def _identity(cfg: TrialConfig, dry_run: bool) -> str | None:
    if dry_run and not (cfg.dataset.startswith("builtin:") or "://" not in cfg.dataset):
        return None  # --dry-run needs no S3 credentials: the manifest is not read
    try:
        return trial_identity(cfg)
    except Exception as e:
        if not dry_run:
            raise
        log.warning("identity of %s unknown: %s", cfg.trial, e)
        return None


def _client(tracking_uri: str, dry_run: bool):
    from mlflow.tracking import MlflowClient
    if dry_run and tracking_uri.startswith("sqlite:///") and \
            not Path(tracking_uri[len("sqlite:///"):]).exists():
        return None  # no store yet, so nothing to reuse; and a dry run must not create one
    client = MlflowClient(tracking_uri)
    if dry_run:  # one quick question: a dry run must not wait minutes for a server that is away
        os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
        try:
            client.search_experiments(max_results=1)
        except Exception as e:
            print(f"warning: no reuse lookup: the tracking server does not answer "
                  f"({type(e).__name__})", file=sys.stderr)
            return None
    return client


def _decide(client, p: Planned, parent_run_id: str | None, no_reuse: bool, dry_run: bool) -> None:
    from ditsweep.tracking.mlflow_runs import IDENTITY_TAG
    from ditsweep.tracking.reuse import RECIPE_TAG, find_active, find_original
    tag, value = (IDENTITY_TAG, p.cfg.identity) if p.cfg.identity else (RECIPE_TAG, p.recipe)
    if parent_run_id:
        done = _finished_under(client, parent_run_id, tag, value, p.cfg.experiment)
        if done is not None:
            p.action, p.original, p.note = "done", done, f"finished in this sweep (run {done.info.run_id})"
            return
    if no_reuse:
        return
    original = find_original(client, value, tag)
    if original is not None:
        p.action, p.original = "reuse", original
        p.recompute = missing_evaluations(client, p.cfg, original)
        p.note = (f"reuse run {original.info.run_id} (experiment {original.info.experiment_id})"
                  + (f", then evaluate {', '.join(p.recompute)}" if p.recompute else ""))
        return
    if p.cfg.identity:
        active = find_active(client, p.cfg.identity, exclude_parent=parent_run_id)
        if active:
            run = active[0]
            p.action = "wait"
            p.note = (f"being trained by run {run.info.run_id} (sweep "
                      f"{run.data.tags.get('ditsweep.sweep')}): waits for it, then links")


def _finished_under(client, parent_run_id: str, tag: str, value: str, experiment: str):
    from ditsweep.tracking.mlflow_runs import experiment_id, retrying
    exp_id = experiment_id(client, experiment)
    query = (f"tags.`{tag}` = '{value}' and tags.`ditsweep.sweep_run_id` = '{parent_run_id}' "
             "and attributes.status = 'FINISHED'")
    runs = retrying(lambda: client.search_runs([exp_id], query, max_results=1), "search")
    return runs[0] if runs else None


def missing_evaluations(client, cfg: TrialConfig, original) -> list[str]:
    """Evaluations this trial asks for at its end (the rule the evaluators follow) that the
    original lacks, or computed with other settings."""
    from ditsweep.eval.jobs import metrics_due
    from ditsweep.train.trainable import trial_params
    wanted = {k: str(v) for k, v in trial_params(cfg).items() if k.startswith("eval.")}
    have, metrics = original.data.params, original.data.metrics
    out = []
    for name in metrics_due(cfg.eval, cfg.train.steps, final=True, n_train=cfg.n_train):
        if name == "attention" and cfg.arch != "dit":
            continue  # the pool skips UNets: nothing to recompute
        if name == "samples":
            present = bool(client.list_artifacts(original.info.run_id, "samples"))
        elif name == "jacobian":
            present = all(f"jacobian_top_eigenvalue_t{t}" in metrics for t in cfg.eval.jacobian.timesteps)
        else:
            present = any(_owned_by(k, [name]) and not k.startswith("eval_seconds_") for k in metrics)
        changed = [k for k, v in wanted.items()
                   if (k.startswith(f"eval.{name}.") and k.rsplit(".", 1)[1] not in NEUTRAL_SETTINGS
                       or k == "eval.use_ema") and have.get(k, v) != v]
        if not present or changed:
            out.append(name)
    return out


def _owned_by(key: str, evaluations: list[str]) -> bool:
    """Whether a metric key is written by one of these evaluations (a name not in METRIC_KEYS,
    e.g. attention_pca, owns the keys that start with its name)."""
    for name in evaluations:
        for k in METRIC_KEYS.get(name, (f"{name}_",)):
            if key == k or (k.endswith("_") and key.startswith(k)):
                return True
        if key == f"eval_seconds_{name}":
            return True
    return False


def dry_run_lines(sweep: Sweep, plans: list[Planned]) -> str:
    """The identity and action of each trial, then the reuse summary."""
    lines = [f"identities (tag ditsweep.identity; code version {CODE_VERSION}):"]
    width = max(len(p.cfg.trial) for p in plans)
    for p in plans:
        ident = p.cfg.identity or f"recipe {p.recipe} (dataset not opened)"
        lines.append(f"  {p.cfg.trial.ljust(width)}  {ident}  {p.action}"
                     + (f": {p.note}" if p.note else ""))
    reused = [p for p in plans if p.action in ("reuse", "done", "wait", "duplicate")]
    hours = [trial_gpu_hours(sweep, p.cfg) for p in reused]
    kind = "GPU" if sweep.resources.gpus_per_trial else "CPU"
    saved = (f"{sum(hours):,.1f} {kind}-hours saved" if reused and all(h is not None for h in hours)
             else f"0.0 {kind}-hours saved" if not reused
             else "hours saved unknown (no calibration file for resources.gpu, "
                  "and no resources.steps_per_second)")
    lines.append(f"{len(reused)} trials reused, {saved}; {len(plans) - len(reused)} to train")
    return "\n".join(lines)


@dataclass
class Pending:
    plan: Planned
    run_id: str
    job: Any = None  # ObjectRef of the evaluation-only job, if any


def link_reused(sweep: Sweep, plans: list[Planned], parent_run_id: str, pool) -> list[Pending]:
    """A link child run for each reused trial; evaluation-only jobs for what the original lacks."""
    from mlflow.tracking import MlflowClient

    from ditsweep.tracking.reuse import copy_artifacts, copy_metrics, create_link, finish_link
    from ditsweep.train.trainable import trial_params
    pending = []
    for p in (p for p in plans if p.action == "reuse"):
        cfg = p.cfg.model_copy(update={"parent_run_id": parent_run_id})
        client = MlflowClient(cfg.tracking_uri)
        ours = trial_params(cfg)
        params = {k: v for k, v in ours.items()
                  if any(k.startswith(f"eval.{name}.") for name in p.recompute)}
        run_id = create_link(client, cfg.experiment, parent_run_id, cfg.trial, cfg.sweep, p.original,
                             params)
        source = p.original.info.run_id
        keys = [k for k in p.original.data.metrics if not _owned_by(k, p.recompute)]
        copy_metrics(client, source, run_id, keys)
        copy_artifacts(client, source, run_id, skip=p.recompute)
        job = _evaluate_saved(client, cfg, run_id, p, pool) if p.recompute else None
        if job is None:
            finish_link(client, run_id)
        pending.append(Pending(p, run_id, job))
    return pending


def _evaluate_saved(client, cfg: TrialConfig, run_id: str, p: Planned, pool):
    """Start the evaluation-only job on the original's final checkpoint; None (and the reason in
    the run and on stderr) when that checkpoint is gone: the link keeps the original's metrics
    and lacks the new ones, and `--no-reuse` trains the trial again."""
    import torch

    from ditsweep.eval.actors import FAILURE_TAG, evaluate_saved
    from ditsweep.tracking.reuse import CHECKPOINT_TAG
    from ditsweep.train.checkpoints import TrialCheckpoints
    location = p.original.data.tags.get(CHECKPOINT_TAG)
    try:
        if not location:
            raise FileNotFoundError("the original run records no final checkpoint "
                                    f"(tag {CHECKPOINT_TAG})")
        store = TrialCheckpoints.at(location)
        with tempfile.TemporaryDirectory() as d:
            pointer = store.fetch(Path(d))
            if pointer is None or not pointer.get("final"):
                raise FileNotFoundError(f"{location}: no final checkpoint there")
            state = torch.load(Path(d) / "checkpoint.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        message = (f"cannot evaluate {', '.join(p.recompute)} for reused trial {cfg.trial}: the final "
                   f"checkpoint of run {p.original.info.run_id} is gone ({e}); its other metrics are "
                   "linked; run with --no-reuse to train it again")
        print(f"warning: {message}", file=sys.stderr)
        from ditsweep.tracking.run_logger import log_batch
        log_batch(client, run_id, tags={FAILURE_TAG: message[:5000]})
        return None
    weights = state["ema"] if cfg.eval.use_ema else state["model"]
    return evaluate_saved(pool, cfg, run_id, weights, int(state["step"]), p.recompute)


def finish_reused(pending: list[Pending]) -> dict[str, dict]:
    """Wait for the evaluation-only jobs, end the link runs; {trial: final metrics, status}."""
    import ray
    from mlflow.tracking import MlflowClient

    from ditsweep.tracking.reuse import finish_link
    results = {}
    for item in pending:
        cfg = item.plan.cfg
        client = MlflowClient(cfg.tracking_uri)
        if item.job is not None:
            try:
                result = ray.get(item.job)
                if result.failures:
                    print(f"warning: evaluation of reused trial {cfg.trial}: {result.failures}",
                          file=sys.stderr)
            except Exception as e:
                print(f"warning: evaluation of reused trial {cfg.trial} failed: {e}", file=sys.stderr)
            finish_link(client, item.run_id)
        results[cfg.trial] = run_result(client.get_run(item.run_id), item.plan.note)
    return results


def link_duplicates(plans: list[Planned], parent_run_id: str) -> dict[str, dict]:
    """Link each duplicate to the run that trained its identity in this sweep (after Tune)."""
    from mlflow.tracking import MlflowClient

    from ditsweep.tracking.mlflow_runs import IDENTITY_TAG
    from ditsweep.tracking.reuse import link_to
    results = {}
    for p in (p for p in plans if p.action == "duplicate"):
        client = MlflowClient(p.cfg.tracking_uri)
        done = _finished_under(client, parent_run_id, IDENTITY_TAG, p.cfg.identity, p.cfg.experiment)
        if done is None:
            results[p.cfg.trial] = {"status": "ERROR: its twin in this sweep did not finish",
                                    "reason": "the trial with the same identity did not finish"}
            continue
        run_id = link_to(client, p.cfg.experiment, parent_run_id, p.cfg.trial, p.cfg.sweep, done)
        results[p.cfg.trial] = run_result(client.get_run(run_id), p.note)
    return results


def run_result(run, note: str = "") -> dict:
    """A finished run's final values, in the shape run_sweep's results have."""
    m = run.data.metrics
    return {"loss": m.get("loss"), "psnr_gap_mean": m.get("psnr_gap_mean"), "fid": m.get("fid"),
            "status": "done", "reason": "", "reused": note}


def open_sweep_run(first: TrialConfig, sweep_name: str, params: dict, trials: list[TrialConfig]
                   ) -> tuple[str, bool]:
    """The sweep's parent run: the newest one of this sweep in the experiment when it did not
    finish (an interrupted driver, a RayJob retry, a failed trial), reopened; else a new one.
    Returns (run id, continued). The planned trials (trials.json) are written either way."""
    from mlflow.tracking import MlflowClient

    from ditsweep.tracking import log_planned_trials, start_sweep_run
    from ditsweep.tracking.mlflow_runs import ROLE_TAG, SWEEP_TAG, experiment_id, retrying
    client = MlflowClient(first.tracking_uri)
    exp_id = experiment_id(client, first.experiment)
    query = f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'sweep'"
    newest = retrying(lambda: client.search_runs([exp_id], query, max_results=1,
                                                 order_by=["attributes.start_time DESC"]), "search")
    continued = bool(newest) and newest[0].info.status != "FINISHED"
    if continued:
        run_id = start_sweep_run(first.tracking_uri, first.experiment, sweep_name, {},
                                 run_id=newest[0].info.run_id)
        print(f"continuing sweep run {run_id} ({newest[0].info.status}): finished trials are kept, "
              "interrupted ones continue from their checkpoints", file=sys.stderr)
    else:
        run_id = start_sweep_run(first.tracking_uri, first.experiment, sweep_name, params)
    log_planned_trials(first.tracking_uri, run_id, trials)
    return run_id, continued
