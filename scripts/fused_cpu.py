"""A sweep with and without fused training, on this machine: wall time ratio and equal results.

    python scripts/fused_cpu.py                              # sweeps/smoke.yaml, fuse 1 vs 2
    python scripts/fused_cpu.py sweeps/cpu_repro.yaml --fuse 4 --steps 2000

Runs `python -m ditsweep.run` on the sweep twice, each in a fresh folder with its own local
MLflow store: first with `--fuse K`, then with `resources.fuse: 1` (so that a cold start, e.g.
Python's bytecode caches, would count against fusion). `--steps` shortens training, said in the
output. Prints both wall times and their ratio, and per trial the final loss and PSNR gap of both
runs with their relative difference. A fused step equals the unfused one to float rounding
(1e-5, tests/test_fused.py); over hundreds of steps that rounding grows as it does between any
two BLAS builds, hence the default --tolerance 1e-3. Exit code 1 if a trial is missing or
differs by more than --tolerance.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def run_sweep(sweep: dict, folder: Path) -> tuple[float, dict[str, dict[str, float]]]:
    """(wall seconds, {trial: final metrics}) of one `python -m ditsweep.run` in `folder`."""
    folder.mkdir(parents=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    start = time.perf_counter()
    with open(folder / "driver.log", "wb") as log:
        rc = subprocess.run([sys.executable, "-m", "ditsweep.run", str(path)], cwd=folder,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"sweep in {folder} failed (rc {rc}); see {folder / 'driver.log'}")
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep["name"])
    runs = client.search_runs([exp.experiment_id], "tags.`ditsweep.role` = 'trial'")
    return wall, {r.data.tags["mlflow.runName"]: r.data.metrics for r in runs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", nargs="?", default=str(REPO / "sweeps" / "smoke.yaml"))
    p.add_argument("--fuse", type=int, default=2)
    p.add_argument("--steps", type=int, help="train.steps for both runs (default: the sweep's)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="relative, on loss and psnr_gap_mean")
    p.add_argument("--keep", action="store_true", help="keep the two folders")
    args = p.parse_args()
    sweep = yaml.safe_load(Path(args.sweep).read_text())
    if args.steps:
        train = sweep.setdefault("train", {})
        train["steps"] = args.steps
        train["checkpoint_every"] = min(train.get("checkpoint_every", args.steps), args.steps)
    root = Path(tempfile.mkdtemp(prefix="ditsweep-fused-cpu-"))
    results = {}
    for k in (args.fuse, 1):
        s = {**sweep, "resources": {**sweep.get("resources", {}), "fuse": k}}
        results[k] = run_sweep(s, root / f"fuse{k}")
        print(f"fuse {k}: {len(results[k][1])} trials in {results[k][0]:.1f} s", flush=True)
    (alone_s, alone), (fused_s, fused) = results[1], results[args.fuse]
    steps = f"{args.steps} steps (shortened)" if args.steps else f"{sweep['train']['steps']} steps"
    print(f"\n{Path(args.sweep).name}, {steps}: wall {alone_s:.1f} s alone, {fused_s:.1f} s fused "
          f"(fuse {args.fuse}): {alone_s / fused_s:.2f}x")
    worst, ok = 0.0, set(alone) == set(fused)
    for trial in sorted(alone):
        a, f = alone[trial], fused.get(trial, {})
        cells = []
        for metric in ("loss", "psnr_gap_mean"):
            if metric in a and metric in f:
                rel = abs(a[metric] - f[metric]) / max(abs(a[metric]), 1e-12)
                worst = max(worst, rel)
                cells.append(f"{metric} {a[metric]:.6g} / {f[metric]:.6g} (rel {rel:.1e})")
            elif metric in a or metric in f:
                ok = False
                cells.append(f"{metric} missing in one run")
        print(f"  {trial}: " + "; ".join(cells))
    print(f"largest relative difference {worst:.1e} (tolerance {args.tolerance:g}); trials "
          f"{'the same' if set(alone) == set(fused) else 'DIFFER'} in both runs")
    print(f"folders: {root}" if args.keep else "")
    if not args.keep:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok and worst <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
