"""End to end: `python -m ditsweep.run` runs a tiny sweep through Ray Tune on a local Ray, and
the results are read back from MLflow: one parent run, a child run per trial, with params,
metrics, curves and the plot."""

import subprocess

import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, tiny_sweep, write_sweep

pytestmark = pytest.mark.slow


def test_tiny_sweep_through_tune_lands_in_mlflow(tmp_path):
    sweep = tiny_sweep(name="e2e")
    sweep["grid"]["layout"] = ["global", "local"]
    path = write_sweep(tmp_path, sweep)
    proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 trials finished" in proc.stdout
    assert "mean PSNR gap" in proc.stdout and "3,5,7,G,G,G" in proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ditsweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ditsweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED"
    assert {r.data.params["layout"] for r in children} == {"G,G,G,G,G,G", "3,5,7,G,G,G"}
    for run in children:
        assert run.data.tags["ditsweep.sweep_run_id"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["n_train"] == "10" and params["dataset"] == "builtin:photos"
        assert params["model"] == "DiT-T/1" and params["train.steps"] == "6"
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [2, 4, 6]
        gap = client.get_metric_history(run.info.run_id, "psnr_gap_mean")
        assert [m.step for m in gap] == [6]
        for curve in ("psnr_train_t", "psnr_test_t", "psnr_gap_t"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, curve))
            assert len(steps) == 5 and steps[0] == 0 and steps[-1] == 999
        gap_curve = client.get_metric_history(run.info.run_id, "psnr_gap_t")
        mean_gap = sum(m.value for m in gap_curve) / len(gap_curve)
        assert abs(mean_gap - gap[0].value) < 1e-9
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "psnr_gap.png" in artifacts
