"""Trial identity and reuse: every distinct trial trains once, across sweeps, reruns and restarts.

The end-to-end tests run the real `python -m ditsweep.run` (local Ray) against a real `mlflow
server` or SQLite store and read everything back from MLflow and the storage path."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PYTHON, tiny_sweep, write_sweep
from mlflow.tracking import MlflowClient
from procs import free_port, mlflow_server, stop, wait_for
from s3server import s3_server  # noqa: F401 - a fixture

from ditsweep.config import expand, load_sweep
from ditsweep.config.identity import trial_identity
from ditsweep.train.checkpoints import TrialCheckpoints

ENV = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
NO_EVAL = {"psnr_gap": {"enabled": False}, "attention": {"enabled": False},
           "samples": {"enabled": False}}


def trials_of(tmp_path: Path, **overrides):
    path = write_sweep(tmp_path, tiny_sweep(**overrides), f"s{len(list(tmp_path.glob('s*.yaml')))}.yaml")
    return expand(load_sweep(path), path)


# --- identity ------------------------------------------------------------------------------------

def test_identity_covers_what_changes_the_weights_and_nothing_else(tmp_path):
    base = trials_of(tmp_path)[0]
    ident = trial_identity(base)
    assert re.fullmatch(r"[0-9a-f]{20}", ident) and trial_identity(base) == ident  # stable
    same = [  # evaluations, resources, tracking, logging and kernels do not change the weights
        trials_of(tmp_path, eval={"psnr_gap": {"num_images": 4}, "jacobian": {"enabled": True}}),
        trials_of(tmp_path, resources={"cpus_per_trial": 2, "max_failures": 0}),
        trials_of(tmp_path, tracking={"uri": "http://elsewhere:5000", "experiment": "x"}, name="other"),
        trials_of(tmp_path, train={**tiny_sweep()["train"], "log_every": 1, "checkpoint_every": 5,
                                   "attention_backend": "torch"}),
        trials_of(tmp_path, grid={**tiny_sweep()["grid"], "dataset": ["builtin:photos?seed=0"]}),
    ]
    for trials in same:
        assert trial_identity(trials[0]) == ident
    different = [
        trials_of(tmp_path, grid={**tiny_sweep()["grid"], "seed": [1]}),
        trials_of(tmp_path, grid={**tiny_sweep()["grid"], "n_train": [11]}),
        trials_of(tmp_path, grid={**tiny_sweep()["grid"], "layout": ["local"]}),
        trials_of(tmp_path, grid={**tiny_sweep()["grid"], "dataset": ["builtin:photos?seed=1"]}),
        trials_of(tmp_path, grid={**tiny_sweep()["grid"], "lr": [2e-3]}),
        trials_of(tmp_path, train={**tiny_sweep()["train"], "steps": 7}),
        trials_of(tmp_path, train={**tiny_sweep()["train"], "ema_decay": 0.5}),
        trials_of(tmp_path, data={"resolution": 16}),
    ]
    idents = {trial_identity(trials[0]) for trials in different}
    assert len(idents) == len(different) and ident not in idents
    import ditsweep.config.identity as identity
    old = identity.CODE_VERSION
    try:
        identity.CODE_VERSION = old + 1  # a change to the model/diffusion math
        assert trial_identity(base) != ident
    finally:
        identity.CODE_VERSION = old


def test_packed_dataset_identity_follows_its_manifest_checksum(tmp_path, monkeypatch):
    from ditsweep.config.identity import dataset_fingerprint
    from ditsweep.data.pack import pack
    data = tmp_path / "photos8"
    pack("builtin:photos", str(data), resolution=8, shard_size=50, limit=120, progress=False)
    grid = {**tiny_sweep()["grid"], "dataset": [str(data)]}
    first = trial_identity(trials_of(tmp_path, grid=grid)[0])
    dataset_fingerprint.cache_clear()
    pack("builtin:photos", str(data), resolution=8, shard_size=50, limit=120, seed=1,
         overwrite=True, progress=False)  # same URI, other images
    dataset_fingerprint.cache_clear()
    assert trial_identity(trials_of(tmp_path, grid=grid)[0]) != first


# --- checkpoints under the identity ----------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_store_keeps_the_newest_and_points_at_it(where, tmp_path, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        server.create_bucket("ckpt")
        storage = "s3://ckpt/sweeps"
    else:
        storage = str(tmp_path / "storage")
    store = TrialCheckpoints(storage, "abc123")
    assert store.latest() is None and store.fetch(tmp_path) is None
    for step in (10, 20, 30):
        f = tmp_path / f"c{step}.pt"
        f.write_bytes(b"weights at %d" % step)
        store.save(f, step, final=step == 30, keep=2, run_id="run1")
    latest = store.latest()
    assert latest["step"] == 30 and latest["final"] and latest["run_id"] == "run1"
    out = tmp_path / "out"
    out.mkdir()
    assert store.fetch(out)["step"] == 30 and (out / "checkpoint.pt").read_bytes() == b"weights at 30"
    assert TrialCheckpoints.at(store.location).latest() == latest
    if where == "local":  # the oldest of three is gone, two are kept
        assert sorted(p.name for p in Path(store.location).iterdir()) == [
            "latest.json", "step_000000020.pt", "step_000000030.pt"]


# --- two sweeps training one identity at once ------------------------------------------------------

def test_the_later_twin_waits_for_the_first_and_links_to_it(tmp_path, monkeypatch):
    from ditsweep.tracking import reuse
    monkeypatch.setattr(reuse, "POLL_SECONDS", 0.2)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    tags = {"ditsweep.identity": "twin", "ditsweep.role": "trial"}
    first = client.create_run(client.create_experiment("a"), tags=tags).info.run_id
    time.sleep(0.05)  # start times in ms: the first run is the older one
    second = client.create_run(client.create_experiment("b"), tags=tags).info.run_id
    for run_id in (first, second):
        reuse.heartbeat(client, run_id)
    assert reuse.wait_for_twin(client, first, "twin") is None  # the first one trains

    def finish_first():
        time.sleep(1.0)
        client.log_metric(first, "loss", 0.5, step=6)
        client.set_terminated(first, "FINISHED")
    threading.Thread(target=finish_first).start()
    start = time.monotonic()
    original = reuse.wait_for_twin(client, second, "twin")  # waits, then links
    assert original.info.run_id == first and time.monotonic() - start >= 0.9
    reuse.become_link(client, second, original)
    run = client.get_run(second)
    assert run.info.status == "FINISHED" and run.data.tags["ditsweep.reused_from"] == first
    assert run.data.metrics["loss"] == 0.5
    assert reuse.find_original(client, "twin").info.run_id == first  # a link is never an original


# --- end to end -----------------------------------------------------------------------------------

def run_sweep_cli(path: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", "ditsweep.run", str(path), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def runs_of(client: MlflowClient, experiment: str, role: str = "trial") -> list:
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("ditsweep.role") == role]


def originals(client: MlflowClient) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(exps) if r.data.tags.get("ditsweep.role") == "trial"
            and "ditsweep.reused_from" not in r.data.tags]


def report_tables(cwd: Path, experiment: str) -> str:
    text = (cwd / "reports" / experiment / "REPORT.md").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


@pytest.mark.slow
def test_rerun_second_sweep_and_added_fid_train_nothing_twice(tmp_path):
    from ditsweep.eval.fid import write_random_inception_weights
    port = free_port()
    server = mlflow_server(tmp_path / "server.db", tmp_path / "artifacts", port)
    uri = f"http://127.0.0.1:{port}"
    client = MlflowClient(uri)
    storage = str(tmp_path / "storage")
    try:
        sweep = tiny_sweep(name="reuse", eval=NO_EVAL, tracking={"uri": uri}, storage_path=storage)
        sweep["grid"]["seed"] = [0, 1]
        path = write_sweep(tmp_path, sweep)
        run_sweep_cli(path, tmp_path)
        first = {r.data.tags["ditsweep.identity"]: r for r in runs_of(client, "reuse")}
        assert len(first) == 2 and all(r.info.status == "FINISHED" for r in first.values())
        tables = report_tables(tmp_path, "reuse")

        # 1. The same sweep again: nothing trains, it takes seconds, the report is the same.
        start = time.monotonic()
        proc = run_sweep_cli(path, tmp_path)
        again = time.monotonic() - start
        assert "2 trials reused from earlier runs" in proc.stderr and "2/2 trials finished" in proc.stdout
        assert len(originals(client)) == 2  # no training: no new original run
        assert report_tables(tmp_path, "reuse") == tables
        links = [r for r in runs_of(client, "reuse") if "ditsweep.reused_from" in r.data.tags]
        assert len(links) == 2 and {r.data.tags["ditsweep.reused_from"] for r in links} == \
            {r.info.run_id for r in first.values()}
        dry = run_sweep_cli(path, tmp_path, "--dry-run")
        assert "2 trials reused" in dry.stdout
        assert all(ident in dry.stdout for ident in first)

        # 2. FID added to the YAML: only FID is computed, on the originals' final checkpoints;
        #    one original's checkpoint is gone: a clear message, its other metrics still linked.
        weights = write_random_inception_weights(tmp_path / "inception.pth")
        sweep["eval"]["fid"] = {"enabled": True, "num_samples": 4, "sampling_steps": 2,
                                "reference_images": 4, "batch_size": 4,
                                "feature_extractor_weights_path": str(weights)}
        path = write_sweep(tmp_path, sweep)
        gone_ident = next(i for i, r in first.items() if r.data.params["seed"] == "1")
        for f in (Path(storage) / "checkpoints" / gone_ident).glob("*.pt"):
            f.unlink()
        proc = run_sweep_cli(path, tmp_path)
        assert "checkpoint of run" in proc.stderr and "is gone" in proc.stderr
        assert len(originals(client)) == 2
        parent = max(runs_of(client, "reuse", "sweep"), key=lambda r: r.info.start_time)
        fid_links = {r.data.tags["ditsweep.identity"]: r for r in runs_of(client, "reuse")
                     if r.data.tags.get("ditsweep.sweep_run_id") == parent.info.run_id}
        kept = next(i for i in fid_links if i != gone_ident)
        assert "fid" in fid_links[kept].data.metrics
        assert fid_links[kept].data.params["eval.fid.enabled"] == "True"
        loss = lambda run: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(loss(fid_links[kept])) == sorted(loss(first[kept]))  # copied, not retrained
        assert "fid" not in fid_links[gone_ident].data.metrics
        assert "is gone" in fid_links[gone_ident].data.tags["ditsweep.eval_failure"]

        # 3. Another sweep (own experiment) sharing both trials and adding a third: one training.
        other = tiny_sweep(name="other", eval=NO_EVAL, tracking={"uri": uri}, storage_path=storage)
        other["grid"]["seed"] = [0, 1, 2]
        proc = run_sweep_cli(write_sweep(tmp_path, other, "other.yaml"), tmp_path)
        assert "2 trials reused" in proc.stderr and "3/3 trials finished" in proc.stdout
        by_identity: dict[str, int] = {}
        for run in originals(client):
            by_identity[run.data.tags["ditsweep.identity"]] = by_identity.get(
                run.data.tags["ditsweep.identity"], 0) + 1
        assert len(by_identity) == 3 and set(by_identity.values()) == {1}  # each trained once
    finally:
        stop(server)
    print(f"second run of the sweep took {again:.1f}s")


@pytest.mark.slow
def test_interrupted_sweep_continues_without_resume(tmp_path):
    sweep = tiny_sweep(name="restart", eval=NO_EVAL)
    sweep["grid"]["seed"] = [0, 1]
    sweep["train"].update(steps=80, log_every=10, checkpoint_every=20)
    sweep["resources"]["max_concurrent_trials"] = 1
    path = write_sweep(tmp_path, sweep)
    started = time.monotonic()
    driver = subprocess.Popen([PYTHON, "-m", "ditsweep.run", str(path)], cwd=tmp_path, env=ENV,
                              stdout=open(tmp_path / "driver.log", "ab"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(lambda: list((tmp_path / "ray_results" / "restart").glob("001*/checkpoint_*")),
                 240, "a mid-point checkpoint of the second trial")
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    finally:
        stop(driver)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    before = {r.data.tags["ditsweep.trial"][:3]: r for r in runs_of(client, "restart")}
    assert before["000"].info.status == "FINISHED" and before["001"].info.status == "RUNNING"

    killed = time.monotonic()
    run_sweep_cli(path, tmp_path)  # a fresh local Ray, no --resume
    print(f"first attempt {killed - started:.0f}s, second {time.monotonic() - killed:.0f}s")
    runs = runs_of(client, "restart")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # one run per trial
    after = {r.data.tags["ditsweep.trial"][:3]: r for r in runs}
    assert after["000"].info.end_time == before["000"].info.end_time  # not trained again
    assert int(after["001"].data.tags["ditsweep.resumed_from_step"]) >= 20
    assert after["001"].info.run_id == before["001"].info.run_id
    assert len(runs_of(client, "restart", "sweep")) == 1  # the parent run was reopened
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(10, 81, 10))  # each step once: none replayed, none lost
