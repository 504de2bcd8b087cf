"""The paper's sweeps: valid, the promised size, datasets under one variable, and a dry run that
prints the plan without opening any dataset (no S3 credentials needed)."""

import subprocess

import pytest
from conftest import PYTHON, REPO

from ditsweep.config import expand, load_sweep

PAPER = {"local_vs_global": 72, "placement": 42, "window_size": 42, "dit_vs_unet": 24,
         "param_reduction": 12, "local_vs_global_dagger": 48, "pca_components": 1}
# Where the paper reports FID (Tables 1, 2, 3, 5): N = 10^4 and 10^5 only. Fig. 2 / Fig. 3
# (dit_vs_unet) and the PCA components (Appendix C stage 1) have none.
FID_AT = {"local_vs_global": {10000, 100000}, "placement": {10000, 100000},
          "window_size": {10000, 100000}, "param_reduction": {10000, 100000},
          "local_vs_global_dagger": {10000, 100000}, "dit_vs_unet": set(), "pca_components": set()}


@pytest.mark.parametrize("name, count", PAPER.items())
def test_paper_sweep_expands(name, count, monkeypatch):
    monkeypatch.setenv("DITSWEEP_DATA_ROOT", "s3://lab-bucket/packed")
    path = REPO / "sweeps" / f"{name}.yaml"
    trials = expand(load_sweep(path, check_data=False), path, check_data=False)
    assert len(trials) == count
    assert all(t.dataset.startswith("s3://lab-bucket/packed/") for t in trials)
    assert all(t.train.steps == 400_000 and t.data.resolution == 32 for t in trials)
    assert len({t.trial for t in trials}) == count


def test_placement_has_head_mix_tail_of_both_local_configurations():
    trials = expand(load_sweep(REPO / "sweeps/placement.yaml", check_data=False), check_data=False)
    layouts = {t.layout_name: t.layout for t in trials}
    assert layouts["local"] == "3,5,7,9,11,13,G,G,G,G,G,G"
    assert layouts["local-tail"] == "G,G,G,G,G,G,3,5,7,9,11,13"
    assert layouts["local9-mix"] == "3,3,3,G,5,5,5,G,7,7,7,G"


def test_dry_run_prints_count_resources_and_gpu_hours(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(REPO / "sweeps/local_vs_global.yaml"),
                           "--dry-run"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "72 trials x 400000 steps; per trial 4 CPU, 1 GPU" in proc.stdout
    # speeds from the shipped H100 calibration (resources.gpu); 36 DiT-XS/1 trials at the
    # measured 3.901 (global) and 4.35 (local) steps/s, tf32 taken as fp32 and said to be assumed
    assert "speeds: calibration file" in proc.stdout and "nvidia-h100-80gb-hbm3.json" in proc.stdout
    assert "3.901 steps/s per trial, 18 trials: assumed: tf32 not measured" in proc.stdout
    assert "measured on NVIDIA H100 80GB HBM3 (2026-11-26)" in proc.stdout
    assert "GPU-hours = training " in proc.stdout and "\nFID: " in proc.stdout
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_param_reduction_runs_exactly_table5():
    trials = expand(load_sweep(REPO / "sweeps/param_reduction.yaml", check_data=False), check_data=False)
    rows = {(t.layout_name, t.variant) for t in trials}
    assert rows == {("global", "standard"), ("local", "standard"), ("global", "weight-sharing"),
                    ("global", "pca-attention")}  # no local + sharing, no local + PCA
    assert {t.n_train for t in trials} == {1000, 10000, 100000} and len(trials) == 4 * 3
    pca = [t for t in trials if t.variant == "pca-attention"]
    source = pca[0].inputs["pca_components"]
    stage1 = expand(load_sweep(REPO / "sweeps/pca_components.yaml", check_data=False), check_data=False)
    assert (source.experiment, source.trial) == ("pca_components", stage1[0].trial)
    assert source.artifact == "attention_pca/components.pt"
    assert stage1[0].eval.attention_pca.enabled and stage1[0].n_train == 100000
    assert all(not t.inputs for t in trials if t.variant != "pca-attention")


def test_dagger_sweep_is_table1s_dagger_setting():
    trials = expand(load_sweep(REPO / "sweeps/local_vs_global_dagger.yaml", check_data=False),
                    check_data=False)
    assert {t.seed for t in trials} == {143} and {t.train.batch_size for t in trials} == {128}
    main = expand(load_sweep(REPO / "sweeps/local_vs_global.yaml", check_data=False), check_data=False)
    assert not {t.dataset for t in trials} & {t.dataset for t in main}  # another shuffle
    assert {t.model for t in trials} == {"DiT-XS/1", "DiT-S/1"}


@pytest.mark.parametrize("name", FID_AT)
def test_dry_run_shows_fid_at_exactly_the_papers_n(name, tmp_path, monkeypatch, capsys):
    """No weights file is needed for a dry run; FID is planned for N = 10^4 and 10^5 only (the
    evaluators follow the same rule: metrics_due with the trial's N)."""
    from ditsweep.eval.jobs import metrics_due
    from ditsweep.sweep.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DITSWEEP_INCEPTION_WEIGHTS", raising=False)
    assert main([str(REPO / "sweeps" / f"{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    trials = expand(load_sweep(REPO / "sweeps" / f"{name}.yaml", check_data=False), check_data=False)
    with_fid = [t for t in trials if "fid" in metrics_due(t.eval, t.train.steps, True, t.n_train)]
    assert {t.n_train for t in with_fid} == FID_AT[name]
    fid_lines = [line for line in out.splitlines() if line.strip().startswith("fid (")]
    if FID_AT[name]:
        ns = ", ".join(map(str, sorted(FID_AT[name])))
        assert fid_lines == [f"  fid (50000 samples x 250 steps vs min(N, 50000) training images): "
                             f"{len(with_fid)} of {len(trials)} trials, at N in {{{ns}}}"]
        assert all(t.eval.fid.sampling_steps == 250 and t.eval.use_ema for t in with_fid)
        assert f"psnr_gap: {len(trials)} of {len(trials)} trials" in out  # the gap at every N
    else:
        assert fid_lines == [] and not with_fid


def test_fid_sweep_needs_the_weights_file_when_it_runs(tmp_path, monkeypatch):
    from ditsweep.config import SpecError

    monkeypatch.delenv("DITSWEEP_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(SpecError, match="feature_extractor_weights_path"):
        load_sweep(REPO / "sweeps/placement.yaml", check_data=True)
