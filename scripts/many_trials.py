"""Hundreds of very short trials: what the driver costs per trial, and that none is lost.

    python scripts/many_trials.py                    # 200 trials and 4 trials on a local Ray
    python scripts/many_trials.py --trials 300 --steps 5
    python scripts/many_trials.py --cluster          # on tests/cluster.py's loopback cluster

Runs `python -m ditsweep.run` on a sweep of N trials of a tiny DiT (8x8 built-in photos, a few
steps, no evaluation, `cpus_per_trial` 0.1 so that many run at once), then on 4 trials of the
same kind, each in a fresh folder and a fresh driver process, and prints for each: wall time
(total and per trial), the driver's CPU time and peak memory (VmHWM of its process, polled),
and the lines its log printed. Then it checks MLflow: every trial has exactly one trial run,
FINISHED, and no run belongs to an unknown trial. Exit code 1 if a check fails.

With --cluster the sweeps run against a LoopbackCluster (tests/cluster.py: a Ray head and
worker nodes on loopback, an `mlflow server`, S3 for storage): the driver runs here with
RAY_ADDRESS set, so the pre-flight runs first, as for a cluster sweep.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sweep_dict(name: str, trials: int, steps: int, cpus: float, fuse: int | None) -> dict:
    """`trials` trials that differ only in their seed: the cheapest model, no evaluation."""
    sweep = {
        "name": name,
        "grid": {"model": ["DiT-T/1"], "layout": ["global"], "n_train": [10],
                 "seed": list(range(trials)), "dataset": ["builtin:photos"]},
        "data": {"resolution": 8},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "ema_decay": 0.9,
                  "log_every": max(1, steps // 2), "checkpoint_every": steps},
        "eval": {m: {"enabled": False} for m in ("psnr_gap", "fid", "attention", "jacobian",
                                                 "attention_pca", "samples")},
        "resources": {"cpus_per_trial": cpus, "max_failures": 1},
    }
    if fuse:
        sweep["resources"]["fuse"] = fuse
    return sweep


def proc_stats(pid: int) -> tuple[int, float] | None:
    """(peak RSS in bytes, CPU seconds) of a live process, from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)
    if hwm is None:  # exiting: its memory is gone already
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm, (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def run_driver(folder: Path, sweep: dict, env: dict, timeout: float) -> dict:
    """Run the sweep's driver in `folder`; wall time, peak RSS, CPU time, log lines, exit code."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    log = folder / "driver.log"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ditsweep.run", str(path)], cwd=folder,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        stats, stopping = None, None
        while proc.poll() is None:  # the last reading before it exits holds the peaks
            stats = proc_stats(proc.pid) or stats
            if stopping is None and time.monotonic() - started > timeout:
                proc.send_signal(signal.SIGINT)  # as Ctrl-C: Tune stops its trials, Ray shuts down
                stopping = time.monotonic()
            elif stopping is not None and time.monotonic() - stopping > 120:
                proc.kill()
            time.sleep(0.5)
    wall = time.monotonic() - started
    text = log.read_text()
    return {"wall": wall, "rss": stats[0] if stats else 0, "cpu": stats[1] if stats else 0.0,
            "rc": proc.returncode, "lines": len(text.splitlines()), "log": text, "path": path}


def check_runs(tracking_uri: str, experiment: str, expected: list[str]) -> list[str]:
    """Problems with the trial runs in MLflow: a trial with no run or several, a run not
    FINISHED, a run of a trial the sweep does not have."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [f"no MLflow experiment {experiment!r}"]
    runs, token = [], None
    while True:  # pages of 1000: a sweep may have more runs than one search returns
        page = client.search_runs([exp.experiment_id], "tags.`ditsweep.role` = 'trial'",
                                  max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags.get("ditsweep.trial"), []).append(run)
    problems = [f"{t}: no run" for t in expected if t not in by_trial]
    problems += [f"{t}: {len(r)} runs" for t, r in by_trial.items() if len(r) > 1]
    problems += [f"{t}: run not in the sweep" for t in by_trial if t not in set(expected)]
    problems += [f"{t}: run {r[0].info.status}" for t, r in by_trial.items()
                 if len(r) == 1 and r[0].info.status != "FINISHED"]
    return problems


def measure(label: str, folder: Path, trials: int, args, env: dict, tracking_uri: str | None) -> dict:
    from ditsweep.config import expand, load_sweep
    name = f"many-{trials}"
    result = run_driver(folder / name, sweep_dict(name, trials, args.steps, args.cpus, args.fuse),
                        env, args.timeout)
    expected = [t.trial for t in expand(load_sweep(result["path"], check_data=False))]
    uri = tracking_uri or f"sqlite:///{folder / name / 'mlflow.db'}"
    result["problems"] = check_runs(uri, name, expected)
    if result["rc"] != 0:
        result["problems"].insert(0, f"driver exit code {result['rc']}; log ends:\n"
                                     + "\n".join(result["log"].splitlines()[-15:]))
    print(f"{label}: {trials} trials in {result['wall']:.0f} s = {result['wall'] / trials:.2f} s/trial; "
          f"driver CPU {result['cpu']:.0f} s ({result['cpu'] / trials:.2f} s/trial), peak RSS "
          f"{result['rss'] / 2**20:.0f} MiB; {result['lines']} log lines; "
          f"MLflow: {'one FINISHED run per trial' if not result['problems'] else 'PROBLEMS'}", flush=True)
    for problem in result["problems"][:20]:
        print(f"  {problem}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--small", type=int, default=4, help="the small sweep to compare with")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cpus", type=float, default=0.1, help="resources.cpus_per_trial")
    parser.add_argument("--fuse", type=int, default=None, help="resources.fuse (default: unset)")
    parser.add_argument("--cluster", action="store_true", help="on tests/cluster.py's LoopbackCluster")
    parser.add_argument("--workers", type=int, default=2, help="--cluster: worker nodes")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="per sweep, seconds; then the driver gets SIGINT (Ctrl-C)")
    parser.add_argument("--keep", action="store_true", help="keep the sweeps' folders")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="many-trials-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    results = []
    try:
        if args.cluster:
            sys.path.insert(0, str(REPO / "tests"))
            from cluster import LoopbackCluster  # only here: it starts S3, MLflow and Ray nodes
            with LoopbackCluster(workers=args.workers, cpus_per_worker=1) as c:
                env = {**c.env, "PYTHONPATH": str(REPO), "RAY_ADDRESS": c.head_address}
                print(f"loopback cluster: head + {args.workers} workers, MLflow {c.tracking_uri}")
                for n in (args.small, args.trials):
                    results.append(measure("cluster", folder, n, args, env, c.tracking_uri))
        else:
            for n in (args.small, args.trials):
                results.append(measure("local Ray", folder, n, args, env, None))
    finally:
        if args.keep:
            print(f"sweeps kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    small, big = results
    marginal = (big["wall"] - small["wall"]) / (args.trials - args.small)
    print(f"wall per trial: {big['wall'] / args.trials:.2f} s at {args.trials} trials vs "
          f"{small['wall'] / args.small:.2f} s at {args.small}; each trial beyond {args.small} added "
          f"{marginal:.2f} s; driver peak RSS {big['rss'] / 2**20:.0f} MiB vs {small['rss'] / 2**20:.0f} MiB")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
