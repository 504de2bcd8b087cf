"""`python -m ditsweep.identity SWEEP.yaml...`: how many of the trials of several sweeps are
distinct (by trial identity, ditsweep/config/identity.py), and the compute that training each
distinct trial once saves."""

import argparse

from ditsweep.config import expand, load_sweep
from ditsweep.config.identity import recipe_key
from ditsweep.sweep.estimate import trial_gpu_hours


def main(argv: list[str] | None = None) -> int:
    """`python -m ditsweep.identity SWEEP.yaml...`: trials, distinct trials and the compute that
    training each distinct trial once saves, across the given sweeps (datasets are not opened:
    trials are compared by `recipe_key`, so equal dataset URIs count as the same data)."""
    parser = argparse.ArgumentParser(prog="python -m ditsweep.identity", description=main.__doc__)
    parser.add_argument("sweeps", nargs="+")
    args = parser.parse_args(argv)
    seen: set[str] = set()
    total, saved, unknown = 0, 0.0, False
    for path in args.sweeps:
        sweep = load_sweep(path, check_data=False)
        trials = expand(sweep, path, check_data=False)
        new = 0
        for t in trials:
            key = recipe_key(t)
            if key in seen:
                hours = trial_gpu_hours(sweep, t)
                unknown |= hours is None
                saved += hours or 0.0
            else:
                new += 1
            seen.add(key)
        total += len(trials)
        print(f"{path}: {len(trials)} trials, {new} not in the sweeps before it")
    hours = "unknown (no resources.steps_per_second)" if unknown else f"{saved:,.1f}"
    print(f"{total} trials, {len(seen)} distinct: {total - len(seen)} reused, "
          f"device-hours saved {hours}")
    return 0
