"""Evaluation deadlines: a job's deadline grows with its size, and a job that hangs has its actor
killed after the deadline and is retried, then recorded as a failure while the trial finishes."""

import os
import signal
import subprocess
import time

import pytest
from conftest import PYTHON, tiny_sweep, write_sweep
from mlflow.tracking import MlflowClient
from procs import descendants, stop

from ditsweep.config import EvalActorSettings, Sweep, expand
from ditsweep.eval.deadline import job_deadline


def test_deadline_scales_with_images_steps_and_metric():
    sweep = tiny_sweep(name="d", eval={"psnr_gap": {"num_images": 8, "steps": 5}})
    sweep["grid"]["n_train"] = [100]
    trial = expand(Sweep.model_validate(sweep))[0].model_dump()
    settings = EvalActorSettings(deadline_min_s=1e-9, deadline_scale=1)
    small = job_deadline(trial, ["psnr_gap"], settings)
    trial["eval"]["psnr_gap"]["num_images"] = 80
    assert job_deadline(trial, ["psnr_gap"], settings) == pytest.approx(10 * small)  # 10x the images
    trial["eval"]["psnr_gap"]["steps"] = 50
    assert job_deadline(trial, ["psnr_gap"], settings) == pytest.approx(100 * small)  # and the steps
    more = job_deadline(trial, ["psnr_gap", "samples"], settings)
    assert more > job_deadline(trial, ["psnr_gap"], settings)  # another metric adds its share
    assert job_deadline(trial, ["psnr_gap"], EvalActorSettings(deadline_min_s=1e6)) == 1e6  # the floor
    assert job_deadline(trial, ["psnr_gap"], EvalActorSettings(deadline_scale=0)) is None   # off


@pytest.mark.slow
def test_a_hung_evaluation_is_killed_after_its_deadline_retried_and_recorded(tmp_path):
    sweep = tiny_sweep(name="hang", eval={
        "psnr_gap": {"num_images": 8, "steps": 20}, "attention": {"enabled": False},
        "samples": {"enabled": False},
        "actors": {"count": 1, "max_retries": 1, "deadline_min_s": 2, "deadline_scale": 0.01}})
    path = write_sweep(tmp_path, sweep)
    driver = subprocess.Popen([PYTHON, "-m", "ditsweep.run", str(path)], cwd=tmp_path,
                              stdout=open(tmp_path / "driver.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    stopped: set[int] = set()
    try:
        # Hang every evaluation job the moment it starts: SIGSTOP its actor process (Ray titles an
        # actor's process `ray::EvalWorker.run` while it runs that method).
        while driver.poll() is None:
            for pid, cmd in descendants(driver.pid):
                if "ray::EvalWorker.run" in cmd and pid not in stopped:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.add(pid)
            time.sleep(0.05)
        log = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 0, log[-3000:]  # the trial finished: evaluation never fails it
    finally:
        stop(driver)
    assert len(stopped) == 2  # the first attempt and its one retry, each on a new actor
    for pid in stopped:  # both hung actors were killed, not left stopped
        assert not os.path.exists(f"/proc/{pid}") or "T" not in open(f"/proc/{pid}/stat").read().split()[2]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hang")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("ditsweep.role") == "trial"]
    assert run.info.status == "FINISHED"
    failure = run.data.tags["ditsweep.eval_failure"]
    assert "gave up after 2 attempts in" in failure and failure.count("deadline of 2 s") == 2, failure
    (took,) = client.get_metric_history(run.info.run_id, "eval_seconds_job")
    assert took.value >= 4  # two deadlines of 2 s
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval_attempts")] == [2]
    assert "psnr_gap_mean" not in run.data.metrics
