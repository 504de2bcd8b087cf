"""Evaluation jobs without Ray: scheduling, computing a job, logging its values exactly once."""

import pytest
import torch
from conftest import tiny_sweep
from mlflow.tracking import MlflowClient

from ditsweep.config import EvalActorSettings, EvalSettings, Sweep, expand
from ditsweep.eval.actors import check_fits, record_result
from ditsweep.eval.jobs import METRICS, EvalJob, EvalResult, metrics_due, run_job
from ditsweep.models import build_model
from ditsweep.tracking import TrialRun


def trial(tmp_path, model="DiT-T/1", resolution=8, **eval_settings):
    sweep = tiny_sweep(name="jobs", eval={"psnr_gap": {"num_images": 4, "steps": 3},
                                          "attention": {"num_images": 2, "timesteps": [500]},
                                          "samples": {"num_images": 4, "sampling_steps": 3},
                                          "jacobian": {"enabled": True, "num_eigenvalues": 5},
                                          **eval_settings},
                       tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    sweep["grid"]["model"] = [model]
    sweep["grid"]["layout"] = ["local"]  # 3,5,7,G,G,G
    sweep["data"] = {"resolution": resolution}
    cfg = expand(Sweep.model_validate(sweep))[0]
    run = TrialRun(cfg.tracking_uri, cfg.experiment, None, cfg.trial, {})
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=resolution, layout=None if cfg.arch != "dit" else cfg.layout)
    for p in model.parameters():  # a model that does something (zero-init output layers otherwise)
        torch.nn.init.normal_(p, std=0.02)
    return cfg, run, model


def test_metrics_due_every_n_steps_and_all_at_the_end():
    settings = EvalSettings.model_validate({"psnr_gap": {"every": 100}, "samples": {"every": 50},
                                            "jacobian": {"enabled": True}})
    assert metrics_due(settings, 50, final=False) == ["samples"]
    assert metrics_due(settings, 100, final=False) == ["psnr_gap", "samples"]
    assert metrics_due(settings, 30, final=False) == []
    assert metrics_due(settings, 130, final=True) == ["psnr_gap", "attention", "jacobian", "samples"]


def test_a_final_job_computes_every_metric_and_uploads_the_figures(tmp_path):
    cfg, run, model = trial(tmp_path)
    job = EvalJob(cfg.model_dump(), run.run_id, 6, True, ["psnr_gap", "attention", "jacobian", "samples"],
                  model.state_dict())
    result = run_job(job, model.state_dict())
    assert result.failures == {}
    assert {"psnr_gap_mean", "attn_distance_layer1", "attn_mass3_layer6", "attn_mass7_layer3",
            "jacobian_top_eigenvalue_t100", "jacobian_asymmetry_t100"} <= set(result.scalars)
    assert result.scalars["attn_mass3_layer1"] == pytest.approx(1.0, abs=1e-5)  # local layout: 3x3 first
    assert len(result.series["psnr_gap_t"][0]) == 3 and len(result.series["jacobian_eigenvalue_t100"][1]) == 5
    client = MlflowClient(cfg.tracking_uri)
    uploaded = {a.path for folder in ("", "attention", "jacobian", "samples")
                for a in client.list_artifacts(run.run_id, folder or None)}
    assert {"psnr_gap.png", "attention/maps_step000006_t500.png", "attention/query_step000006_t500.png",
            "jacobian/eigenvectors_step000006_t100.png", "samples/samples_step000006.png"} <= uploaded
    assert set(result.seconds) == {"psnr_gap", "attention", "jacobian", "samples"}


def test_unet_skips_attention_and_a_failing_metric_does_not_stop_the_others(tmp_path):
    cfg, run, model = trial(tmp_path, model="UNet-T", resolution=32)
    job = EvalJob(cfg.model_dump(), run.run_id, 4, False, ["attention", "jacobian", "samples"],
                  model.state_dict())
    result = run_job(job, model.state_dict())
    assert not any(k.startswith("attn_") for k in result.scalars)  # skipped, not failed
    assert set(result.failures) == {"jacobian"} and "up to 16x16" in result.failures["jacobian"]
    assert "samples/samples_step000004.png" in result.artifacts


def test_values_are_logged_once_even_when_a_job_is_recorded_twice(tmp_path):
    cfg, run, _ = trial(tmp_path)
    job = EvalJob(cfg.model_dump(), run.run_id, 200, True, [], None)
    result = EvalResult(step=200, final=True, scalars={"psnr_gap_mean": 1.5},
                        series={"psnr_gap_t": ([0, 500, 999], [3.0, 1.0, 0.5])},
                        failures={"fid": "ValueError: no weights"}, seconds={"psnr_gap": 2.0},
                        evaluator={"pid": 123, "host": "h"}, attempts=2)
    record_result(job, result)
    record_result(job, result)  # e.g. a restarted trial re-submitted its final evaluation
    client = MlflowClient(cfg.tracking_uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "psnr_gap_mean")] == [(200, 1.5)]
    assert len(client.get_metric_history(run.run_id, "psnr_gap_t")) == 3
    assert [m.value for m in client.get_metric_history(run.run_id, "eval_attempts")] == [2]
    tags = client.get_run(run.run_id).data.tags
    assert tags["ditsweep.evaluator_pid"] == "123"
    assert tags["ditsweep.eval_failure"] == "step 200 (final) fid: ValueError: no weights"


def test_a_pool_that_leaves_no_room_for_a_trial_is_refused():
    cluster = {"CPU": 2.0}
    check_fits(EvalActorSettings(count=2, cpus=0), 1, 0, cluster)  # shares cores: always fits
    check_fits(EvalActorSettings(count=1, cpus=1), 1, 0, cluster)
    with pytest.raises(ValueError, match=r"eval\.actors reserves 2 x 1 = 2 CPUs.*cpus_per_trial"):
        check_fits(EvalActorSettings(count=2, cpus=1), 1, 0, cluster)
    with pytest.raises(ValueError, match="GPU"):
        check_fits(EvalActorSettings(count=2, gpus=0.5), 1, 1, {"CPU": 8.0, "GPU": 1.0})
    check_fits(EvalActorSettings(count=2, cpus=1), 1, 0, cluster, strict=False)  # a cluster may grow


def test_every_metric_has_a_settings_section():
    assert all(hasattr(EvalSettings(), name) for name in METRICS)
