"""ditsweep's images, built from docker/ as shipped and run (marker `images`, CI's second step:
`python -m pytest -m images`): the cpu image's default command with a results volume; the ray
image's MLflow client against the mlflow image's server; and the images as KubeRay runs them,
a head (0 CPUs), two workers and the MLflow server started with the command and environment
cluster/'s manifests give their pods, running the RayJob's entry point through `ray job submit`
with data, checkpoints and artifacts in S3 on loopback, while a worker container is killed.

Needs root (debootstrap, rootful Podman) or a Docker engine; CI installs Podman, buildah, runc
and debootstrap first (README.md, "Tests")."""

import json
import re
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, tiny_sweep
from containers import ContainerCluster, Engine, build_images, owned_dir
from procs import free_port, wait_for, wait_for_port

pytestmark = [pytest.mark.images, pytest.mark.slow]  # slow: out of the quick subset too


@pytest.fixture(scope="module")
def images():
    started = time.monotonic()
    names, out = build_images(("cpu", "mlflow"))
    print(f"\nimages built in {time.monotonic() - started:.0f} s:\n"
          + "\n".join(line for line in out.splitlines() if line.startswith("build.sh:")))
    return names


@pytest.fixture(scope="module")
def engine():
    e = Engine()
    yield e
    e.close()


def mlflow_pin() -> str:
    import tomllib
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in deps if d.startswith("mlflow=="))


def trial_runs(client: MlflowClient, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {r.data.tags["ditsweep.trial"]: r for r in runs if r.data.tags.get("ditsweep.role") == "trial"}


# --- 1. the default command, results on the host -----------------------------------------------

def test_default_command_leaves_the_results_on_the_host(images, engine, tmp_path):
    """`ENGINE run --rm -v $PWD/results:/home/ray/ditsweep IMAGE`, as the README says."""
    results = owned_dir(tmp_path / "results")
    started = time.monotonic()
    proc = engine.run(["--rm", "--shm-size=2g", "-v", f"{results}:/home/ray/ditsweep", images["cpu"]],
                      timeout=1200)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    print(f"\nthe image's default command (smoke sweep) in one container: {took:.0f} s")

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    trials = trial_runs(client, "smoke")
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials.values()), \
        {k: r.info.status for k, r in trials.items()}
    # Tune's checkpoints by trial identity, the report, and the runs' artifacts: all on the host.
    latest = list((results / "ray_results" / "checkpoints").glob("*/latest.json"))
    assert len(latest) == 4 and all(json.loads(p.read_text())["final"] for p in latest), latest
    assert (results / "reports" / "smoke" / "REPORT.md").is_file()
    artifacts = [p for p in results.rglob("*.png") if "reports" not in p.parts]
    assert artifacts, sorted(str(p.relative_to(results)) for p in results.iterdir())


# --- 2. the ray image's MLflow client and the mlflow image's server ---------------------------

CLIENT_SCRIPT = """
import json, sys, tempfile, mlflow
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
exp = client.create_experiment("images")
run = client.create_run(exp, run_name="from-the-ray-image")
client.log_param(run.info.run_id, "n_train", "10")
for step in range(3):
    client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
with tempfile.TemporaryDirectory() as d:
    open(f"{d}/note.txt", "w").write("written in the ray image")
    client.log_artifact(run.info.run_id, f"{d}/note.txt")
client.set_terminated(run.info.run_id)
back = client.get_run(run.info.run_id)
with tempfile.TemporaryDirectory() as d:
    note = open(client.download_artifacts(run.info.run_id, "note.txt", d)).read()
print(json.dumps({"version": mlflow.__version__, "status": back.info.status, "params": back.data.params,
                  "loss": [m.value for m in client.get_metric_history(run.info.run_id, "loss")],
                  "note": note, "run_id": run.info.run_id}))
"""


def test_ray_images_mlflow_client_writes_and_reads_through_the_mlflow_image(images, engine):
    port = free_port()
    engine.start("ci-mlflow-pair", images["mlflow"],
                 ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", "sqlite:////home/mlflow/mlflow.db"])
    wait_for_port(port, timeout=180)
    server = engine.exec("ci-mlflow-pair", ["python", "-c", "import mlflow; print(mlflow.__version__)"])
    proc = engine.run(["--rm", images["cpu"], "python", "-c", CLIENT_SCRIPT, f"http://127.0.0.1:{port}"],
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"] == server.stdout.strip() == mlflow_pin(), (got["version"], server.stdout, server.stderr)
    assert got["status"] == "FINISHED" and got["params"] == {"n_train": "10"}
    assert got["loss"] == [1.0, 0.5, 1 / 3] and got["note"] == "written in the ray image"
    # and the server holds it: read again from this machine's client
    assert MlflowClient(f"http://127.0.0.1:{port}").get_run(got["run_id"]).info.status == "FINISHED"


# --- 3. the images as a KubeRay cluster --------------------------------------------------------

STEPS, LOG_EVERY, CHECKPOINT_EVERY = 160, 10, 20
FIRST, SECOND = "000_DiT-T-1_global_N10_s0", "001_DiT-T-1_global_N10_s1"


def cluster_sweep(storage: str | None = None) -> dict:
    sweep = tiny_sweep(name="images")
    sweep["grid"].update(seed=[0, 1], dataset=["${DITSWEEP_DATA_ROOT}/photos8"])
    sweep["train"].update(steps=STEPS, log_every=LOG_EVERY, checkpoint_every=CHECKPOINT_EVERY)
    sweep["eval"] = {"psnr_gap": {"num_images": 8, "steps": 3, "every": 80},
                     "attention": {"enabled": False}, "samples": {"enabled": False},
                     "actors": {"count": 1, "cpus": 0}}
    sweep["resources"] = {"cpus_per_trial": 1, "max_failures": 3}
    if storage:
        sweep["storage_path"] = storage
    return sweep


def test_images_as_a_kuberay_cluster_run_the_rayjob_and_survive_a_killed_worker(images, engine, tmp_path,
                                                                                   monkeypatch):
    started = time.monotonic()
    c = ContainerCluster(images, engine, tmp_path)
    try:
        c.start()
        up = time.monotonic() - started
        # The dataset in S3, packed from this machine as the README says.
        pack = subprocess.run([sys.executable, "-m", "ditsweep.data", "pack", "builtin:photos",
                               f"{c.m.config['DITSWEEP_DATA_ROOT']}/photos8", "--resolution", "8",
                               "--workers", "1"], env=c.client_env, capture_output=True, text=True,
                              timeout=300)
        assert pack.returncode == 0, pack.stderr[-3000:]
        (c.sweeps / "cluster.yaml").write_text(yaml.safe_dump(cluster_sweep()))
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the pods' login
            if name in c.client_env:
                monkeypatch.setenv(name, c.client_env[name])

        # The pre-flight by hand on the head: a local storage_path passes where it is one volume
        # on every node (/shared), and is refused, naming the workers, where it is each
        # container's own disk.
        def check(storage: str) -> subprocess.CompletedProcess:
            (c.sweeps / "check.yaml").write_text(yaml.safe_dump(cluster_sweep(storage)))
            return engine.exec("ci-head", ["env", f"RAY_ADDRESS=127.0.0.1:{c.gcs_port}", "python", "-m",
                                           "ditsweep.run", "ci/check.yaml", "--check"])
        shared = check("/shared/ray")
        assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-3000:]
        rows = [line for line in shared.stdout.splitlines() if "storage shared" in line]
        assert len(rows) == 2 and all(re.search(r"storage shared\s+ok", r) for r in rows), shared.stdout
        names = sorted(r.split()[0] for r in rows)  # the containers' hostnames (pod names)
        assert names[0] == "ci-head" and names[1].startswith("ci-worker-"), shared.stdout
        local = check("/home/ray/ditsweep/tune")
        failed = [line for line in local.stderr.splitlines() if line.startswith("preflight FAILED on ")]
        assert local.returncode == 2 and len(failed) == 1, local.stdout[-3000:] + local.stderr[-3000:]
        assert failed[0].startswith("preflight FAILED on ci-worker-") and (
            "storage shared: /home/ray/ditsweep/tune is not the driver's directory here") in failed[0], failed

        # The RayJob's entry point with the test's sweep in place of the placement sweep.
        entrypoint = [a if not a.startswith("sweeps/") else "ci/cluster.yaml" for a in c.m.entrypoint]
        assert entrypoint != c.m.entrypoint, c.m.entrypoint
        submit = c.job("submit", "--submission-id", "ci-sweep", "--no-wait", "--", *entrypoint)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        client = MlflowClient(c.tracking_uri)

        # A worker container killed by the engine once the first trial has a checkpoint in S3.
        def checkpointed():
            assert not c.job_ended(), "the job ended before the first checkpoint"
            run = trial_runs(client, "images").get(FIRST)
            if run is None or "ditsweep.trial_host" not in run.data.tags:
                return None
            key = f"ray/checkpoints/{run.data.tags['ditsweep.identity']}/latest.json"
            bucket = c.m.config["DITSWEEP_STORAGE"].split("/")[2]
            return run if key in c.s3_keys(bucket) else None
        run = wait_for(checkpointed, 600, f"a checkpoint of {FIRST} in S3")
        victim = run.data.tags["ditsweep.trial_host"]
        assert victim.startswith("ci-worker-"), victim
        killed_at = time.time()
        engine.kill(victim)

        status = wait_for(c.job_ended, 900, "the job's end", interval=3)
        logs = c.job("logs", "ci-sweep").stdout
        assert status == "SUCCEEDED", status + "\n" + logs[-5000:]
        assert "preflight passed" in logs and "2/2 trials finished" in logs, logs[-3000:]
        sweep_time = time.monotonic() - started - up

        # One FINISHED run per trial; the killed one continued on the other worker, same run.
        trials = trial_runs(client, "images")
        assert sorted(trials) == [FIRST, SECOND]
        assert all(r.info.status == "FINISHED" for r in trials.values())
        moved = trials[FIRST]
        assert moved.info.run_id == run.info.run_id
        assert moved.data.tags["ditsweep.trial_host"] not in (victim, "ci-head"), moved.data.tags
        assert int(moved.data.tags["ditsweep.resumed_from_step"]) > 0
        steps = sorted({m.step for m in client.get_metric_history(moved.info.run_id, "loss")})
        assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), steps
        resumed = [m for m in client.get_metric_history(moved.info.run_id, "loss")
                   if m.timestamp / 1000 > killed_at]
        assert resumed, "no step logged after the kill"

        # Checkpoints and artifacts in S3; nothing of the sweep's on the head's disk.
        keys = c.s3_keys(c.m.config["DITSWEEP_STORAGE"].split("/")[2])
        assert sum(k.endswith("latest.json") and "/checkpoints/" in k for k in keys) == 2, keys[:20]
        assert any(k.startswith("mlflow/") and k.endswith(".png") for k in keys), keys[:20]
        head_disk = engine.exec("ci-head", ["sh", "-c", "ls -A /home/ray/ditsweep ~ /tmp"]).stdout
        for local in ("ray_results", "mlflow.db", "mlruns", "mlartifacts"):
            assert local not in head_disk.split(), head_disk
        print(f"\ncontainer cluster: up {up:.0f} s, job (2 trials of {STEPS} steps, a worker killed) "
              f"{sweep_time:.0f} s; the moved trial's next step "
              f"{min(m.timestamp for m in resumed) / 1000 - killed_at:.1f} s after the kill")
    except BaseException:
        (tmp_path / "diagnosis.txt").write_text(text := c.diagnosis())
        print(f"\ndiagnosis (all of it in {tmp_path / 'diagnosis.txt'}):\n{text[-12000:]}")
        raise
    finally:
        engine.close()
        c.close()
