"""Pre-flight (`python -m ditsweep.run SWEEP.yaml --check`): passes on a local Ray and on a head
started with `ray start --head`; exits 2 with one clear line per problem when the tracking server
is down, a manifest is missing, or the working directory is too big to submit."""

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PYTHON, tiny_sweep, write_sweep
from ditsweep.preflight import working_dir_checks
from procs import free_port

RAY = str(Path(sys.executable).parent / "ray")


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # 150 MB on paper, no blocks on disk
    return path


def test_working_dir_check_names_the_offenders_and_honours_ignore_files(tmp_path):
    (tmp_path / "ditsweep").mkdir()
    (tmp_path / "ditsweep" / "run.py").write_text("print()\n")
    (tmp_path / "ray_results").mkdir()
    sparse_file(tmp_path / "ray_results" / "big.ckpt", 150 * 10**6)
    check = working_dir_checks(tmp_path)
    assert check.ok is False
    assert "ray_results/ 143.1 MiB" in check.detail and "ray_results/big.ckpt" in check.detail
    (tmp_path / ".gitignore").write_text("ray_results/\n")  # Ray honours .gitignore...
    assert working_dir_checks(tmp_path).ok is True
    (tmp_path / ".gitignore").unlink()
    (tmp_path / ".rayignore").write_text("*.ckpt\n")  # ...and .rayignore
    assert working_dir_checks(tmp_path).ok is True


@pytest.mark.slow
def test_check_passes_locally_and_fails_with_exit_2_naming_each_problem(tmp_path, monkeypatch, capsys):
    import ray

    from ditsweep.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    good = write_sweep(tmp_path, tiny_sweep(name="preflight"), "good.yaml")
    bad_sweep = tiny_sweep(name="preflight-bad", tracking={"uri": f"http://127.0.0.1:{free_port()}"})
    bad_sweep["grid"]["dataset"] = [str(tmp_path / "no-such-dataset")]
    bad = write_sweep(tmp_path, bad_sweep, "bad.yaml")
    try:
        start = time.monotonic()
        assert main([str(good), "--check"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"versions\s+ok", out) and re.search(r"mlflow\s+ok", out)
        assert re.search(r"natten\s+n/a\s+not applicable", out)
        assert "preflight passed" in out and not (tmp_path / "ray_results" / "preflight").exists()

        sparse_file(tmp_path / "model.ckpt", 150 * 10**6)
        assert main([str(bad), "--check"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("preflight FAILED on ")]
        assert len(lines) == 3, err
        assert any(": mlflow: " in line and "127.0.0.1" in line for line in lines), lines
        assert any(f": data {tmp_path / 'no-such-dataset'}: " in line and "manifest" in line
                   for line in lines), lines
        assert any(line.startswith("preflight FAILED on driver: working dir: ") and "model.ckpt 143.1 MiB"
                   in line for line in lines), lines
        print(f"two checks took {time.monotonic() - start:.1f} s")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_check_passes_on_a_ray_start_head_cluster(tmp_path):
    """A real `ray start --head` on free loopback ports and its own temp dir. It runs with
    --block in its own session, so it is stopped by signalling that session: never `ray stop`,
    which would stop every Ray on the machine."""
    gcs_port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp", dir="/tmp"))  # Unix socket paths must be short
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", str(ray_tmp),
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port",
         str(free_port()), "--runtime-env-agent-port", str(free_port()),
         "--metrics-export-port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        write_sweep(tmp_path, tiny_sweep(name="onhead"), "sweep.yaml")
        for _ in range(60):  # the head takes a while to accept drivers
            check = subprocess.run([PYTHON, "-m", "ditsweep.run", "sweep.yaml", "--check"], cwd=tmp_path,
                                   env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
                                   capture_output=True, text=True, timeout=300)
            if check.returncode == 0 or "preflight" in check.stdout:
                break
            time.sleep(2)
        assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
        assert "preflight passed" in check.stdout, check.stdout
        assert re.search(r"\(cpu\)\s+versions\s+ok", check.stdout), check.stdout
        assert re.search(rf"Connecting to existing Ray cluster at address: [\d.]+:{gcs_port}\b", check.stderr)
        assert "Started a local Ray instance" not in check.stderr  # the head, not a Ray of its own
    finally:
        _stop_head(head, ray_tmp)


def _stop_head(head: subprocess.Popen, ray_tmp: Path) -> None:
    """SIGTERM to the `ray start --block` session (it stops the processes it started), then
    SIGKILL to anything still running from this head's temp dir: those are ours alone."""
    import signal
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(ray_tmp).encode() in cmd and entry.stat().st_uid == os.getuid():
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
