"""The `bench --gpu` phases of fused training, bf16 drift and the fast sampling path.

- fused: trial-steps/s per GPU of k trials trained as one model (ditsweep.train.fused.FusedTrainer)
  for k = 1, 2, 4, 8; a row per (family, precision, compile, k) with `fuse: k`, `steps_per_second`
  (the group's, i.e. each member's) and `trial_steps_per_second` (k x that), which the
  calibration file keeps and `--dry-run` prices `resources.fuse` with.
- drift: is bf16 numerically a different experiment from tf32? Three trainings on the same data:
  tf32 seed 0, tf32 seed 1, bf16 seed 0 (bf16 and tf32 seed 0 share initialisation, batches,
  timesteps and noise; seed 1 changes all of them). bf16's distance from tf32 is compared with
  the seed-to-seed spread, for the loss curve (windowed means) and the PSNR gap. The three run as
  separate processes at once (one GPU; tf32 uses a small fraction of it) to fit one device call.
- sampling: FID sampling per 1000 images through ditsweep.eval.samples (the evaluators' path, with
  eval.precision bf16 and eval.compile), alone and batched over k fused members.
Free of Ray and MLflow, like gpu.py.
"""

import functools
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from ditsweep.bench.calibration import step_flops

DRIFT_RUNS = (("tf32", 0), ("tf32", 1), ("bf16", 0))
GAP_FLOOR_DB = 0.01  # below this a PSNR-gap difference is rounding (the eval exactness bound)


def _gpu():
    from ditsweep.bench import gpu
    return gpu


def _free() -> None:
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---- fused training --------------------------------------------------------------------------

def measure_fused(out: Path, family: str, precision: str, compile_: bool, k: int, args,
                  peak: float | None) -> None:
    """k trials of one preset (seeds 0..k-1, own random images each) as one FusedTrainer."""
    from ditsweep.train.fused import FusedTrainer
    g = _gpu()
    model, layout = g.MODELS[family]
    fields = dict(model=model, layout_name=layout, precision=precision, compile=compile_, backend="auto",
                  trials_per_gpu=1, fuse=k)
    trainer = None
    try:
        base = g.trial_config(model, layout, precision, compile_, args.smoke)
        cfgs = [base.model_copy(update={"seed": i, "trial": f"{base.trial}-m{i}"}) for i in range(k)]
        res = base.data.resolution
        gen = torch.Generator().manual_seed(0)
        images = [torch.rand(1000, 3, res, res, generator=gen) * 2 - 1 for _ in range(k)]
        fields.update(model=base.model, layout=base.layout, resolution=res, batch_size=base.train.batch_size)
        trainer = FusedTrainer(cfgs, images, g.device())
        g.sync()
        start = time.perf_counter()
        trainer.train_step()  # compiles, if asked
        g.sync()
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            trainer.train_step()
        g.sync()
        start = time.perf_counter()
        for _ in range(args.iters):
            trainer.train_step()
        loss = trainer.members[0].read_loss()  # the one host sync, as at log_every
        seconds = (time.perf_counter() - start) / args.iters
        flops = k * step_flops(base.model, base.layout, res, base.train.batch_size)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        g.emit(out, "fused", **fields, steps_per_second=1 / seconds, trial_steps_per_second=k / seconds,
               first_step_s=first, peak_mem_gib=mem, loss=loss, tflop_per_step=flops / 1e12,
               fraction_of_bf16_peak=(flops / seconds / 1e12 / peak) if peak else None)
    except Exception as e:  # noqa: BLE001 - one failed configuration (say k=8 out of memory) must not end the bench
        g.emit(out, "fused", **fields, error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=3)
    finally:
        del trainer
        _free()


# ---- bf16 drift ------------------------------------------------------------------------------

def drift_run(spec: dict) -> dict:
    """One training of the drift phase: the loss every `window` steps (mean of the window) and
    the PSNR gap of the trained (not EMA) weights at the end: after a few thousand steps an EMA
    of decay 0.9999 is still mostly the initialisation."""
    from ditsweep.data import load_split, to_model_range
    from ditsweep.eval.psnr_gap import psnr_gap
    from ditsweep.train.loop import Trainer
    g = _gpu()
    base = g.trial_config("DiT-XS/1", "global", spec["precision"], spec["compile"], spec["smoke"])  # no NATTEN needed
    cfg = base.model_copy(update={"seed": spec["seed"], "n_train": spec["n_train"],
                                  "train": base.train.model_copy(update={"log_every": spec["window"]})})
    k = min(300, spec["n_train"])
    train, test = load_split("builtin:photos", cfg.data.resolution, spec["n_train"], k)
    trainer = Trainer(cfg, to_model_range(train), device=g.device())
    start, curve = time.perf_counter(), []
    while trainer.step < spec["steps"]:
        trainer.train_step()
        if trainer.step % spec["window"] == 0:
            curve.append(trainer.read_loss())
    train_seconds = time.perf_counter() - start
    dev = trainer.device
    gap = psnr_gap(trainer.model, to_model_range(train[:k]).to(dev), to_model_range(test).to(dev),
                   num_steps=spec["gap_steps"], seed=0)
    return dict(precision=spec["precision"], seed=spec["seed"], compile=spec["compile"], model=cfg.model,
                n_train=spec["n_train"], steps=trainer.step, window=spec["window"], loss_windows=curve,
                psnr_gap_mean=gap.mean_gap, psnr_train_mean=sum(gap.psnr_train) / len(gap.psnr_train),
                psnr_test_mean=sum(gap.psnr_test) / len(gap.psnr_test), train_seconds=train_seconds)


def drift_verdict(runs: dict[tuple[str, int], dict]) -> dict:
    """bf16's distance from tf32 (seed 0) against the seed-to-seed spread (tf32 seed 1 vs 0):
    mean absolute difference of the windowed loss means, over all windows and over the last
    quarter, and the absolute PSNR-gap difference (a floor of GAP_FLOOR_DB, as two gaps of ~0 dB
    would otherwise give a spread of 0). Within spread when neither bf16 figure exceeds it."""
    ref, seed1, bf16 = runs[("tf32", 0)], runs[("tf32", 1)], runs[("bf16", 0)]
    n = min(len(ref["loss_windows"]), len(seed1["loss_windows"]), len(bf16["loss_windows"]))
    tail = max(1, n // 4)

    def mean_abs(a: list[float], b: list[float], first: int) -> float:
        return sum(abs(x - y) for x, y in zip(a[first:n], b[first:n])) / (n - first)
    out = {"windows": n, "window_steps": ref["window"]}
    for name, first in (("loss", 0), ("loss_last_quarter", n - tail)):
        out[f"{name}_bf16_vs_tf32"] = mean_abs(bf16["loss_windows"], ref["loss_windows"], first)
        out[f"{name}_seed1_vs_seed0"] = mean_abs(seed1["loss_windows"], ref["loss_windows"], first)
    out["gap_bf16_vs_tf32_db"] = abs(bf16["psnr_gap_mean"] - ref["psnr_gap_mean"])
    out["gap_seed1_vs_seed0_db"] = abs(seed1["psnr_gap_mean"] - ref["psnr_gap_mean"])
    out["within_spread"] = (out["loss_bf16_vs_tf32"] <= out["loss_seed1_vs_seed0"]
                            and out["loss_last_quarter_bf16_vs_tf32"] <= out["loss_last_quarter_seed1_vs_seed0"]
                            and out["gap_bf16_vs_tf32_db"] <= max(out["gap_seed1_vs_seed0_db"], GAP_FLOOR_DB))
    out["line"] = (
        f"drift: bf16 {'WITHIN' if out['within_spread'] else 'NOT within'} the seed-to-seed spread "
        f"({n} windows of {ref['window']} steps, {ref['steps']} steps, N={ref['n_train']}): loss "
        f"|bf16-tf32| {out['loss_bf16_vs_tf32']:.5f} vs |seed1-seed0| {out['loss_seed1_vs_seed0']:.5f} "
        f"(last quarter {out['loss_last_quarter_bf16_vs_tf32']:.5f} vs "
        f"{out['loss_last_quarter_seed1_vs_seed0']:.5f}); PSNR gap |bf16-tf32| "
        f"{out['gap_bf16_vs_tf32_db']:.4f} dB vs |seed1-seed0| {out['gap_seed1_vs_seed0_db']:.4f} dB "
        f"(floor {GAP_FLOOR_DB} dB); spread from one pair of tf32 seeds (0, 1) on the same data")
    return out


def measure_drift(out: Path, args) -> None:
    """The three drift trainings as processes running at once; their rows and the verdict."""
    run_dir = out / "drift"
    run_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    for precision, seed in DRIFT_RUNS:
        spec = dict(precision=precision, seed=seed, smoke=args.smoke, steps=args.drift_steps,
                    window=args.drift_window, n_train=args.drift_n, gap_steps=args.drift_gap_steps,
                    compile=precision == "bf16" and args.drift_compile == "on",
                    result=str(run_dir / f"{precision}-s{seed}.json"))
        cmd = [sys.executable, "-m", "ditsweep.bench.gpu", "drift-worker", json.dumps(spec)]
        procs[(precision, seed)] = (subprocess.Popen(cmd), Path(spec["result"]))
        if not args.drift_parallel:
            procs[(precision, seed)][0].wait()
    runs = {}
    for key, (proc, result) in procs.items():
        proc.wait()
        row = json.loads(result.read_text()) if result.exists() else {"error": f"exit {proc.returncode}"}
        _gpu().emit(out, "drift", **{"precision": key[0], "seed": key[1], **row})
        if "error" not in row:
            runs[key] = row
    if len(runs) == len(DRIFT_RUNS):
        verdict = drift_verdict(runs)
        _gpu().emit(out, "drift_verdict", **verdict)
        print(verdict["line"], flush=True)
    else:
        _gpu().emit(out, "drift_verdict", error="not every drift run finished: no verdict")


def drift_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        row = drift_run(spec)
    except Exception as e:  # noqa: BLE001 - reported as the run's row
        traceback.print_exc(limit=4)
        row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    Path(spec["result"]).write_text(json.dumps(row))


# ---- sampling through the evaluators' path ---------------------------------------------------

def measure_sampling(out: Path, args) -> None:
    """Seconds per 1000 images at 250 sampler steps through ditsweep.eval.samples, with
    --eval-precision (bf16: autocast) and --eval-compile; timed on one batch of --sample-batch
    images for a few steps after a warm-up call, scaled linearly; then k fused members at once
    (samples.generate_fused), per member."""
    from ditsweep.eval.samples import generate, generate_fused
    from ditsweep.models import build_model
    from ditsweep.models.fused import fuse
    from ditsweep.train.gpu import precision_scope
    g = _gpu()
    res = 8 if args.smoke else 32
    name = "DiT-T/1" if args.smoke else "DiT-XS/1"
    bf16 = args.eval_precision == "bf16"
    batch, steps = (4, 3) if args.smoke else (args.sample_batch, 10)
    models = []
    for seed in range(max(args.sample_members, 1)):
        torch.manual_seed(seed)
        models.append(build_model(name, res, 3, layout="local").to(g.device()).eval().requires_grad_(False))
    compiled = args.eval_compile == "on" and torch.cuda.is_available()
    common = dict(model=name, layout="local", precision=args.eval_precision, compile=compiled,
                  batch=batch, images=1000, steps=250,
                  measured_as=f"{batch} images x {steps} steps after a warm-up call, scaled linearly")
    cases = [("fid_sampling", 1)] + ([("fid_sampling_fused", args.sample_members)] if args.sample_members > 1 else [])
    for metric, k in cases:
        try:
            if metric == "fid_sampling":
                net = torch.compile(models[0]) if compiled else models[0]
                run = functools.partial(generate, net, batch, (3, res, res), seed=0, batch_size=batch, bf16=bf16)
            else:
                fused = fuse(models[:k])
                net = torch.compile(fused) if compiled else fused
                run = functools.partial(generate_fused, models[:k], batch, (3, res, res), seeds=list(range(k)),
                                        batch_size=batch, bf16=bf16, fused=net)
            with precision_scope(args.eval_precision):
                start = time.perf_counter()
                run(2)  # warm-up: compilation, cuBLAS/cuDNN plans
                g.sync()
                warm = time.perf_counter() - start
                start = time.perf_counter()
                run(steps)
                g.sync()
                seconds = (time.perf_counter() - start) * (1000 / batch) * (250 / steps)
            extra = dict(members=k, seconds_per_member=seconds / k) if k > 1 else {}
            g.emit(out, "eval", metric=metric, **common, **extra, seconds=seconds, warmup_s=warm)
        except Exception as e:  # noqa: BLE001
            g.emit(out, "eval", metric=metric, **common, error=f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=3)
        finally:
            _free()
