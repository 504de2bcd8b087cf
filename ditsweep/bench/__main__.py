"""`python -m ditsweep.bench`: measure this machine.

    python -m ditsweep.bench          CPU: attention layer, training speed, data loader (cpu.py)
    python -m ditsweep.bench --gpu    this GPU's calibration file for --dry-run (gpu.py)

Ratios are only meaningful within one run on one machine.
"""

import argparse

from ditsweep.bench.cpu import bench_attention, bench_loader, bench_training


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ditsweep.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default="sweeps/smoke.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--gpu", action="store_true",
                        help="measure this GPU and write its calibration file (ditsweep/bench/gpu.py; "
                             "`--gpu --help` lists its options)")
    args, rest = parser.parse_known_args()
    if args.gpu:
        from ditsweep.bench.gpu import run
        return run(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    bench_attention()
    slowest = bench_training(args.sweep, args.steps)
    bench_loader(slowest)


if __name__ == "__main__":
    main()
