"""Fused training in the cost estimate and the GPU bench (issue: fused k, bf16 drift, cheaper
evaluation): calibration rows keyed by fuse k, `--dry-run` pricing groups at their measured
trial-steps/s (and saying when a k was not measured), `choose_fuse` for `fuse: auto`, the
several-sweeps total, the drift verdict, and the bench's fused phase on CPU."""

import json

import pytest
from conftest import REPO, tiny_sweep

from ditsweep.bench.calibration import Calibration, write_calibration
from ditsweep.config import Sweep, expand

GPU = "Test GPU 9000"
ROW = dict(model="DiT-T/1", layout="G,G,G,G,G,G", resolution=8, batch_size=8, compile=False,
           trials_per_gpu=1, precision="fp32")


def calibration(tmp_path, fused: dict[int, float]) -> Calibration:
    """One unfused row at 2 steps/s (no "fuse" key: a file from before fused training) and
    fused rows {k: the group's steps/s}."""
    rows = [{**ROW, "steps_per_second": 2.0}]
    rows += [{**ROW, "fuse": k, "steps_per_second": sps, "trial_steps_per_second": k * sps}
             for k, sps in fused.items()]
    path = write_calibration(tmp_path / "test-gpu-9000.json", GPU, "2026-01-02", "test", {}, rows, [])
    return Calibration.load(path)


def sweep_with(n_trials: int = 4, **resources):
    raw = tiny_sweep(train__steps=3600, resources={"cpus_per_trial": 1, "gpus_per_trial": 1, "gpu": GPU,
                                                   **resources})
    raw["grid"]["n_train"] = [8, 9, 10, 11, 12, 13, 14, 15][:n_trials]
    raw["eval"] = {"psnr_gap": {"enabled": False}, "samples": {"enabled": False},
                   "attention": {"enabled": False}}
    raw["train"]["precision"] = "fp32"
    sweep = Sweep.model_validate(raw)
    return sweep, expand(sweep)


def test_rows_without_fuse_are_k1_and_fused_rows_give_k_times_the_group_speed(tmp_path):
    cal = calibration(tmp_path, {2: 1.5, 4: 1.0})
    args = ("DiT-T/1", "G,G,G,G,G,G", 8, 8, "fp32", False, 1)
    assert cal.fused_ks() == [1, 2, 4]
    alone = cal.train_speed(*args)
    assert alone.value == 2.0 and alone.measured  # the old row, not a fused one
    two, four = cal.train_speed(*args, fuse=2), cal.train_speed(*args, fuse=4)
    assert (two.value, four.value) == (3.0, 4.0) and two.measured and four.measured
    assert "fuse 4: 4 x 1 steps/s of the group" in four.source
    eight = cal.train_speed(*args, fuse=8)  # not measured: trained alone, and said so
    assert eight.value == 2.0 and not eight.measured
    assert eight.source.startswith("assumed: fuse 8 not measured: trained alone (fuse 1)")
    # other settings are never stood in for by a fused row: bf16 fused -> bf16 alone -> none here
    assert cal.train_speed("DiT-T/1", "G,G,G,G,G,G", 8, 8, "bf16", False, 1, fuse=2) is None


def test_dry_run_prices_groups_at_their_measured_trial_steps(tmp_path, monkeypatch):
    from ditsweep.sweep.estimate import plan_summary
    monkeypatch.setenv("DITSWEEP_CALIBRATION_DIR", str(tmp_path))
    calibration(tmp_path, {2: 1.5})
    # 4 trials x 3600 steps: alone 0.5 GPU-h each = 2.0; fused in 2 groups of 2 at 1.5 steps/s of
    # the group (3 trial-steps/s): 3600 / 1.5 / 3600 = 0.667 h per group, 1.33 in all
    sweep, trials = sweep_with(fuse=1)
    assert "total: 2.0 GPU-hours" in plan_summary(sweep, trials)
    sweep, trials = sweep_with(fuse=2)
    text = plan_summary(sweep, trials)
    assert "total: 1.3 GPU-hours" in text
    assert "fuse: k = 2 (resources.fuse); 4 trials fused into 2 groups (2, 2 members)" in text
    assert "3 trial-steps/s per GPU, 4 trials: measured on Test GPU 9000" in text
    # k = 4 was not measured: the line says so and prices them alone (no guessed gain)
    sweep, trials = sweep_with(fuse=4)
    text = plan_summary(sweep, trials)
    assert "total: 2.0 GPU-hours" in text
    assert "fuse 4 not measured for 4 of them in test-gpu-9000.json: priced as trained alone" in text


def test_auto_picks_the_k_with_the_most_trial_steps(tmp_path, monkeypatch):
    from ditsweep.config.schema import Resources
    from ditsweep.sweep.estimate import choose_fuse, fuse_size, plan_summary
    # trial-steps/s: k=1 2.0, k=2 3.0, k=4 3.2, k=8 2.4 (memory-bound): 4 wins
    cal = calibration(tmp_path, {2: 1.5, 4: 0.8, 8: 0.3})
    sweep, trials = sweep_with(fuse="auto")
    assert choose_fuse(sweep.resources, cal, trials) == 4
    assert choose_fuse(sweep.resources, cal) == 4  # from the fused rows' own settings
    assert choose_fuse(Resources(fuse=3), cal) == 3  # a number is kept as it is
    assert choose_fuse(Resources(gpu="Nobody's GPU", fuse="auto")) == 1  # no calibration file
    # trials at a setting no fused row measured (bf16): no k is proven faster, so 1
    bf16 = [t.model_copy(update={"train": t.train.model_copy(update={"precision": "bf16"})}) for t in trials]
    assert choose_fuse(sweep.resources, cal, bf16) == 1
    monkeypatch.setenv("DITSWEEP_CALIBRATION_DIR", str(tmp_path))
    assert "fuse: k = 4 (auto: the best measured trial-steps/s in test-gpu-9000.json)" in plan_summary(sweep, trials)
    # the driver groups by the same k (fuse_size); a CPU sweep's auto is 1: no CPU row is fused
    assert fuse_size(sweep, trials) == 4
    cpu = sweep.model_copy(update={"resources": sweep.resources.model_copy(update={"gpus_per_trial": 0})})
    assert fuse_size(cpu, trials) == 1
    assert fuse_size(sweep_with(fuse=3)[0], trials) == 3


def test_estimate_prints_several_sweeps_and_their_total(capsys, monkeypatch):
    """The five paper sweeps' total on the shipped H200 file (tf32, uncompiled, alone, as the
    README states), and the same with fuse 4, which no shipped file has measured."""
    from ditsweep.sweep.estimate import main
    monkeypatch.delenv("DITSWEEP_CALIBRATION_DIR", raising=False)
    paper = [str(REPO / "sweeps" / f"{n}.yaml") for n in
             ("local_vs_global", "placement", "window_size", "dit_vs_unet", "param_reduction")]
    assert main(paper + ["--gpu", "NVIDIA H200"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("total of 5 sweeps: 3,786.5 GPU-hours")
    assert sum(1 for line in out.splitlines() if " trials, " in line) == 5
    assert main(paper[:1] + ["--gpu", "NVIDIA H200", "--fuse", "4"]) == 0
    out = capsys.readouterr().out
    assert "fuse 3, 4 not measured for 72 of them in nvidia-h200.json: priced as trained alone" in out
    assert "1,841.5 GPU-hours" in out  # the same as unfused: nothing was assumed faster
    with pytest.raises(SystemExit) as bad:  # a bad --fuse names the option and the value
        main(paper[:1] + ["--fuse", "four"])
    assert bad.value.code == 2 and "--fuse: 'four' is neither a positive whole number nor auto" in capsys.readouterr().err


def test_drift_verdict_compares_bf16_with_the_seed_spread():
    from ditsweep.bench.gpu_fused import drift_verdict

    def run(curve, gap):
        return {"loss_windows": curve, "psnr_gap_mean": gap, "window": 100, "steps": 400, "n_train": 100}
    ref = run([1.0, 0.5, 0.4, 0.30], 1.00)
    seed1 = run([1.1, 0.6, 0.45, 0.32], 1.20)   # spread: loss 0.0675, last 0.02, gap 0.2 dB
    close = drift_verdict({("tf32", 0): ref, ("tf32", 1): seed1, ("bf16", 0): run([1.0, 0.51, 0.4, 0.301], 1.05)})
    assert close["within_spread"] and close["loss_seed1_vs_seed0"] == pytest.approx(0.0675)
    assert close["gap_bf16_vs_tf32_db"] == pytest.approx(0.05) and "bf16 WITHIN" in close["line"]
    late = drift_verdict({("tf32", 0): ref, ("tf32", 1): seed1, ("bf16", 0): run([1.0, 0.5, 0.4, 0.35], 1.0)})
    assert not late["within_spread"]  # a mean inside the spread, a last quarter outside it
    gap = drift_verdict({("tf32", 0): ref, ("tf32", 1): seed1, ("bf16", 0): run([1.0, 0.5, 0.4, 0.3], 1.5)})
    assert not gap["within_spread"] and "NOT within" in gap["line"]


def test_bench_fused_phase_writes_calibration_rows_with_k(tmp_path):
    """`bench --gpu --phases fused` on CPU (SMOKE sizes): FusedTrainer rows for k = 1, 2 that the
    calibration file keeps with their k and the estimate reads back."""
    from ditsweep.bench.gpu import run
    run(["--smoke", "--out", str(tmp_path), "--phases", "fused,write", "--fused", "global:fp32:off",
         "--fuse-ks", "1,2", "--iters", "1", "--warmup", "0"])
    rows = [json.loads(line) for line in (tmp_path / "bench_gpu.jsonl").read_text().splitlines()]
    fused = [r for r in rows if r["kind"] == "fused"]
    assert [r["fuse"] for r in fused] == [1, 2] and all("error" not in r for r in fused)
    assert fused[1]["trial_steps_per_second"] == pytest.approx(2 * fused[1]["steps_per_second"])
    cal = Calibration.load(tmp_path / "cpu.json")
    fig = cal.train_speed("DiT-T/1", "G,G,G,G,G,G", 8, 4, "fp32", False, 1, fuse=2)
    assert fig.measured and fig.value == pytest.approx(fused[1]["trial_steps_per_second"])
