"""A sweep survives ordinary failures: a killed trial worker, a tracking server that goes away
for a few seconds, and a diverging trial (a killed driver: tests/test_reuse.py, the same command
continues the sweep). Every test runs the real
`python -m ditsweep.run` with a local Ray and reads the results back from MLflow."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, tiny_sweep, write_sweep
from procs import descendants, free_port, mlflow_server, stop, wait_for

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # save Tune's experiment state often


def long_sweep(name: str, steps: int = 240, **overrides) -> dict:
    sweep = tiny_sweep(name=name, **overrides)
    sweep["train"].update(steps=steps, log_every=10, checkpoint_every=40)
    sweep["eval"]["psnr_gap"]["steps"] = 3
    return sweep


def start(sweep_path: Path, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "ditsweep.run", str(sweep_path), *args], cwd=cwd, env=ENV,
                            stdout=open(cwd / "driver.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def checkpoints(tmp_path: Path, sweep: str, trial_prefix: str) -> list[Path]:
    return sorted((tmp_path / "ray_results" / sweep).glob(f"{trial_prefix}*/checkpoint_*"))


def trial_runs(tracking_uri: str, experiment: str):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if r.data.tags.get("ditsweep.role") == "trial"], \
        [r for r in runs if r.data.tags.get("ditsweep.role") == "sweep"]


def assert_clean_history(client: MlflowClient, run_id: str, metric: str, expected_steps: list[int]):
    steps = [m.step for m in client.get_metric_history(run_id, metric)]
    assert sorted(steps) == expected_steps, f"{metric}: {sorted(steps)}"  # none missing, none twice


def test_killed_trial_worker_resumes_from_its_checkpoint(tmp_path):
    path = write_sweep(tmp_path, long_sweep("killworker"))
    driver = start(path, tmp_path)
    try:
        wait_for(lambda: checkpoints(tmp_path, "killworker", "000"), 180, "a first checkpoint")
        workers = [pid for pid, cmd in descendants(driver.pid) if "ImplicitFunc" in cmd]
        assert len(workers) == 1, descendants(driver.pid)
        # one trial: one evaluation worker, although eval.actors.count is 2
        assert sum("ray::EvalWorker" in cmd for _, cmd in descendants(driver.pid)) == 1
        os.kill(workers[0], signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        stop(driver)
    client, runs, _ = trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "killworker")
    assert len(runs) == 1  # the restarted trial reattached to its run
    run = runs[0]
    assert run.info.status == "FINISHED"
    resumed = int(run.data.tags["ditsweep.resumed_from_step"])
    assert 0 < resumed < 240 and resumed % 40 == 0
    assert run.data.tags["ditsweep.attempts"] == "2"  # a dead worker is transient: retried once
    assert_clean_history(client, run.info.run_id, "loss", list(range(10, 241, 10)))


def test_tracking_server_outage_loses_no_metric(tmp_path):
    port = free_port()
    backend, artifacts = tmp_path / "server.db", tmp_path / "artifacts"
    server = mlflow_server(backend, artifacts, port)
    uri = f"http://127.0.0.1:{port}"
    sweep = long_sweep("outage", steps=300)
    sweep["tracking"] = {"uri": uri}
    path = write_sweep(tmp_path, sweep)
    driver = start(path, tmp_path)
    try:
        wait_for(lambda: checkpoints(tmp_path, "outage", "000"), 180, "a first checkpoint")
        stop(server)
        time.sleep(8)  # training goes on while nothing answers
        server = mlflow_server(backend, artifacts, port)
        assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        stop(driver)
    try:
        client, runs, _ = trial_runs(uri, "outage")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert_clean_history(client, runs[0].info.run_id, "loss", list(range(10, 301, 10)))
    finally:
        stop(server)


def test_diverged_trial_fails_with_its_reason_and_the_sweep_finishes(tmp_path):
    sweep = tiny_sweep(name="diverge")
    sweep["grid"]["lr"] = [1e-3, 1e5, 1e6]  # the last two blow the loss up: the same failure, flagged
    sweep["train"]["steps"] = 30
    sweep["resources"]["max_failures"] = 3  # a deterministic failure is still not retried
    path = write_sweep(tmp_path, sweep)
    proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(path)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1/3 trials finished" in proc.stdout and "diverged" in proc.stdout
    assert "FAILED (deterministic, not retried): TrainingDiverged" in proc.stdout
    assert "same failure in 2 trials (001_DiT-T-1_global_lr100000_N10_s0, 002_" in proc.stdout, proc.stdout
    client, runs, parents = trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "diverge")
    assert len(runs) == 3
    for run in runs:
        lr = run.data.params["train.lr"]
        if lr == "0.001":
            assert run.info.status == "FINISHED"
            assert "psnr_gap_mean" in run.data.metrics
            assert run.data.tags["ditsweep.attempts"] == "1"
        else:
            assert run.info.status == "FAILED"
            assert "diverged: loss is" in run.data.tags["ditsweep.failure"]
            assert run.data.tags["ditsweep.failure_kind"] == "deterministic"
            assert run.data.tags["ditsweep.attempts"] == "1"  # ran once, not 1 + max_failures times
    assert parents[0].info.status == "FAILED"
