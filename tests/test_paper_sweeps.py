"""The paper's sweeps: valid, the promised size, datasets under one variable, and a dry run that
prints the plan without opening any dataset (no S3 credentials needed)."""

import subprocess

import pytest

from conftest import PYTHON, REPO
from ditsweep.spec import expand, load_sweep

PAPER = {"local_vs_global": 72, "placement": 42, "window_size": 42, "dit_vs_unet": 24,
         "param_reduction": 12}


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
    # 72 trials * 400k steps / 10 steps/s = 800 GPU-hours
    assert "800.0 GPU-hours" in proc.stdout
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()
