"""The MLflow load test (python -m ditsweep.loadtest) at a CI size: concurrent trial processes
log to the embedded SQLite store and to a real `mlflow server`; no row is lost or duplicated.
The full size (32 processes, 3 minutes) and its figures are in the README."""

import json
import subprocess

import pytest

from conftest import PYTHON

pytestmark = pytest.mark.slow


def test_concurrent_trials_lose_and_duplicate_no_metric_row(tmp_path):
    proc = subprocess.run(
        [PYTHON, "-m", "ditsweep.loadtest", "--procs", "4", "--seconds", "4", "--log-every", "0.1",
         "--flush-every", "0.5", "--server-workers", "1", "--dir", str(tmp_path), "--json",
         str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "result.json").read_text())
    assert set(results) == {"sqlite", "server"}
    for store, r in results.items():
        assert r["crashed"] == [], (store, r["crashed"])
        assert r["expected"] >= 4 * 2 * 10, (store, r)  # every process logged for a while
        assert r["found"] == r["expected"] and r["lost"] == 0 and r["duplicated"] == 0, (store, r)
        assert r["flushes"] >= 4 * 3, (store, r)
    assert "| sqlite | 4 x 4 |" in proc.stdout and "| server | 4 x 4 |" in proc.stdout
