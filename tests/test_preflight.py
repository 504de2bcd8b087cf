"""Pre-flight (`python -m ditsweep.run SWEEP.yaml --check`): passes on a local Ray (and on a head
started with `ray start --head`: tests/test_job_submit.py); exits 2 with one clear line per
problem when the tracking server is down, a manifest is missing, or the working directory is too
big to submit."""

import re
import time
from pathlib import Path

import pytest
from conftest import tiny_sweep, write_sweep
from procs import free_port

from ditsweep.sweep.preflight import working_dir_checks


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

    from ditsweep.sweep.main import main

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
