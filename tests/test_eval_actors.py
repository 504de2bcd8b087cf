"""The evaluation pool end to end: a sweep whose trials are evaluated by Ray actors in other
processes, with every metric and figure in MLflow; and a worker killed in the middle of a job,
which is replaced, the job re-run, and its values logged exactly once."""

import io
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from conftest import PYTHON, tiny_sweep, write_sweep
from mlflow.tracking import MlflowClient
from rich.console import Console

from ditsweep.eval.fid import write_random_inception_weights
from ditsweep.sweep.progress import SweepProgress

pytestmark = pytest.mark.slow


def test_sweep_trials_are_evaluated_by_actors_in_other_processes(tmp_path):
    weights = write_random_inception_weights(tmp_path / "inception-random.pth")
    sweep = tiny_sweep(name="eval-e2e", eval={
        "psnr_gap": {"num_images": 8, "steps": 5, "every": 3},
        "fid": {"enabled": True, "num_samples": 16, "sampling_steps": 10, "batch_size": 16,
                "feature_extractor_weights_path": str(weights)},
        "attention": {"num_images": 4, "timesteps": [500]},
        "jacobian": {"enabled": True, "num_eigenvalues": 8, "num_eigenvectors": 4},
        "samples": {"num_images": 16, "sampling_steps": 10},
    })
    sweep["grid"]["model"] = ["DiT-T/1", "UNet-T"]
    sweep["grid"]["layout"] = ["local"]
    proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(write_sweep(tmp_path, sweep))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 trials finished" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("000_", "001_"))]
    assert len(rows) == 2 and all(re.search(r"\d\.\d{4}\s+done$", r) for r in rows), rows  # PSNR gap via Tune

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eval-e2e")
    runs = {r.data.params["arch"]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("ditsweep.role") == "trial"}
    assert set(runs) == {"dit", "unet"}
    for arch, run in runs.items():
        run_id, tags = run.info.run_id, run.data.tags
        assert run.info.status == "FINISHED"
        assert "ditsweep.eval_failure" not in tags, tags["ditsweep.eval_failure"]
        # The evaluation ran in an actor, not in the trial's process.
        assert tags["ditsweep.evaluator_pid"] != tags["ditsweep.trial_pid"]

        def steps(key):
            return sorted(m.step for m in client.get_metric_history(run_id, key))

        assert steps("psnr_gap_mean") == [3, 6]  # every 3 steps, and the final one
        assert steps("fid") == [6] and steps("jacobian_top_eigenvalue_t100") == [6]
        assert len(steps("psnr_gap_t")) == 5 and steps("jacobian_eigenvalue_t100") == list(range(8))
        assert [m.value for m in client.get_metric_history(run_id, "eval_attempts")] == [1, 1]
        artifacts = {a.path for folder in (None, "attention", "jacobian", "samples")
                     for a in client.list_artifacts(run_id, folder)}
        assert {"psnr_gap.png", "jacobian/eigenvectors_step000006_t100.png",
                "samples/samples_step000006.png"} <= artifacts
        if arch == "dit":
            assert steps("attn_distance_layer1") == [6] and steps("attn_mass7_layer6") == [6]
            assert run.data.metrics["attn_mass3_layer1"] == pytest.approx(1.0, abs=1e-5)  # 3x3 block
            assert {"attention/maps_step000006_t500.png", "attention/query_step000006_t500.png"} <= artifacts
        else:
            assert not any(k.startswith("attn_") for k in run.data.metrics)  # UNets: skipped


def test_a_killed_worker_is_replaced_and_its_job_retried_and_logged_once(tmp_path):
    import ray

    from ditsweep.config import Sweep, expand
    from ditsweep.eval.actors import start_pool, stop_pool
    from ditsweep.eval.jobs import EvalJob
    from ditsweep.models import build_model
    from ditsweep.tracking import TrialRun

    # A Jacobian at 16x16 (768 backward passes of a DiT) takes tens of seconds: a job that is
    # naturally slow enough to be killed in the middle.
    sweep = Sweep.model_validate(tiny_sweep(
        name="kill", data={"resolution": 16}, tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        eval={"psnr_gap": {"enabled": False}, "attention": {"enabled": False},
              "samples": {"enabled": False}, "jacobian": {"enabled": True, "num_eigenvalues": 4},
              "actors": {"count": 1, "max_retries": 2}}))
    cfg = expand(sweep)[0]
    run = TrialRun(cfg.tracking_uri, cfg.experiment, None, cfg.trial, {})
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=16, layout=cfg.layout)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = start_pool(sweep, local=True)
        job = EvalJob(cfg.model_dump(), run.run_id, 10, True, ["jacobian"], ray.put(model.state_dict()))
        ref = pool.evaluate.remote(job)
        deadline = time.monotonic() + 60
        while not (running := ray.get(pool.status.remote())["running"]):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.2)
        victim = next(iter(running.values()))
        time.sleep(1.0)
        assert not ray.wait([ref], timeout=0)[0], "the job finished before the kill: make it slower"
        os.kill(victim["pid"], signal.SIGKILL)

        result = ray.get(ref, timeout=300)
        assert result.failures == {} and result.attempts == 2
        assert result.evaluator["pid"] != victim["pid"]
        counts = ray.get(pool.status.remote())["counts"]
        assert counts["workers_replaced"] == 1 and counts["retried_jobs"] == 1
        # the sweep's log says so at once (the value logged once in MLflow cannot show it)
        out = io.StringIO()
        progress = SweepProgress({cfg.trial: 10}, pool=pool, console=Console(file=out, force_terminal=False))
        progress.setup()
        progress.on_experiment_end([])  # asks the pool and prints what a log shows
        assert ("evaluation pool: 1 evaluator(s) replaced (0 past a deadline, the rest died), "
                "1 job(s) retried and done, 0 failed") in out.getvalue(), out.getvalue()
        stop_pool(pool)
    finally:
        ray.shutdown()

    client = MlflowClient(cfg.tracking_uri)
    assert len(client.get_metric_history(run.run_id, "jacobian_top_eigenvalue_t100")) == 1
    assert len(client.get_metric_history(run.run_id, "jacobian_eigenvalue_t100")) == 4
    assert [m.value for m in client.get_metric_history(run.run_id, "eval_attempts")] == [2]
    assert "ditsweep.eval_failure" not in client.get_run(run.run_id).data.tags


def test_the_progress_view_shows_a_final_evaluation_as_soon_as_it_is_queued(tmp_path, monkeypatch):
    """A trial at its last step is `evaluating` before its final job reaches the pool (the
    trainable reports the step, then submits); the view asks the pool again at once and keeps
    asking every FAST_POLL_SECONDS until the job shows, not at the next POLL_SECONDS."""
    import io

    import ray
    from ray.tune.experiment import Trial
    from rich.console import Console

    from ditsweep.config import Sweep, expand
    from ditsweep.eval.actors import start_pool, stop_pool
    from ditsweep.eval.jobs import EvalJob
    from ditsweep.models import build_model
    from ditsweep.sweep import progress as progress_module
    from ditsweep.tracking import TrialRun

    monkeypatch.setattr(progress_module, "POLL_SECONDS", 3600.0)  # no routine poll in this test
    sweep = Sweep.model_validate(tiny_sweep(
        name="view", tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        eval={"psnr_gap": {"num_images": 8, "steps": 5}, "attention": {"enabled": False},
              "samples": {"enabled": False}, "actors": {"count": 1}}))
    cfg = expand(sweep)[0]
    run = TrialRun(cfg.tracking_uri, cfg.experiment, None, cfg.trial, {})
    model = build_model(cfg.model, image_size=8, layout=cfg.layout)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = start_pool(sweep, local=True)
        log = io.StringIO()  # not a terminal: the view prints a line per status change
        view = progress_module.SweepProgress({cfg.trial: cfg.train.steps}, pool=pool,
                                             console=Console(file=log, force_terminal=False))
        view.setup()
        trial = Trial("ditsweep", stub=True, config={"trial_config": {"trial": cfg.trial}})
        view.on_trial_start(0, [trial], trial)
        view._poll_pool(wait=10)  # the start's poll answered: the pool has no job of this trial
        assert view.views[cfg.trial].evals() == "-"

        view.on_trial_result(0, [trial], trial, {"step": cfg.train.steps, "loss": 0.1})
        assert view.views[cfg.trial].status == "evaluating"
        ref = pool.evaluate.remote(EvalJob(cfg.model_dump(), run.run_id, cfg.train.steps, True,
                                           ["psnr_gap"], ray.put(model.state_dict())))
        submitted = time.monotonic()
        while view.views[cfg.trial].evals() == "-" and time.monotonic() - submitted < 30:
            view.on_step_end(0, [trial])  # Tune calls it on every turn of its loop
            time.sleep(0.02)
        shown = time.monotonic() - submitted
        jobs = view.views[cfg.trial].jobs
        assert sum(jobs.get(k, 0) for k in ("queued", "running", "done")) == 1, jobs
        assert shown < 2.0, f"the final job showed after {shown:.1f} s"

        def line(status: str) -> str:
            """The log's line of `status`, once the view has printed it (it waits for the pool)."""
            since = time.monotonic()
            while time.monotonic() - since < 30:
                view.on_step_end(0, [trial])
                found = [s for s in log.getvalue().splitlines() if f": {status}, " in s]
                if found:
                    assert len(found) == 1, found
                    return found[0]
                time.sleep(0.02)
            raise AssertionError(f"no {status} line in {log.getvalue()!r}")
        # The evaluating line shows the final job queued or running (or done), never "-".
        assert re.search(r"evaluating, .* evals queued/running/done [01]/[01]/[01]$", line("evaluating"))
        assert ray.get(ref, timeout=120).failures == {}
        trial.run_metadata.last_result = {"step": cfg.train.steps, "loss": 0.1, "mlflow_run_id": run.run_id}
        view.on_trial_result(0, [trial], trial, trial.last_result)
        assert line("done").endswith("evals queued/running/done 0/0/1")  # the job counted done
        stop_pool(pool)
    finally:
        ray.shutdown()
