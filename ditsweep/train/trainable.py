"""The Ray Tune trainable: one trial = train one model, evaluate it, record it in MLflow.

Checkpoints (model, EMA, optimizer, step, RNG state) are reported through Tune, so a restarted
trial resumes where it stopped. The trial's MLflow run is found again by its tag on resume, and
metric steps already in MLflow are not logged twice.
"""

import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
from ray import tune

from ditsweep.config import TrialConfig
from ditsweep.data import load_split, to_model_range
from ditsweep.data.stream import stream_train_batches
from ditsweep.eval.actors import Evaluator
from ditsweep.eval.jobs import METRICS
from ditsweep.tracking import TrialRun
from ditsweep.tracking.inputs import pca_components_for
from ditsweep.tracking.tags import trial_tags
from ditsweep.train.continuity import (
    beat,
    identity_tags,
    restore_from_storage,
    store_checkpoint,
    twin_to_link,
)
from ditsweep.train.failures import (FAILURE_TAG, KIND_TAG, NOTE_TAG, RESULT_KEY, Failure, classify,
                                      count_attempt)
from ditsweep.train.loop import Trainer

log = logging.getLogger(__name__)
FLUSH_SECONDS = 20.0  # how often buffered loss values go to MLflow between checkpoints
TRIAL_KEY = "trial_config"  # the one key of a Tune config: a TrialConfig dumped to a dict


def trial_params(cfg: TrialConfig) -> dict:
    """The resolved config as flat MLflow params (never the tracking URI: it may hold secrets)."""
    return {
        "model": cfg.model, "arch": cfg.arch, "layout": cfg.layout, "layout_name": cfg.layout_name,
        "variant": cfg.variant, "n_train": cfg.n_train, "seed": cfg.seed, "dataset": cfg.dataset,
        "resolution": cfg.data.resolution, "sweep": cfg.sweep,
        **_flat("data", cfg.data.model_dump(exclude={"resolution"})),
        **_flat("train", cfg.train.model_dump()),
        **_flat("eval", cfg.eval.model_dump()),
    }


def _flat(prefix: str, values: dict) -> dict:
    """{"a": {"b": 1}} -> {"prefix.a.b": 1}"""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out


# MLflow's HTTP client retries for minutes before giving up, blocking training meanwhile; keep
# its retries short and let TrialRun's queue carry metrics over a longer outage instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def train_trial(config: dict) -> None:
    """Tune function trainable: config = {TRIAL_KEY: TrialConfig as a dict}.

    Failure policy (ditsweep/train/failures.py). Tune has no per-exception retry policy: any exception
    that leaves this function counts against FailureConfig.max_failures and restarts the trial
    from its last checkpoint. So the trial judges its own exceptions. A transient one (lost
    connection, CUDA OOM, ...) is re-raised and Tune retries it as before. A deterministic one
    (divergence, DataError, invalid config, shape/dtype error) would fail again identically:
    the trial records it in MLflow and *returns* after a final result carrying
    `ditsweep_failure`, so Tune sees a finished trial and never restarts it; the summary reads
    that result. (A Tune callback cannot do this: on_trial_error runs after Tune has decided.)
    A killed worker or node raises nothing here; Tune restarts those trials from checkpoints.
    """
    attempt: dict = {}  # what the failure handler needs: the run, the trainer, the attempt number
    try:
        _train_trial(config, attempt)
    except Exception as e:
        failure = classify(e)
        trainer = attempt.get("trainer")
        max_failures = config[TRIAL_KEY].get("resources", {}).get("max_failures", 0)
        final = record_failure(attempt.get("run"), failure, trainer.step if trainer else 0,
                               attempt.get("number", 1), max_failures)
        if final is None:
            raise
        log.error("trial failed (%s, not retried): %s", failure.kind, failure.reason)
        tune.report(final)


def record_failure(run: TrialRun | None, failure: Failure, step: int, attempt: int,
                   max_failures: int) -> dict | None:
    """Record a trial's failure in its run as Tune will treat it. None: the caller re-raises
    (transient: Tune restarts the trial from its checkpoint, or, its retries used up, marks it
    ERROR). Otherwise the final result that ends the trial without a restart (deterministic)."""
    if failure.transient and attempt <= max_failures:
        note = f"attempt {attempt} at step {step}: {failure.reason}"
        record(run, {NOTE_TAG: (f"{failure.note}; " if failure.note else "") + note})
        return None
    record(run, {FAILURE_TAG: failure.reason, KIND_TAG: failure.kind}, status="FAILED")
    if failure.transient:
        return None
    return {"step": step, RESULT_KEY: failure.reason, "ditsweep_failure_kind": failure.kind}


def record(run: TrialRun | None, tags: dict, status: str | None = None) -> None:
    """Tags (and the end status) of a failed attempt; MLflow trouble must not hide the failure."""
    if run is None:
        return
    try:
        run.set_tags(tags)
        if status:
            run.finish(status)
    except Exception as e:
        log.error("could not record the failure in MLflow: %s: %s", type(e).__name__, e)


def open_run(cfg: TrialConfig) -> TrialRun:
    """The trial's MLflow run: found again by its tag on a resume, else created."""
    return TrialRun(cfg.tracking_uri, cfg.experiment, cfg.parent_run_id, cfg.trial, trial_params(cfg),
                    tags={"ditsweep.sweep": cfg.sweep,
                          **trial_tags(cfg.model, cfg.arch, cfg.layout, cfg.layout_name, cfg.n_train,
                                       cfg.dataset, cfg.variant), **identity_tags(cfg)})


def _train_trial(config: dict, attempt: dict) -> None:
    cfg = TrialConfig.model_validate(config[TRIAL_KEY])
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    run = open_run(cfg)  # first, so that a data or model error is recorded in it
    attempt.update(run=run, number=count_attempt(run))
    linked = twin_to_link(cfg, run, has_checkpoint=tune.get_checkpoint() is not None)
    if linked is not None:  # another sweep trained this identity: this run now links to it
        tune.report(linked)
        return
    pca = pca_components_for(cfg)  # Appendix C stage 2: stage 1's components, from MLflow
    if cfg.data.stream:
        trainer = Trainer(cfg, None, pca=pca)
    else:
        train_u8, _ = load_split(cfg.dataset, cfg.data.resolution, cfg.n_train, 0)
        trainer = Trainer(cfg, to_model_range(train_u8), pca=pca)
    attempt["trainer"] = trainer
    evaluator = evaluator_for(cfg, run)

    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.load(Path(d))
        log.info("trial %s resumed at step %d", cfg.trial, trainer.step)
        run.set_tags({"ditsweep.resumed_from_step": str(trainer.step)})
    else:  # an attempt under another driver or Ray cluster, without --resume (continuity.py)
        restore_from_storage(cfg, trainer, run)
    if cfg.data.stream:  # seeded by the step, so a resumed trial does not replay its batches
        trainer.batches = stream_train_batches(
            cfg.dataset, cfg.n_train, cfg.train.batch_size, seed=cfg.seed * 1_000_003 + trainer.step,
            shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.loader_workers,
            cache_dir=os.environ.get("DITSWEEP_DATA_CACHE"), resolution=cfg.data.resolution)
    last_flush = time.monotonic()
    # A restored attempt sends each loss at once for FLUSH_SECONDS, so that its first new step
    # shows in MLflow as soon as it is trained, not up to FLUSH_SECONDS later (README, "A
    # multi-node cluster on one machine").
    prompt_until = last_flush + FLUSH_SECONDS if trainer.step > 0 else 0.0
    metrics: dict = {}
    try:
        while trainer.step < cfg.train.steps:
            trainer.train_step()  # no host sync: the loss is read at log_every
            if trainer.tags:  # local attention kernel, fallback note, first-step time
                run.set_tags(trainer.pop_tags())
            step = trainer.step
            metrics = {"step": step}
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics["loss"] = trainer.read_loss()  # mean since the last read
                run.log_metrics({"loss": metrics["loss"]}, step)
                if time.monotonic() < prompt_until:
                    run.flush()
                if step % cfg.train.checkpoint_every and step < cfg.train.steps:
                    tune.report(metrics)  # for the progress view; checkpoints and the end report below
            if evaluator and step < cfg.train.steps:
                evaluator.submit(trainer.eval_model(), step)  # if any metric is due; returns at once
            if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                run.flush()
                _report(trainer, run, metrics)
            elif time.monotonic() - last_flush > FLUSH_SECONDS:
                run.flush()
                last_flush = time.monotonic()
                beat(cfg, run)
    except Exception:  # judged by train_trial (ditsweep/train/failures.py); keep the losses before it
        run.flush()
        raise

    metrics = {"step": trainer.step, "loss": metrics.get("loss", float("nan"))}
    submitted = evaluator.submit(trainer.eval_model(), trainer.step, final=True) if evaluator else False
    if submitted:  # the progress view shows the trial evaluating, its final job queued
        tune.report(metrics)
    metrics.update(_evaluate(evaluator, trainer, submitted))
    _save_final(cfg, trainer, run)  # under the identity, before the run says FINISHED
    run.finish("FINISHED")
    _report(trainer, run, metrics)


def evaluator_for(cfg: TrialConfig, run: TrialRun) -> Evaluator | None:
    """The trial's handle on the sweep's evaluation pool (None if no metric is enabled). The
    trial's pid and host go into the run, next to the evaluator's, to show where each ran."""
    run.set_tags({"ditsweep.trial_pid": str(os.getpid()), "ditsweep.trial_host": socket.gethostname()})
    if not any(getattr(cfg.eval, m).enabled for m in METRICS):
        return None
    return Evaluator(cfg, run.run_id)


def _evaluate(evaluator: Evaluator | None, trainer: Trainer, submitted: bool) -> dict:
    """Wait for all of this trial's jobs, the final one `submitted` (the pool logs their values
    to MLflow); returns the final values for Tune, e.g. psnr_gap_mean and fid."""
    if evaluator is None:
        return {}
    result = evaluator.wait(trainer.step, submitted)
    if result is None:
        return {}
    if result.failures:
        log.warning("final evaluation of %s: %s", trainer.cfg.trial, result.failures)
    return dict(result.scalars)


def _report(trainer: Trainer, run: TrialRun, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        trainer.save(Path(d), extra={"mlflow_run_id": run.run_id})
        store_checkpoint(trainer.cfg, run, Path(d) / "checkpoint.pt", trainer.step,
                         final=trainer.step >= trainer.cfg.train.steps)
        tune.report({**metrics, "mlflow_run_id": run.run_id},
                    checkpoint=tune.Checkpoint.from_directory(d))


def _save_final(cfg: TrialConfig, trainer: Trainer, run: TrialRun) -> None:
    with tempfile.TemporaryDirectory() as d:
        store_checkpoint(cfg, run, trainer.save(Path(d), extra={"mlflow_run_id": run.run_id}),
                         trainer.step, final=True)
