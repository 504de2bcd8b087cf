"""CPU benchmarks of `python -m ditsweep.bench`: figures measured side by side in one run.

- forward+backward time of one attention layer on a 32x32 token grid, neighborhood windows
  k = 3..13 against global attention (CPU, the torch neighborhood path);
- training steps/s and images/s of the smoke sweep's models.
Ratios are only meaningful within one run on one machine.
"""

import time

import torch

from ditsweep.bench.attention import time_attention_layer


def bench_attention(grid: int = 32) -> None:
    print(f"attention layer fwd+bwd, {grid}x{grid} tokens, dim 252, 4 heads, batch 4 (CPU)")
    base = time_attention_layer(None, grid=grid)
    print(f"  {'global':>8}: {base * 1000:8.1f} ms  (1.00x)")
    for k in (3, 5, 7, 9, 11, 13):
        t = time_attention_layer(k, grid=grid)
        print(f"  {'k=' + str(k):>8}: {t * 1000:8.1f} ms  ({t / base:.2f}x of global)")


def bench_training(sweep_path: str = "sweeps/smoke.yaml", steps: int = 30) -> float:
    """Steps/s of each distinct model of a sweep; returns the slowest images/s (for data benches)."""
    from ditsweep.config import expand, load_sweep
    from ditsweep.data import load_split, to_model_range
    from ditsweep.train.loop import Trainer

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
        trainer.read_loss()  # waits for the device, as a trial does at log_every
        rate = steps / (time.perf_counter() - start)
        images = rate * cfg.train.batch_size
        slowest = min(slowest, images)
        print(f"  {cfg.model} layout {cfg.layout:<14} {rate:6.2f} steps/s  {images:8.0f} images/s")
    return slowest


def bench_loader(training_images_per_s: float | None = None, resolutions: tuple[int, ...] = (8, 32),
                 batches: int = 150) -> None:
    """Images/s of the data plane from local shards and from moto's S3 server on loopback.

    Two readers: `load_split` (one bulk read of the whole dataset, what a trial does at start)
    and `stream_train_batches` (endless shuffled batches of 64, single process, no cache, so
    every epoch downloads its shards again). The S3 server is tests/s3server.py of this
    checkout (moto's server on a loopback port); without it only the local figures are printed.
    """
    import os
    import tempfile

    from ditsweep.data import load_split
    from ditsweep.data.pack import pack
    from ditsweep.data.stream import stream_train_batches

    def rates(uri: str, resolution: int, count: int) -> tuple[float, float]:
        start = time.perf_counter()
        load_split(uri, resolution, count, 0)
        bulk = count / (time.perf_counter() - start)
        stream = stream_train_batches(uri, count, 64, seed=0)
        next(stream)  # warm-up: first shard and the shuffle buffer
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        return bulk, batches * 64 / (time.perf_counter() - start)

    try:
        # tests/s3server.py of this checkout, by path: an unrelated `tests` package may be installed
        import importlib.util
        from pathlib import Path
        spec = importlib.util.spec_from_file_location(
            "ditsweep_s3server", Path(__file__).resolve().parents[2] / "tests" / "s3server.py")
        helper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(helper)
        server = helper.S3Server().start()
    except Exception as e:  # noqa: BLE001 - the bench still reports the local figures
        print(f"  (no S3 server for the loader bench: {type(e).__name__}: {e})")
        server = None
    saved = dict(os.environ)
    if server is not None:
        os.environ.update(server.env())
        server.create_bucket("bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for resolution in resolutions:
                targets = {"local shards": f"{tmp}/photos{resolution}"}
                if server is not None:
                    targets["S3 (moto, loopback)"] = f"s3://bench/photos{resolution}"
                print(f"loader throughput, builtin:photos packed at {resolution}x{resolution}, "
                      f"shards of 1000 (images/s)")
                for label, uri in targets.items():
                    manifest = pack("builtin:photos", uri, resolution, 1000, progress=False)
                    bulk, streamed = rates(uri, resolution, manifest.count)
                    print(f"  {label:<20} load_split {bulk:9.0f}   stream_train_batches {streamed:9.0f}")
        if training_images_per_s is not None:
            print(f"  training consumes {training_images_per_s:.0f} images/s (slowest smoke model)")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if server is not None:
            server.close()
