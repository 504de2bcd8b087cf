"""Run a sweep: `python -m ditsweep.run SWEEP.yaml [--dry-run] [--check] [--resume]`.

The YAML is validated and expanded into trials before anything starts (exit code 2 on bad input).
Each trial is a Ray Tune trial on the Ray cluster this process finds (`ray job submit`,
RAY_ADDRESS) or on a local Ray started for the run (ditsweep/sweep/tune.py). Results go to
MLflow: one run for the sweep, one run per trial. On a cluster, and with --check, the pre-flight
(ditsweep/sweep/preflight.py) checks every node type first; any failure exits 2 before a trial
starts.
"""

import argparse
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

from ditsweep.config import SpecError, Sweep, TrialConfig, expand, load_sweep
from ditsweep.sweep.estimate import plan_summary
from ditsweep.sweep.failure_summary import summary_lines
from ditsweep.sweep.tune import run_sweep, storage_path


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


def quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' chatter (MLflow's database migrations, Ray's start-up lines, Tune's
    hints, deprecation warnings) out of the console unless --verbose: it hides the few lines a
    researcher needs. Their errors still show."""
    if verbose:
        return
    # MLflow sets its loggers' level when it is imported (later, and in every Ray worker).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Tune's newer console output prints an experiment header and a TensorBoard hint even at
    # verbose=0; its classic reporter at verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow", "ray.tune", "ray.train", "ray.air", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")


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
        from ditsweep.sweep.preflight import preflight  # on a cluster: briefly, before any trial
        if not preflight(sweep, trials, storage_path(sweep), brief=not args.check):
            return 2
        if args.check:
            return 0
    if args.dry_run:
        print(trial_table(trials))
        print("\n" + plan_summary(sweep, trials))
        from ditsweep.sweep.eval_plan import evaluation_plan
        print(evaluation_plan(sweep, trials))
        from ditsweep.sweep.reuse_plan import dry_run_lines, plan_trials
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
