"""Benchmarks: `python -m ditsweep.bench` prints figures measured side by side in one run.

- forward+backward time of one attention layer on a 32x32 token grid, neighborhood windows
  k = 3..13 against global attention (CPU, the torch neighborhood path);
- training steps/s and images/s of the smoke sweep's models.
Ratios are only meaningful within one run on one machine.
"""

import argparse
import time

import torch

from ditsweep.models.bench_attention import time_attention_layer


def bench_attention(grid: int = 32) -> None:
    print(f"attention layer fwd+bwd, {grid}x{grid} tokens, dim 252, 4 heads, batch 4 (CPU)")
    base = time_attention_layer(None, grid=grid)
    print(f"  {'global':>8}: {base * 1000:8.1f} ms  (1.00x)")
    for k in (3, 5, 7, 9, 11, 13):
        t = time_attention_layer(k, grid=grid)
        print(f"  {'k=' + str(k):>8}: {t * 1000:8.1f} ms  ({t / base:.2f}x of global)")


def bench_training(sweep_path: str = "sweeps/smoke.yaml", steps: int = 30) -> float:
    """Steps/s of each distinct model of a sweep; returns the slowest images/s (for data benches)."""
    from ditsweep.data import load_split
    from ditsweep.spec import expand, load_sweep
    from ditsweep.train.loop import Trainer, to_model_range

    trials = expand(load_sweep(sweep_path))
    seen, slowest = set(), float("inf")
    print(f"training speed of the models of {sweep_path} ({torch.get_num_threads()} threads)")
    for cfg in trials:
        if (cfg.model, cfg.layout) in seen:
            continue
        seen.add((cfg.model, cfg.layout))
        train, _ = load_split(cfg.dataset, cfg.data.resolution, cfg.n_train, 0)
        trainer = Trainer(cfg, to_model_range(train))
        trainer.train_step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        rate = steps / (time.perf_counter() - start)
        images = rate * cfg.train.batch_size
        slowest = min(slowest, images)
        print(f"  {cfg.model} layout {cfg.layout:<14} {rate:6.2f} steps/s  {images:8.0f} images/s")
    return slowest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ditsweep.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", default="sweeps/smoke.yaml")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    bench_attention()
    bench_training(args.sweep, args.steps)


if __name__ == "__main__":
    main()
