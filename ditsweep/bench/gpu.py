"""`python -m ditsweep.bench --gpu`: what a trial costs on this GPU, written as a calibration file.

Measures, with the project's own Trainer and evaluation code, on the GPU where it runs:
- train: steps/s of each paper preset (DiT-XS/1 global and local layouts, UNet-XS) x precision
  (tf32, fp32, bf16) x torch.compile, at 32x32 and batch 64; first-step time, peak memory, and
  the fraction of the bf16 matrix peak (measured here with one large matmul);
- pack: the same with 2 and 4 trials sharing the GPU, as separate processes (as Ray runs
  fractional GPUs), started together once all have compiled;
- eval: one PSNR-gap evaluation (K=300, S=50, --eval-precision), one 32x32 Jacobian; sampling:
  FID sampling per 1000 images at 250 steps through the evaluators' path (--eval-precision,
  --eval-compile), alone and batched over fused members;
- fused: trial-steps/s of k = 1, 2, 4, 8 trials trained as one fused model; drift: bf16 vs tf32
  against the seed-to-seed spread (both in gpu_fused.py).
Every measurement is one JSON line in OUT/bench_gpu.jsonl as it finishes, so a run cut short
keeps what it measured; `write` turns the lines into OUT/<gpu-slug>.json (ditsweep.calibration).
`--smoke` runs the same code on a CPU with DiT-T/1 at 8x8 (a check of the harness, no figures).
"""

import argparse
import datetime
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from ditsweep.bench import gpu_fused
from ditsweep.bench.calibration import step_flops

T0 = time.time()
MODELS = {"global": ("DiT-XS/1", "global"), "local": ("DiT-XS/1", "local"), "unet": ("UNet-XS", "global")}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(out: Path, kind: str, **fields) -> None:
    """One measurement: a JSON line in out/bench_gpu.jsonl and a RESULT line on stdout."""
    row = {"kind": kind, **fields}
    with open(out / "bench_gpu.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print("RESULT " + json.dumps(row), flush=True)


def env_info() -> dict:
    from ditsweep.models.attention import has_libnatten
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "libnatten": has_libnatten(), "gpu": "cpu"}
    try:
        import natten
        info["natten"] = natten.__version__
    except ImportError:
        info["natten"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def trial_config(model: str, layout: str, precision: str, compile_: bool, smoke: bool, backend="auto"):
    from ditsweep.config import Sweep, expand
    resolution, batch = (8, 4) if smoke else (32, 64)
    if smoke:
        model = "DiT-T/1" if model.startswith("DiT") else "UNet-T"
    sweep = Sweep.model_validate(dict(
        name="bench-gpu", grid=dict(model=[model], layout=[layout], n_train=[1000], dataset=["builtin:photos"]),
        data=dict(resolution=resolution),
        train=dict(steps=10**9, batch_size=batch, precision=precision, compile=compile_,
                   attention_backend=backend, log_every=10**6),
        resources=dict(gpus_per_trial=1 if torch.cuda.is_available() else 0)))
    return expand(sweep, "bench-gpu.yaml", check_data=False)[0]


def make_trainer(cfg):
    from ditsweep.train.loop import Trainer
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1000, 3, cfg.data.resolution, cfg.data.resolution, generator=gen) * 2 - 1
    return Trainer(cfg, images, device=device())


def matmul_peak_tflops() -> float | None:
    """bf16 dense matmul TFLOP/s of this GPU (8192^3, best of 20): the peak to compare with."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(20):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * 8192 ** 3 / best / 1e12


def measure_train(out: Path, family: str, precision: str, compile_: bool, args, peak: float | None,
                  backend: str = "auto") -> None:
    model, layout = MODELS[family]
    trainer = None
    fields = dict(model=model, layout_name=layout, precision=precision, compile=compile_, backend=backend,
                  trials_per_gpu=1)
    try:
        cfg = trial_config(model, layout, precision, compile_, args.smoke, backend)
        trainer = make_trainer(cfg)
        fields.update(model=cfg.model, layout=cfg.layout, resolution=cfg.data.resolution,
                      batch_size=cfg.train.batch_size)
        flops = step_flops(cfg.model, cfg.layout, cfg.data.resolution, cfg.train.batch_size)  # as --dry-run
        trainer.train_step()  # compiles, if asked; times itself
        for _ in range(args.warmup):
            trainer.train_step()
        sync()
        start = time.perf_counter()
        for _ in range(args.iters):
            trainer.train_step()
        loss = trainer.read_loss()  # the one host sync, as at log_every
        seconds = (time.perf_counter() - start) / args.iters
        tags = trainer.pop_tags()
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        emit(out, "train", **fields, steps_per_second=1 / seconds, first_step_s=trainer.first_step_seconds,
             peak_mem_gib=mem, loss=loss, tflop_per_step=flops / 1e12,
             fraction_of_bf16_peak=(flops / seconds / 1e12 / peak) if peak else None,
             attention=tags.get("ditsweep.local_attention_kernel"),
             fallback=tags.get("ditsweep.attention_fallback"))
    except Exception as e:  # noqa: BLE001 - one failed configuration must not end the bench
        emit(out, "train", **fields, error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=3)
    finally:
        del trainer
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def check_syncs(out: Path, family: str, precision: str, args) -> None:
    """Steps between two log_every reads must not synchronise with the host: run them under
    torch.cuda.set_sync_debug_mode("error"), which raises on any synchronising call."""
    if not torch.cuda.is_available():
        return
    model, layout = MODELS[family]
    try:
        trainer = make_trainer(trial_config(model, layout, precision, False, args.smoke))
        trainer.train_step()  # the first step syncs once, on purpose (its time)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        emit(out, "syncs", model=model, layout_name=layout, precision=precision, steps=5, host_syncs=0)
    except Exception as e:  # noqa: BLE001
        emit(out, "syncs", model=model, layout_name=layout, precision=precision,
             error=f"{type(e).__name__}: {str(e)[:300]}")
        traceback.print_exc(limit=6)
    torch.cuda.empty_cache()


def measure_pack(out: Path, family: str, precision: str, compile_: bool, k: int, args) -> None:
    """k trials as k processes on one GPU: each compiles and warms up, then all run together
    for args.pack_seconds; the figure is each trial's steps/s (and their sum)."""
    run_dir = out / f"pack-{family}-{precision}-{int(compile_)}-{k}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = json.dumps(dict(family=family, precision=precision, compile=compile_, smoke=args.smoke,
                           warmup=args.warmup, seconds=args.pack_seconds, k=k, dir=str(run_dir)))
    procs = [subprocess.Popen([sys.executable, "-m", "ditsweep.bench.gpu", "worker", spec, str(i)])
             for i in range(k)]
    deadline = time.time() + args.pack_seconds + args.pack_startup
    rates, errors = [], []
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        result = run_dir / f"{i}.json"
        if result.exists():
            row = json.loads(result.read_text())
            (errors if "error" in row else rates).append(row.get("error") or row["steps_per_second"])
        else:
            errors.append(f"worker {i} exited {p.returncode} without a result")
    model, layout = MODELS[family]
    cfg = trial_config(model, layout, precision, compile_, args.smoke)
    fields = dict(model=cfg.model, layout=cfg.layout, layout_name=layout, resolution=cfg.data.resolution,
                  batch_size=cfg.train.batch_size, precision=precision, compile=compile_, trials_per_gpu=k)
    if errors:
        emit(out, "pack", **fields, error="; ".join(map(str, errors))[:400])
    else:
        emit(out, "pack", **fields, steps_per_second=min(rates), per_trial=rates, total_steps_per_second=sum(rates))


def worker(spec_json: str, index: str) -> None:
    """One packed trial (a subprocess of measure_pack)."""
    spec = json.loads(spec_json)
    run_dir, i = Path(spec["dir"]), int(index)
    try:
        model, layout = MODELS[spec["family"]]
        trainer = make_trainer(trial_config(model, layout, spec["precision"], spec["compile"], spec["smoke"]))
        for _ in range(1 + spec["warmup"]):
            trainer.train_step()
        trainer.read_loss()
        (run_dir / f"{i}.ready").touch()
        while len(list(run_dir.glob("*.ready"))) < spec["k"]:  # start together
            time.sleep(0.05)
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < spec["seconds"]:
            for _ in range(5):
                trainer.train_step()
            steps += 5
            sync()
        row = {"steps_per_second": steps / (time.perf_counter() - start),
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    except Exception as e:  # noqa: BLE001
        row = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        (run_dir / f"{i}.ready").touch()  # do not keep the others waiting
    (run_dir / f"{i}.json").write_text(json.dumps(row))


def measure_evals(out: Path, args) -> None:
    from ditsweep.diffusion import create_diffusion
    from ditsweep.eval.jacobian import jacobian
    from ditsweep.eval.psnr_gap import psnr_gap
    from ditsweep.models import build_model
    from ditsweep.train.gpu import precision_scope

    res = 8 if args.smoke else 32
    model_name = "DiT-T/1" if args.smoke else "DiT-XS/1"
    m = build_model(model_name, res, 3, layout="local").to(device()).eval()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(600, 3, res, res, generator=gen) * 2 - 1
    common = dict(model=model_name, layout="local", precision=args.eval_precision)
    k, s = (8, 5) if args.smoke else (300, 50)
    jobs = {
        "psnr_gap": lambda: psnr_gap(m, imgs[:k].to(device()), imgs[300:300 + k].to(device()), num_steps=s,
                                     batch_size=args.sample_batch, bf16=args.eval_precision == "bf16"),
    }
    diffusion = create_diffusion()  # FID sampling: the `sampling` phase (gpu_fused.py)

    def one_jacobian():
        x = imgs[0].to(device())

        def x0_hat(xb):
            t = torch.full((len(xb),), 100, dtype=torch.long, device=xb.device)
            return diffusion.predict_xstart_from_eps(xb, t, m(xb, t)[:, :3].float())
        return jacobian(x0_hat, x, chunk=None)
    jobs["jacobian"] = one_jacobian
    for metric, job in jobs.items():
        if args.deadline and time.time() > args.deadline - 20:
            emit(out, "eval", metric=metric, **common, error="skipped: budget")
            continue
        try:
            with precision_scope(args.eval_precision):
                sync()
                start = time.perf_counter()
                job()
                sync()
                seconds = time.perf_counter() - start
            size = {"psnr_gap": dict(num_images=k, steps=s), "jacobian": dict(resolution=res)}[metric]
            emit(out, "eval", metric=metric, **common, **size, seconds=seconds)
        except Exception as e:  # noqa: BLE001
            emit(out, "eval", metric=metric, **common, error=f"{type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc(limit=3)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def write(out: Path, path: Path | None = None) -> Path:
    """The calibration file from the JSON lines of out/ (errors and smoke rows left out)."""
    from ditsweep.bench.calibration import gpu_slug, write_calibration
    rows = [json.loads(line) for line in (out / "bench_gpu.jsonl").read_text().splitlines() if line]
    env = next((r for r in reversed(rows) if r["kind"] == "env"), {})
    gpu = env.get("gpu", "unknown")
    keep = ("model", "layout", "resolution", "batch_size", "precision", "compile", "trials_per_gpu",
            "steps_per_second", "first_step_s", "peak_mem_gib", "attention", "fallback", "backend",
            "fraction_of_bf16_peak", "tflop_per_step", "per_trial", "total_steps_per_second",
            "fuse", "trial_steps_per_second")
    train = [{k: r[k] for k in keep if k in r} for r in rows
             if r["kind"] in ("train", "pack", "fused") and "error" not in r and r.get("backend", "auto") == "auto"]
    evals = [{k: v for k, v in r.items() if k != "kind"} for r in rows if r["kind"] == "eval" and "error" not in r]
    peak = next((r["bf16_matmul_tflops"] for r in rows if r["kind"] == "peak" and r.get("bf16_matmul_tflops")), None)
    for r in train:  # rows from processes that did not measure the peak themselves
        if peak and r.get("tflop_per_step") and r.get("fraction_of_bf16_peak") is None:
            r["fraction_of_bf16_peak"] = r["tflop_per_step"] * r["steps_per_second"] / peak
    drift = [{k: v for k, v in r.items() if k != "kind"} for r in rows
             if r["kind"] in ("drift", "drift_verdict") and "error" not in r]
    path = path or out / f"{gpu_slug(gpu)}.json"
    return write_calibration(path, gpu, datetime.date.today().isoformat(),
                             "python -m ditsweep.bench --gpu (ditsweep/bench/gpu.py)",
                             {k: v for k, v in env.items() if k not in ("kind", "gpu")}, train, evals,
                             drift=drift or None)


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ditsweep.bench --gpu")
    p.add_argument("--out", default="bench-gpu-out", help="folder for bench_gpu.jsonl and the calibration file")
    p.add_argument("--phases", default="peak,global,eval,local,pack,write",
                   help="comma list of peak, syncs, global, local, unet, flex, eval, sampling, pack, "
                        "fused, drift, write")
    p.add_argument("--precisions", default="tf32,bf16,fp32")
    p.add_argument("--compile", default="off,on", help="off, on, or both")
    p.add_argument("--pack", default="local:tf32:off,local:bf16:on", help="family:precision:compile,...")
    p.add_argument("--trials-per-gpu", default="2,4")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pack-seconds", type=float, default=15)
    p.add_argument("--pack-startup", type=float, default=120, help="seconds a packed worker may take to start")
    p.add_argument("--eval-precision", default="tf32", help="tf32, fp32 or bf16 (eval, sampling)")
    p.add_argument("--eval-compile", default="off", help="sampling: torch.compile the denoiser (on/off)")
    p.add_argument("--sample-batch", type=int, default=512, help="images per network call (eval, sampling)")
    p.add_argument("--sample-members", type=int, default=4, help="sampling: fused members sampled at once")
    p.add_argument("--fused", default="global:bf16:on,local:bf16:on,global:tf32:off,local:tf32:off",
                   help="fused phase: family:precision:compile,...")
    p.add_argument("--fuse-ks", default="1,2,4,8", help="fused phase: members per fused model")
    p.add_argument("--drift-steps", type=int, default=2000, help="steps of each drift training")
    p.add_argument("--drift-window", type=int, default=100, help="steps per loss window of the drift phase")
    p.add_argument("--drift-n", type=int, default=100, help="training images of the drift trainings")
    p.add_argument("--drift-gap-steps", type=int, default=50, help="PSNR-gap timesteps S of the drift phase")
    p.add_argument("--drift-compile", default="on", help="compile the bf16 drift training (on/off)")
    p.add_argument("--drift-parallel", type=int, default=1, help="1: the three drift trainings at once")
    p.add_argument("--budget", type=float, default=0, help="seconds; 0: no limit (later items are skipped)")
    p.add_argument("--smoke", action="store_true", help="tiny models on any device: checks the harness")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.deadline = T0 + args.budget if args.budget else 0
    phases = args.phases.split(",")
    left = lambda: (args.deadline - time.time()) if args.deadline else float("inf")  # noqa: E731
    info = env_info()
    emit(out, "env", **info)
    peak = None
    if "peak" in phases:
        peak = matmul_peak_tflops()
        emit(out, "peak", bf16_matmul_tflops=peak)
    if "syncs" in phases:
        for family, precision in (("global", "bf16"), ("local", "tf32")):
            if family in phases:
                check_syncs(out, family, precision, args)
    compiles = [c == "on" for c in args.compile.split(",")]
    for family in ("global", "local", "unet"):
        if family not in phases:
            continue
        for precision in args.precisions.split(","):
            for comp in compiles:
                if left() < 30:
                    print(f"budget: skipping {family} {precision} compile={comp}", flush=True)
                    continue
                measure_train(out, family, precision, comp, args, peak)
    if "flex" in phases:  # the fallback kernels, for comparison with NATTEN's
        for precision in args.precisions.split(","):
            for backend in ("flex", "torch"):
                if left() > 30:
                    measure_train(out, "local", precision, False, args, peak, backend)
    if "eval" in phases and left() > 30:
        measure_evals(out, args)
    if "sampling" in phases and left() > 30:
        gpu_fused.measure_sampling(out, args)
    if "fused" in phases:
        for item in args.fused.split(","):
            family, precision, comp = item.split(":")
            for k in map(int, args.fuse_ks.split(",")):
                if left() < 45:
                    print(f"budget: skipping fused {item} k={k}", flush=True)
                    continue
                gpu_fused.measure_fused(out, family, precision, comp == "on", k, args, peak)
    if "pack" in phases:
        for item in args.pack.split(","):
            family, precision, comp = item.split(":")
            for k in map(int, args.trials_per_gpu.split(",")):
                if left() < args.pack_seconds + 40:
                    print(f"budget: skipping pack {item} x{k}", flush=True)
                    continue
                measure_pack(out, family, precision, comp == "on", k, args)
    if "drift" in phases:
        gpu_fused.measure_drift(out, args)
    if "write" in phases:
        print(f"calibration file: {write(out)}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "drift-worker":
        gpu_fused.drift_worker(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "write":
        print(write(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None))
    else:
        run(sys.argv[1:])
