"""Running a planned sweep on Ray Tune: reuse what is trained, start the evaluation pool, fit
the trials, then close the sweep's MLflow run and write its report.

    results = run_sweep(sweep, trials)     # {trial name: final metrics, "status", "reason"}

The trials themselves are ditsweep/train/trainable.py; this module only runs in the driver.
"""

import os
import sys
from pathlib import Path

from ditsweep.config import Sweep, TrialConfig
from ditsweep.sweep.estimate import fuse_size
from ditsweep.sweep.failure_summary import trial_status
from ditsweep.sweep.groups import MEMBERS, fuse_groups, fusion_summary, group_name, tune_entry


def storage_path(sweep: Sweep) -> str:
    path = sweep.storage_path or os.environ.get("DITSWEEP_STORAGE") or "ray_results"
    return path if "://" in path else str(Path(path).resolve())


def run_sweep(sweep: Sweep, trials: list[TrialConfig], resume: bool = False,
              no_reuse: bool = False, verbose: bool = False) -> dict[str, dict]:
    """Run every trial through Ray Tune; returns {trial name: final metrics and status}.

    Before Tune starts, trials already trained (by identity, in any experiment) are linked
    instead of trained, unless `no_reuse` (ditsweep/sweep/reuse_plan.py). An unfinished earlier run of
    this sweep is continued: its parent run is reopened and its trials continue from the
    checkpoints stored under their identities, so `resume` changes nothing (kept for old scripts)."""
    import ray
    from ray import tune

    from ditsweep.sweep.reuse_plan import (
        finish_reused,
        link_duplicates,
        link_reused,
        open_sweep_run,
        plan_trials,
        run_result,
    )
    from ditsweep.train.group_trainable import train_group
    from ditsweep.train.trainable import train_trial

    first = trials[0]
    storage = storage_path(sweep)
    sweep_params = {"name": sweep.name, "trials": len(trials), "models": ",".join(sweep.grid.model),
                    "n_train": ",".join(map(str, sweep.grid.n_train)),
                    "datasets": ",".join(sweep.grid.dataset), "train.steps": sweep.train.steps}
    parent_run_id, continued = open_sweep_run(first, sweep.name, sweep_params, trials)
    plans = plan_trials(sweep, trials, parent_run_id if continued else None, no_reuse)
    results = {p.cfg.trial: run_result(p.original, p.note) for p in plans if p.action == "done"}
    to_train = [p.cfg for p in sorted(plans, key=lambda p: p.action == "wait")  # twins go last
                if p.action in ("train", "wait")]
    reused = [p for p in plans if p.action == "reuse"]
    if reused or results:
        print(f"{len(reused)} trials reused from earlier runs, {len(results)} already finished in "
              f"this sweep; {len(to_train)} to train", file=sys.stderr)
    if not to_train and not any(p.recompute for p in reused):  # nothing needs Ray
        results.update(finish_reused(link_reused(sweep, plans, parent_run_id, None)))
        results.update(link_duplicates(plans, parent_run_id))
        return _end_sweep(first, parent_run_id, results)
    if not ray.is_initialized():
        # Under `ray job submit` RAY_ADDRESS names the cluster; otherwise Ray starts locally.
        # Tune copies AWS_* variables into each trial's runtime env, which Ray logs in full:
        # hand them to boto3 through a private credentials file instead.
        from ditsweep.data.credentials import move_env_credentials_to_file
        move_env_credentials_to_file()
        # "local": never join a cluster some other process left running on this machine.
        address = os.environ.get("RAY_ADDRESS") or "local"
        # The trials' and actors' own output stays in Ray's session logs unless --verbose: the
        # console shows the progress view (ditsweep/sweep/progress.py), results go to MLflow.
        ray.init(address=address, include_dashboard=None if address != "local" else False,
                 log_to_driver=verbose, logging_level="INFO" if verbose else "ERROR")

    # One path for new and continued sweeps: a trial finds its checkpoints by its identity.
    to_train = [t.model_copy(update={"parent_run_id": parent_run_id, "storage": storage}) for t in to_train]
    groups = fuse_groups(to_train, fuse_size(sweep, to_train))  # ditsweep/sweep/groups.py; [[t]...] unfused
    if fusion_summary(groups):
        print(fusion_summary(groups), file=sys.stderr)
    configs = [tune_entry(g) for g in groups]
    # a sweep with fused groups runs them (and its single trials) through train_group
    trainable = tune.with_resources(train_group if len(groups) < len(to_train) else train_trial,
                                    {"cpu": sweep.resources.cpus_per_trial,
                                     "gpu": sweep.resources.gpus_per_trial})
    from ditsweep.sweep.progress import SweepProgress
    progress = SweepProgress({t.trial: t.train.steps for t in to_train})
    tuner = _tuner(sweep, storage, trainable, configs, progress, verbose) if configs else None
    from ditsweep.eval.actors import start_pool, stop_pool
    # before Tune places trials, so Ray holds the evaluators' resources
    pool = start_pool(sweep, trials=len(to_train) + sum(1 for p in reused if p.recompute))
    progress.pool = pool  # the view shows each trial's evaluation jobs
    try:
        pending = link_reused(sweep, plans, parent_run_id, pool)  # evaluation-only jobs start now
        grid = tuner.fit() if to_train else []
        results.update(finish_reused(pending))
    finally:
        stop_pool(pool)
    steps = {t.trial: t.train.steps for t in to_train}
    for result in grid:
        name = result.path.rstrip("/").rsplit("/", 1)[-1]  # trial dirs are named after trials
        for member, metrics in _members(name, result.metrics or {}, groups).items():
            status, reason = trial_status(metrics, result.error, steps[member])  # ditsweep/sweep/failure_summary.py
            results[member] = {**metrics, "status": status, "reason": reason}
    results.update(link_duplicates(plans, parent_run_id))
    return _end_sweep(first, parent_run_id, results)


def _members(name: str, metrics: dict, groups: list[list[TrialConfig]]) -> dict[str, dict]:
    """{trial: its final metrics} of one Tune trial: itself, or each member of a fused group (a
    member with no final entry stopped with the group, whose error then is its status)."""
    if MEMBERS not in metrics:
        return {name: metrics}
    members = next(g for g in groups if group_name(g) == name)
    return {m.trial: metrics[MEMBERS].get(m.trial, {"step": metrics.get("step")}) for m in members}


def _tuner(sweep: Sweep, storage: str, trainable, configs: list[dict], progress, verbose: bool):
    from ray import tune

    from ditsweep.train.trainable import TRIAL_KEY
    return tune.Tuner(
        trainable,
        param_space={TRIAL_KEY: tune.grid_search(configs)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=sweep.resources.max_concurrent_trials or None,
            trial_name_creator=lambda trial: trial.config[TRIAL_KEY]["trial"],
            trial_dirname_creator=lambda trial: trial.config[TRIAL_KEY]["trial"]),
        run_config=tune.RunConfig(name=sweep.name, storage_path=storage, verbose=2 if verbose else 0,
                                  callbacks=[progress],
                                  failure_config=tune.FailureConfig(
                                      max_failures=sweep.resources.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=sweep.train.checkpoints_to_keep)))


def _end_sweep(first: TrialConfig, parent_run_id: str, results: dict[str, dict]) -> dict[str, dict]:
    from ditsweep.tracking import end_run
    if parent_run_id:
        end_run(first.tracking_uri, parent_run_id,
                "FINISHED" if all(r["status"] == "done" for r in results.values()) else "FAILED")
        write_sweep_report(first, parent_run_id)
    return results


def write_sweep_report(first: TrialConfig, parent_run_id: str) -> None:
    """The paper's tables for this sweep, in ./reports/EXPERIMENT and on the parent run."""
    from ditsweep.report import write_report
    try:
        write_report(first.experiment, first.tracking_uri, str(Path("reports") / first.experiment),
                     parent_run_id=parent_run_id)
    except Exception as e:  # a report problem must not fail a sweep whose trials finished
        print(f"warning: the report could not be written: {type(e).__name__}: {e}", file=sys.stderr)
