"""Run a sweep: `python -m ditsweep.run SWEEP.yaml [--dry-run] [--check] [--resume]`.

The YAML is validated and expanded into trials before anything starts (exit code 2 on bad input).
Each trial is a Ray Tune trial on the Ray cluster this process finds (`ray job submit`,
RAY_ADDRESS) or on a local Ray started for the run. Results go to MLflow: one parent run for the
sweep, one child run per trial. On a cluster, and with --check, the pre-flight (preflight.py)
checks every node type first; any failure exits 2 before a trial starts.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

from ditsweep.estimate import plan_summary
from ditsweep.failures import summary_lines, trial_status
from ditsweep.spec import SpecError, Sweep, TrialConfig, expand, load_sweep


def trial_table(trials: list[TrialConfig], results: dict[str, dict] | None = None) -> str:
    """A plain-text table of the trials, with their results when given."""
    header = ["trial", "model", "layout", "N", "seed", "dataset"]
    if results is not None:
        header += ["final loss", "mean PSNR gap", "status"]
    rows = []
    for t in trials:
        row = [t.trial, t.model, t.layout, str(t.n_train), str(t.seed), t.dataset]
        if results is not None:
            r = results.get(t.trial, {})
            row += [_fmt(r.get("loss")), _fmt(r.get("psnr_gap_mean")), r.get("status", "not run")]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def storage_path(sweep: Sweep) -> str:
    path = sweep.storage_path or os.environ.get("DITSWEEP_STORAGE") or "ray_results"
    return path if "://" in path else str(Path(path).resolve())


def run_sweep(sweep: Sweep, trials: list[TrialConfig], resume: bool = False,
              no_reuse: bool = False, verbose: bool = False) -> dict[str, dict]:
    """Run every trial through Ray Tune; returns {trial name: final metrics and status}.

    Before Tune starts, trials already trained (by identity, in any experiment) are linked
    instead of trained, unless `no_reuse` (ditsweep/reuse_plan.py). An unfinished earlier run of
    this sweep is continued: its parent run is reopened and its trials continue from the
    checkpoints stored under their identities, so `resume` changes nothing (kept for old scripts)."""
    import ray
    from ray import tune

    from ditsweep.reuse_plan import (finish_reused, link_duplicates, link_reused, open_sweep_run,
                                     plan_trials, run_result)
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
        # console shows the progress view (ditsweep/progress.py), results go to MLflow.
        ray.init(address=address, include_dashboard=None if address != "local" else False,
                 log_to_driver=verbose, logging_level="INFO" if verbose else "ERROR")

    trainable = tune.with_resources(train_trial, {"cpu": sweep.resources.cpus_per_trial,
                                                  "gpu": sweep.resources.gpus_per_trial})
    # One path for new and continued sweeps: a trial finds its checkpoints by its identity.
    configs = [t.model_copy(update={"parent_run_id": parent_run_id, "storage": storage}).model_dump()
               for t in to_train]
    from ditsweep.progress import SweepProgress
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
    for result in grid:
        name = result.path.rstrip("/").rsplit("/", 1)[-1]  # trial dirs are named after trials
        status, reason = trial_status(result.metrics, result.error)  # ditsweep/failures.py
        results[name] = {**(result.metrics or {}), "status": status, "reason": reason}
    results.update(link_duplicates(plans, parent_run_id))
    return _end_sweep(first, parent_run_id, results)


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


def where_results_are(sweep: Sweep, first: TrialConfig) -> str:
    """The closing lines: where each kind of result went, and how to look at it."""
    from ditsweep.tracking.mlflow_runs import safe_uri
    uri = first.tracking_uri
    ui = (f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {safe_uri(uri)}")
    lines = [f"results:     MLflow {safe_uri(uri)}, experiment {first.experiment!r} (view: {ui})"]
    report = Path("reports") / first.experiment / "REPORT.md"
    if report.exists():
        lines.append(f"report:      {report} (also on the sweep's MLflow run, under report/)")
    lines.append(f"checkpoints: {storage_path(sweep).rstrip('/')}/{sweep.name}")
    return "\n".join(lines)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    cause = [line for line in text if "Error" in line or "diverged" in line]
    return (cause[-1] if cause else text[-1] if text else type(error).__name__)[:160]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditsweep.run", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep YAML file, e.g. sweeps/smoke.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and start nothing")
    parser.add_argument("--resume", action="store_true",
                        help="kept for old scripts: an interrupted sweep continues without it")
    parser.add_argument("--no-reuse", action="store_true",
                        help="train every trial, even those a finished run already trained")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray Tune's status tables and the trials' own output")
    parser.add_argument("--check", action="store_true",
                        help="pre-flight: check every node type, the data, MLflow and storage; start no trial")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, check_data=not (args.dry_run or args.check))
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trials = expand(sweep, args.sweep, check_data=not (args.dry_run or args.check))
    if args.check or (os.environ.get("RAY_ADDRESS") and not args.dry_run):
        from ditsweep.preflight import preflight  # on a cluster: briefly, before any trial
        if not preflight(sweep, trials, storage_path(sweep), brief=not args.check):
            return 2
        if args.check:
            return 0
    if args.dry_run:
        print(trial_table(trials))
        print("\n" + plan_summary(sweep, trials))
        from ditsweep.eval_plan import evaluation_plan
        print(evaluation_plan(sweep, trials))
        from ditsweep.reuse_plan import dry_run_lines, plan_trials
        print(dry_run_lines(sweep, plan_trials(sweep, trials, no_reuse=args.no_reuse, dry_run=True)))
        print("nothing started (--dry-run; datasets were not opened)")
        return 0
    if sweep.inputs:  # another sweep's trial artifacts (e.g. stage 1's PCA components)
        from ditsweep.tracking.inputs import check_inputs
        problems = check_inputs(trials[0].tracking_uri, sweep.inputs)
        for problem in problems:
            print(f"error: {args.sweep}: {problem}", file=sys.stderr)
        if problems:
            return 2
    from ditsweep.progress import quiet_libraries
    quiet_libraries(args.verbose)
    started = time.monotonic()
    results = run_sweep(sweep, trials, resume=args.resume, no_reuse=args.no_reuse, verbose=args.verbose)
    print(trial_table(trials, results))
    for line in summary_lines({n: r["reason"] for n, r in results.items() if r.get("reason")}):
        print(line)
    failed = [n for n, r in results.items() if r["status"] != "done"]
    print(f"\n{len(trials) - len(failed)}/{len(trials)} trials finished in "
          f"{time.monotonic() - started:.0f} s")
    print(where_results_are(sweep, trials[0]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
