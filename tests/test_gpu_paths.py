"""The GPU paths of training and costing, checked on CPU (issue 10): precision switches, a step
without host syncs, device-side RNG in checkpoints, divergence found late but named early,
torch.compile with a per-node cache, and calibration files feeding --dry-run."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import images, tiny_sweep, trial
from torch.utils._python_dispatch import TorchDispatchMode

from ditsweep.config import Sweep, expand
from ditsweep.train.gpu import precision_scope, setup_compile_cache, tf32_flags
from ditsweep.train.loop import Trainer, TrainingDiverged

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")



def flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


# ---- precision -------------------------------------------------------------------------------

def test_precision_sets_tf32_switches_inside_the_step_and_restores_them():
    assert tf32_flags("tf32") == {"matmul": True, "cudnn": True}
    assert tf32_flags("fp32") == tf32_flags("bf16") == {"matmul": False, "cudnn": False}
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        tf32_flags("fp16")
    before = flags()
    for precision, inside in (("tf32", (True, True)), ("fp32", (False, False)), ("bf16", (False, False))):
        with precision_scope(precision):
            assert flags() == inside
        assert flags() == before
        # what the model sees during a real step, and that the step leaves the switches as found
        t = Trainer(trial(train__precision=precision), images())
        seen = []
        t.model.register_forward_hook(lambda *_: seen.append((flags(), torch.is_autocast_enabled("cpu"))))
        t.train_step()
        assert seen == [(inside, precision == "bf16")] and flags() == before


# ---- a step without host synchronisation ------------------------------------------------------

class ScalarReads(TorchDispatchMode):
    """Counts device->host scalar reads (.item(), bool(), .tolist()), outside optimizer.step
    (CPU AdamW keeps its step counter on the host and reads it; fused CUDA AdamW does not)."""

    def __init__(self):
        super().__init__()
        self.reads, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_train_step_reads_nothing_back_until_log_every():
    t = Trainer(trial(train__log_every=4), images())
    probe = ScalarReads()
    t.opt.register_step_pre_hook(lambda *_: setattr(probe, "paused", True))
    t.opt.register_step_post_hook(lambda *_: setattr(probe, "paused", False))
    losses = [t.train_step()]  # the first step times itself (one sync on CUDA, none here)
    with probe:
        losses += [t.train_step() for _ in range(2)]  # steps 2, 3
    assert probe.reads == 0 and all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in losses)
    with probe:
        losses.append(t.train_step())  # step 4 = log_every: the divergence check reads once
    assert probe.reads == 1
    mean = t.read_loss()  # the mean of the steps since the last read, summed on the device
    assert mean == pytest.approx(sum(x.item() for x in losses) / 4, rel=1e-6)
    assert math.isnan(t.read_loss())  # nothing since: nan, not an error


def test_divergence_is_found_at_the_check_and_names_the_first_bad_step(tmp_path):
    t = Trainer(trial(train__log_every=50), images())
    t.train_step(), t.train_step()
    with torch.no_grad():
        next(t.model.parameters()).fill_(float("nan"))  # step 3 is the first with a NaN loss
    for _ in range(3):
        t.train_step()  # no check before log_every: nothing raised, nothing read
    with pytest.raises(TrainingDiverged, match=r"diverged: loss is nan at step 3 "):
        t.read_loss()
    with pytest.raises(TrainingDiverged, match="at step 3"):
        t.save(tmp_path)  # a diverged model is never checkpointed
    assert not (tmp_path / "checkpoint.pt").exists()


def test_generator_lives_on_the_training_device_and_its_state_is_checkpointed(tmp_path, caplog):
    t = Trainer(trial(), images())
    assert t.gen.device == t.device
    t.train_step()
    state = t.state_dict()
    assert state["gen_device"] == "cpu" and state["gen"].device.type == "cpu"
    # a checkpoint drawn on another kind of device resumes, reseeded from (seed, step), and says so
    other = Trainer(trial(), images())
    other.load_state_dict({**state, "gen_device": "cuda", "gen": torch.zeros(16, dtype=torch.uint8)})
    assert other.step == 1 and "reseeded" in caplog.text
    a = other.train_step()
    again = Trainer(trial(), images())
    again.load_state_dict({**state, "gen_device": "cuda", "gen": torch.zeros(16, dtype=torch.uint8)})
    assert torch.equal(a, again.train_step())  # the reseed is deterministic too


# ---- torch.compile ---------------------------------------------------------------------------

def test_compile_cache_is_node_local_and_overridable(tmp_path, monkeypatch):
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DITSWEEP_COMPILE_CACHE", str(tmp_path / "cache"))
    import os
    assert setup_compile_cache() == str(tmp_path / "cache" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and (tmp_path / "cache" / "inductor").is_dir()
    import torch._inductor.config as inductor_config
    assert inductor_config.fx_graph_cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert setup_compile_cache() == str(tmp_path / "mine")


def test_compiled_trainer_trains_like_the_eager_one(tmp_path, monkeypatch):
    """torch.compile through Dynamo and AOTAutograd (backend aot_eager: no C++ compiler needed)
    of a local layout, which has global blocks too (DiT-T/1 "local": 3,5,7,G,G,G); the
    first-step time becomes a tag for the trial's run."""
    layout = "local"
    monkeypatch.setenv("DITSWEEP_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("DITSWEEP_COMPILE_CACHE", str(tmp_path))
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    torch._dynamo.reset()
    compiled = Trainer(trial(train__compile=True, grid__layout=[layout]), images())
    eager = Trainer(trial(grid__layout=[layout]), images())
    a = [compiled.train_step() for _ in range(3)]
    b = [eager.train_step() for _ in range(3)]
    assert all(abs(x.item() - y.item()) <= 1e-4 * abs(y.item()) for x, y in zip(a, b))
    tags = compiled.pop_tags()
    assert float(tags["ditsweep.first_step_s"]) > 0 and tags["ditsweep.local_attention_kernel"] == "torch"
    assert compiled.pop_tags() == {}
    torch._dynamo.reset()


# ---- calibration -> --dry-run ------------------------------------------------------------------

def calibration(tmp_path, gpu="Test GPU 9000"):
    from ditsweep.bench.calibration import write_calibration
    row = dict(model="DiT-T/1", layout="G,G,G,G,G,G", resolution=8, batch_size=8, compile=False,
               trials_per_gpu=1)
    return write_calibration(
        tmp_path / "test-gpu-9000.json", gpu, "2026-01-02", "test", {"torch": "x"},
        [{**row, "precision": "fp32", "steps_per_second": 2.0},
         {**row, "precision": "bf16", "steps_per_second": 4.0},
         {**row, "precision": "bf16", "trials_per_gpu": 2, "steps_per_second": 3.0}],
        [{"metric": "psnr_gap", "model": "DiT-T/1", "num_images": 8, "steps": 5, "seconds": 36.0},
         {"metric": "fid_sampling", "model": "DiT-T/1", "images": 1000, "steps": 250, "seconds": 720.0}])


def sweep_with(**resources_and_train):
    raw = tiny_sweep(train__steps=3600, resources={"cpus_per_trial": 1, "gpus_per_trial": 1,
                                                   "gpu": "Test GPU 9000"})
    raw["grid"]["n_train"] = [8, 100]
    raw["eval"] = {"psnr_gap": {"num_images": 8, "steps": 5}, "samples": {"enabled": False},
                   "attention": {"enabled": False}}
    for key, value in resources_and_train.items():
        section, _, field = key.partition("__")
        raw[section] = {**raw.get(section, {}), field: value}
    sweep = Sweep.model_validate(raw)
    return sweep, expand(sweep)


def test_calibration_file_feeds_the_dry_run(tmp_path, monkeypatch):
    from ditsweep.sweep.estimate import plan_summary, trial_gpu_hours
    monkeypatch.setenv("DITSWEEP_CALIBRATION_DIR", str(tmp_path))
    calibration(tmp_path)
    # fp32: 3600 steps at 2 steps/s = 0.5 h; one PSNR gap of 36 s (K=8, S=5) = 0.01 h
    sweep, trials = sweep_with(train__precision="fp32")
    assert [trial_gpu_hours(sweep, t) for t in trials] == pytest.approx([0.51, 0.51])
    text = plan_summary(sweep, trials)
    assert "total: 1.0 GPU-hours = training 1.0 + evaluation without FID 0.0 + FID 0.0" in text
    assert "2 steps/s per trial, 2 trials: measured on Test GPU 9000 (2026-01-02)" in text
    assert "FID: 0.0 GPU-hours for 0 of 2 trials (eval.fid.enabled is false)" in text
    # tf32 was not measured: the fp32 figure, said to be assumed
    sweep, trials = sweep_with(train__precision="tf32")
    assert "assumed: tf32 not measured: the fp32 figure" in plan_summary(sweep, trials)
    # bf16 with 2 trials per GPU: 3 steps/s each, half a GPU each: 3600/3/3600*0.5 = 1/6 h
    sweep, trials = sweep_with(train__precision="bf16", resources__gpus_per_trial=0.5)
    assert trial_gpu_hours(sweep, trials[0]) == pytest.approx(1 / 6 + 0.01)
    # FID where enabled: 50k samples at 720 s per 1000 = 10 h per evaluation, its own line
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"0")
    sweep, trials = sweep_with(train__precision="fp32")
    sweep = sweep.model_copy(update={"eval": sweep.eval.model_copy(update={
        "fid": sweep.eval.fid.model_copy(update={"enabled": True})})})
    trials = [t.model_copy(update={"eval": sweep.eval}) for t in trials]
    text = plan_summary(sweep, trials)
    assert "FID 20.0" in text and "FID: 20.0 GPU-hours for 2 of 2 trials" in text
    # the YAML's own figure wins over the calibration file, and says so
    sweep, trials = sweep_with(train__precision="fp32", resources__steps_per_second=1.0)
    assert "from the sweep's resources.steps_per_second" in plan_summary(sweep, trials)
    assert trial_gpu_hours(sweep, trials[0]) > 1.0


def test_unknown_gpu_says_how_to_get_an_estimate(tmp_path, monkeypatch):
    from ditsweep.sweep.estimate import plan_summary
    monkeypatch.setenv("DITSWEEP_CALIBRATION_DIR", str(tmp_path))
    sweep, trials = sweep_with(resources__gpu="Nobody's GPU")
    text = plan_summary(sweep, trials)
    assert "no calibration file for GPU \"Nobody's GPU\"" in text and "bench --gpu" in text


def test_shipped_h100_calibration_holds_only_measured_figures():
    from ditsweep.bench.calibration import PACKAGE_DIR, find_calibration
    cal = find_calibration("NVIDIA H100 80GB HBM3")
    assert cal is not None and cal.path.parent == PACKAGE_DIR
    rows = {(r["model"], r["layout"][:1], r["precision"], r["compile"]): r["steps_per_second"]
            for r in cal.data["train"]}
    # the Trainer table of ../shared/gpu/results-h100-2026-11-26.txt, nothing else
    assert rows == {("DiT-XS/1", "G", "fp32", False): 3.901, ("DiT-XS/1", "3", "fp32", False): 4.35,
                    ("DiT-XS/1", "G", "bf16", False): 10.78, ("DiT-XS/1", "3", "bf16", False): 10.7,
                    ("UNet-XS", "-", "fp32", False): 10.3, ("DiT-XS/1", "G", "bf16", True): 14.92}
    assert all(r["trials_per_gpu"] == 1 for r in cal.data["train"])
    assert [e["metric"] for e in cal.data["eval"]] == ["psnr_gap"]


def test_bench_gpu_harness_writes_a_calibration_file(tmp_path):
    """`bench --gpu --smoke` on CPU: the harness that a GPU session runs, end to end (tiny)."""
    from ditsweep.bench.calibration import Calibration
    from ditsweep.bench.gpu import run
    run(["--smoke", "--out", str(tmp_path), "--phases", "global,write", "--precisions", "fp32",
         "--compile", "off", "--iters", "1", "--warmup", "0"])
    rows = [json.loads(line) for line in (tmp_path / "bench_gpu.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["env", "train"] and rows[1]["steps_per_second"] > 0
    cal = Calibration.load(tmp_path / "cpu.json")
    fig = cal.train_speed("DiT-T/1", "G,G,G,G,G,G", 8, 4, "fp32", False, 1)
    assert fig.value == rows[1]["steps_per_second"] and fig.measured


def test_flops_counted_on_meta_leave_real_models_working():
    """--dry-run counts FLOPs on the meta device (DiT-S/1 is priced from DiT-XS/1 by this ratio);
    the attention's cached index tables must stay real tensors for the trainings that follow."""
    from ditsweep.bench.calibration import step_flops
    from ditsweep.models import build_model
    flops = step_flops("DiT-T/1", "3,5,7,G,G,G", 8, 4)
    assert flops > step_flops("DiT-T/1", "3,5,7,G,G,G", 8, 2) > 0
    model = build_model("DiT-T/1", 8, 3, layout="local", attention_backend="torch")
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 6, 8, 8)


def test_only_trials_with_local_blocks_name_a_local_kernel():
    """An all-global DiT has no neighborhood blocks: no kernel tag, no fallback warning."""
    assert "ditsweep.local_attention_kernel" not in Trainer(trial(), images()).pop_tags()
    local = Trainer(trial(grid__layout=["local"]), images()).pop_tags()
    assert local["ditsweep.local_attention_kernel"] == "torch" and "ditsweep.attention_fallback" not in local


def test_calibration_file_gets_fraction_of_peak_from_the_runs_peak(tmp_path):
    """Rows measured in another process than the bf16 peak still get their fraction of it."""
    from ditsweep.bench.gpu import write
    rows = [{"kind": "env", "gpu": "Test GPU"}, {"kind": "peak", "bf16_matmul_tflops": 500.0},
            {"kind": "train", "model": "DiT-XS/1", "layout": "G", "precision": "bf16", "compile": True,
             "trials_per_gpu": 1, "steps_per_second": 20.0, "tflop_per_step": 5.0,
             "fraction_of_bf16_peak": None}]
    (tmp_path / "bench_gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = json.loads(write(tmp_path).read_text())
    assert data["gpu"] == "Test GPU" and data["train"][0]["fraction_of_bf16_peak"] == 0.2


def test_shipped_h200_calibration_holds_the_measured_figures():
    from ditsweep.bench.calibration import find_calibration
    cal = find_calibration("NVIDIA H200")
    rows = {(r["model"], r["layout"][:1], r["precision"], r["compile"], r["trials_per_gpu"]):
            round(r["steps_per_second"], 2) for r in cal.data["train"]}
    # scripts/gpu_measure.sh on an H200, 2026-11-26 (README "GPU speed")
    assert rows == {("DiT-XS/1", "G", "fp32", False, 1): 4.81, ("DiT-XS/1", "G", "tf32", False, 1): 6.72,
                    ("DiT-XS/1", "G", "tf32", True, 1): 8.22, ("DiT-XS/1", "G", "bf16", False, 1): 13.88,
                    ("DiT-XS/1", "G", "bf16", True, 1): 24.64, ("DiT-XS/1", "3", "tf32", False, 1): 7.36,
                    ("DiT-XS/1", "3", "bf16", False, 1): 13.6, ("DiT-XS/1", "3", "bf16", True, 1): 23.49,
                    ("DiT-XS/1", "3", "bf16", True, 2): 10.62, ("UNet-XS", "-", "tf32", False, 1): 11.03,
                    ("UNet-XS", "-", "bf16", False, 1): 10.65}
    assert sorted(e["metric"] for e in cal.data["eval"]) == ["fid_sampling", "jacobian", "psnr_gap"]


def test_gpu_bench_needs_neither_mlflow_nor_ray():
    """The device machine has torch but no MLflow or Ray: the bench and the Trainer import without."""
    code = ("import sys; sys.modules.update(mlflow=None, ray=None); "
            "import ditsweep.bench.gpu; from ditsweep.train.loop import Trainer")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
