"""Run a sweep: `python -m ditsweep.run SWEEP.yaml [--dry-run] [--resume]`.

The YAML is validated and expanded into trials before anything starts (exit code 2 on bad input).
Each trial is a Ray Tune trial on the Ray cluster this process finds (`ray job submit`,
RAY_ADDRESS) or on a local Ray started for the run. Results go to MLflow: one parent run for the
sweep, one child run per trial.
"""

import argparse
import math
import os
import sys
from pathlib import Path

from ditsweep.estimate import plan_summary
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


def run_sweep(sweep: Sweep, trials: list[TrialConfig], resume: bool = False) -> dict[str, dict]:
    """Run every trial through Ray Tune; returns {trial name: final metrics and status}."""
    import ray
    from ray import tune

    from ditsweep.tracking import end_run, find_sweep_run, log_planned_trials, start_sweep_run
    from ditsweep.train.trainable import TRIAL_KEY, train_trial

    first = trials[0]
    storage = storage_path(sweep)
    experiment_dir = f"{storage.rstrip('/')}/{sweep.name}"
    sweep_params = {"name": sweep.name, "trials": len(trials), "models": ",".join(sweep.grid.model),
                    "n_train": ",".join(map(str, sweep.grid.n_train)),
                    "datasets": ",".join(sweep.grid.dataset), "train.steps": sweep.train.steps}
    if not ray.is_initialized():
        # Under `ray job submit` RAY_ADDRESS names the cluster; otherwise Ray starts locally.
        # Tune copies AWS_* variables into each trial's runtime env, which Ray logs in full:
        # hand them to boto3 through a private credentials file instead.
        from ditsweep.data.credentials import move_env_credentials_to_file
        move_env_credentials_to_file()
        # "local": never join a cluster some other process left running on this machine.
        address = os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=None if address != "local" else False)

    trainable = tune.with_resources(train_trial, {"cpu": sweep.resources.cpus_per_trial,
                                                  "gpu": sweep.resources.gpus_per_trial})
    if resume and tune.Tuner.can_restore(experiment_dir):
        # Finished trials stay finished; interrupted and errored ones continue from checkpoints.
        tuner = tune.Tuner.restore(experiment_dir, trainable, resume_errored=True)
        parent_run_id = find_sweep_run(first.tracking_uri, first.experiment, sweep.name)
        start_sweep_run(first.tracking_uri, first.experiment, sweep.name, {}, run_id=parent_run_id)
    else:
        if resume:
            print(f"nothing to resume at {experiment_dir}; starting the sweep", file=sys.stderr)
        parent_run_id = start_sweep_run(first.tracking_uri, first.experiment, sweep.name, sweep_params)
        log_planned_trials(first.tracking_uri, parent_run_id, trials)
        configs = [t.model_copy(update={"parent_run_id": parent_run_id}).model_dump() for t in trials]
        tuner = tune.Tuner(
            trainable,
            param_space={TRIAL_KEY: tune.grid_search(configs)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=sweep.resources.max_concurrent_trials or None,
                trial_name_creator=lambda trial: trial.config[TRIAL_KEY]["trial"],
                trial_dirname_creator=lambda trial: trial.config[TRIAL_KEY]["trial"]),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(
                                          max_failures=sweep.resources.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=sweep.train.checkpoints_to_keep)))
    from ditsweep.eval.actors import start_pool, stop_pool
    pool = start_pool(sweep)  # before Tune places trials, so Ray holds the evaluators' resources
    try:
        grid = tuner.fit()
    finally:
        stop_pool(pool)
    results = {}
    for result in grid:
        name = result.path.rstrip("/").rsplit("/", 1)[-1]  # trial dirs are named after trials
        status = "ERROR: " + _first_line(result.error) if result.error else "done"
        results[name] = {**(result.metrics or {}), "status": status}
    if parent_run_id:
        end_run(first.tracking_uri, parent_run_id,
                "FINISHED" if all(r["status"] == "done" for r in results.values()) else "FAILED")
        write_sweep_report(first, parent_run_id)
    return results


def write_sweep_report(first: TrialConfig, parent_run_id: str) -> None:
    """The paper's tables for this sweep, in ./reports/EXPERIMENT and on the parent run."""
    from ditsweep.report import write_report
    try:
        path = write_report(first.experiment, first.tracking_uri,
                            str(Path("reports") / first.experiment), parent_run_id=parent_run_id)
        print(f"report: {path}")
    except Exception as e:  # a report problem must not fail a sweep whose trials finished
        print(f"warning: the report could not be written: {type(e).__name__}: {e}", file=sys.stderr)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    cause = [line for line in text if "Error" in line or "diverged" in line]
    return (cause[-1] if cause else text[-1] if text else type(error).__name__)[:160]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditsweep.run", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep YAML file, e.g. sweeps/smoke.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and start nothing")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, check_data=not args.dry_run)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trials = expand(sweep, args.sweep, check_data=not args.dry_run)
    if args.dry_run:
        print(trial_table(trials))
        print("\n" + plan_summary(sweep, trials))
        print("nothing started (--dry-run; datasets were not opened)")
        return 0
    results = run_sweep(sweep, trials, resume=args.resume)
    print(trial_table(trials, results))
    failed = [n for n, r in results.items() if r["status"] != "done"]
    print(f"\n{len(trials) - len(failed)}/{len(trials)} trials finished; "
          f"MLflow: {trials[0].tracking_uri} experiment {trials[0].experiment!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
