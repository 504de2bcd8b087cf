"""Pre-flight (`python -m ditsweep.run SWEEP.yaml --check`): passes on a local Ray (and on a head
of several `ray start` nodes: tests/test_cluster.py); exits 2 with one clear line per
problem when the tracking server is down, a manifest is missing, the working directory is too
big to submit, or a cluster of several nodes is given local paths (a local storage_path passes
when every node type sees the driver's marker file there: tests/test_images.py shows both
outcomes with containers that share a volume and containers that do not)."""

import re
import time
from pathlib import Path

import pytest
from conftest import tiny_sweep, write_sweep
from procs import free_port

from ditsweep.sweep.preflight import local_path_checks, probe, table, working_dir_checks, write_marker


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


def test_local_paths_fail_on_a_cluster_of_several_nodes_naming_each_field():
    local = dict(tracking_uri="sqlite:////tmp/mlflow.db",
                 datasets=["/data/celeba32", "file:///data/imagenet32", "s3://data/photos8"])
    assert local_path_checks(**local, nodes=1) == []  # one node: its disk is everyone's
    checks = local_path_checks(**local, nodes=3)
    assert [c.item for c in checks] == ["tracking.uri", "grid.dataset", "grid.dataset"]
    assert all(c.ok is False and c.node == "driver" for c in checks)
    assert checks[0].detail.startswith("sqlite:////tmp/mlflow.db is a local path but the cluster has 3 nodes")
    assert "mlflow server" in checks[0].detail and "/data/celeba32" in checks[1].detail
    assert "file:///data/imagenet32" in checks[2].detail
    lines = table(checks).splitlines()
    assert len(lines) == 4 and re.match(r"driver\s+tracking.uri\s+FAILED\s+sqlite:", lines[1])
    shared = dict(tracking_uri="http://mlflow:5000", datasets=["s3://data/photos8", "builtin:photos"])
    assert local_path_checks(**shared, nodes=3) == []


@pytest.mark.slow
def test_preflight_counts_the_nodes_of_a_real_cluster(tmp_path, monkeypatch, capsys):
    """Two raylets on this host (a head without CPUs and a worker, as on KubeRay), each a node
    type of its own: both see the driver's marker in the local storage path (one disk), so it
    passes; an unreachable http tracking URI fails as unreachable, not as a local path."""
    import ray
    from ray.cluster_utils import Cluster

    from ditsweep.config import Sweep, expand
    from ditsweep.sweep.preflight import preflight

    monkeypatch.chdir(tmp_path)
    sweep = Sweep.model_validate(tiny_sweep(name="nodes", tracking={"uri": "http://127.0.0.1:1"}))
    trials = expand(sweep)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert preflight(sweep, trials, str(tmp_path / "ray_results")) is False
        captured = capsys.readouterr()
        shared = re.findall(r"^(.*\S)\s+storage shared\s+ok\s", captured.out, re.M)
        assert len(shared) == 2 and any("(head" in n for n in shared), captured.out
        assert "tracking.uri" not in captured.err and "storage" not in captured.err, captured.err
        assert ": mlflow: " in captured.err  # an http server is reached from every node, or fails
        assert list((tmp_path / "ray_results").iterdir()) == []  # the marker removed again
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_node_without_the_drivers_marker_fails_naming_the_path(tmp_path):
    driver, elsewhere = tmp_path / "shared", tmp_path / "node-disk"
    marker = write_marker(str(driver))
    spec = {"driver_versions": {}, "datasets": [], "tracking_uri": "http://127.0.0.1:1",
            "experiment": "x", "storage": str(driver), "fid_weights": None, "storage_marker": marker}
    seen = {c["item"]: c for c in probe(spec)}
    assert seen["storage shared"]["ok"] is True
    elsewhere.mkdir()
    other = {c["item"]: c for c in probe({**spec, "storage": str(elsewhere)})}["storage shared"]
    assert other["ok"] is False
    assert other["detail"].startswith(f"{elsewhere} is not the driver's directory here (no marker file "
                                      f"{marker['name']}): mount one shared volume there on every node")


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
