"""`ray job submit` against a Ray head started with `ray start --head` on loopback: the same
entry point and YAML as on a laptop, with results in a real `mlflow server`."""

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_sweep, write_sweep
from procs import free_port, mlflow_server, stop, stop_ray_head

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def test_ray_job_submit_runs_the_sweep(tmp_path):
    mlflow_port, dashboard_port, gcs_port = free_port(), free_port(), free_port()
    server = mlflow_server(tmp_path / "mlflow.db", tmp_path / "artifacts", mlflow_port)
    uri = f"http://127.0.0.1:{mlflow_port}"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    sweep = tiny_sweep(name="submitted")  # one trial: the cluster path, not the grid, is tested here
    write_sweep(job_dir, sweep, "sweep.yaml")
    # The head inherits this environment: the tracking URI comes from MLFLOW_TRACKING_URI.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # Unix socket paths must be short
    # Ray 2.59+ protects local clusters with a token: head and client share one here.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_TMPDIR": str(ray_tmp),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--num-cpus", "2", "--include-dashboard", "true", "--temp-dir", str(ray_tmp),
         # explicit free ports: the defaults collide with any other Ray on the machine
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port",
         str(free_port()), "--runtime-env-agent-port", str(free_port()),
         "--metrics-export-port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        # The pre-flight, by hand, against this head (it also runs by itself under job submit).
        check = subprocess.run([sys.executable, "-m", "ditsweep.run", "sweep.yaml", "--check"],
                               cwd=job_dir, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
                               capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
        assert "preflight passed" in check.stdout and "versions" in check.stdout, check.stdout
        assert f":{gcs_port}" in check.stderr and "Started a local Ray instance" not in check.stderr
        for _ in range(30):  # the head's job agent needs a moment after `ray start`
            submit = subprocess.run(
                [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
                 "--working-dir", str(job_dir), "--", "python", "-m", "ditsweep.run", "sweep.yaml"],
                env=env, capture_output=True, text=True, timeout=600)
            out = submit.stdout + submit.stderr
            if "No available agent" not in out:
                break
            time.sleep(2)
        assert submit.returncode == 0, out[-4000:]
        assert "succeeded" in out and "1/1 trials finished" in out, out[-3000:]
        assert "preflight passed" in out, out[-3000:]  # on a cluster it runs by itself, first
        listing = subprocess.run([RAY, "job", "list", "--address", f"http://127.0.0.1:{dashboard_port}"],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert "SUCCEEDED" in listing.stdout

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("submitted")
        runs = client.search_runs([exp.experiment_id])
        trials = [r for r in runs if r.data.tags.get("ditsweep.role") == "trial"]
        assert len(trials) == 1 and all(r.info.status == "FINISHED" for r in trials)
        assert all("psnr_gap_mean" in r.data.metrics for r in trials)
    finally:
        stop_ray_head(ray_tmp)
        stop(server)
