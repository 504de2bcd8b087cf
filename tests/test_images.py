"""ditsweep's images, built from docker/ as shipped and run (marker `images`, CI's second step:
`python -m pytest -m images`): the cpu image's default command with a results volume; the ray
image's MLflow client against the mlflow image's server; and the images as KubeRay runs them,
a head (0 CPUs), two workers and the MLflow server started with the command and environment
cluster/'s manifests give their pods, running the RayJob's entry point through `ray job submit`
with data, checkpoints and artifacts in S3 on loopback, while a worker container is killed.

Needs root (debootstrap, rootful Podman) or a Docker engine; CI installs Podman, buildah, runc
and debootstrap first (README.md, "Tests")."""

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cluster import HEALTH_ENV, OBJECT_STORE_BYTES
from conftest import REPO, tiny_sweep
from containers import Engine, Manifests, build_images
from procs import free_port, wait_for, wait_for_port
from s3server import FAKE_KEY_ID, FAKE_SECRET, S3Server

pytestmark = [pytest.mark.images, pytest.mark.slow]  # slow: out of the quick subset too
RAY = str(Path(sys.executable).parent / "ray")
UID = 1000  # the images' user (ray, mlflow)


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


def owned_dir(path: Path) -> Path:
    """A host directory the images' user can write to (a bind mount keeps the host's owner)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        path.chmod(0o777)
    return path


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


class ContainerCluster:
    """S3 (moto, this machine's loopback), the MLflow server from the mlflow image, a Ray head and
    two workers from the cpu image, each started with its pod's command and environment from
    cluster/ (service addresses and the workers' CPUs are this machine's)."""

    def __init__(self, images: dict, engine: Engine, base: Path, workers: int = 2):
        self.images, self.engine, self.base, self.workers = images, engine, base, workers
        self.token = secrets.token_hex(16)

    def start(self) -> "ContainerCluster":
        self.s3 = S3Server().start()
        values = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
        keys = [line.split("=", 1)[0] for line in
                (REPO / "cluster" / "base" / "secrets.env.example").read_text().splitlines()
                if "=" in line and not line.startswith("#")]
        self.m = Manifests({k: values.get(k, secrets.token_hex(12)) for k in keys})
        for uri in (self.m.config["DITSWEEP_DATA_ROOT"], self.m.config["DITSWEEP_STORAGE"],
                    self.m.config["MLFLOW_ARTIFACTS_DESTINATION"]):
            bucket = uri.split("/")[2]
            if bucket not in {b["Name"] for b in self.s3.client().list_buckets()["Buckets"]}:
                self.s3.create_bucket(bucket)
        self.shared = owned_dir(self.base / "shared")
        self.sweeps = self.base / "sweeps"
        self.sweeps.mkdir()
        self._start_mlflow()
        self._start_ray()
        return self

    # the services' addresses on this machine, in place of the cluster's Service names
    def overrides(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "AWS_ENDPOINT_URL_S3": self.s3.endpoint_url}

    def _start_mlflow(self) -> None:
        """The Deployment's container, then the Jobs that run against it (the sweeps' login)."""
        port = free_port()
        self.tracking_uri = f"http://127.0.0.1:{port}"
        # no PostgreSQL here: the stores in the container's SQLite
        sqlite = lambda name: f"sqlite:////home/mlflow/{name}.db"  # noqa: E731
        env = {**self.m.env(self.m.mlflow), **self.overrides(), "MLFLOW_BACKEND_STORE_URI": sqlite("mlflow")}
        command = [a for a in self.m.command(self.m.mlflow, env)
                   if not a.startswith(("--host=", "--port="))] + ["--host=127.0.0.1", f"--port={port}"]
        files = self.m.config_map_mounts(self.m.mlflow_pod, self.m.mlflow, self.base / "mlflow-files",
                                         edit=lambda key, text: re.sub(r"(?m)^(\s*database_uri\s*=).*$",
                                                                       rf"\1 {sqlite('auth')}", text))
        self.engine.start("ci-mlflow", self.images["mlflow"], command, env, files)
        wait_for_port(port, timeout=180)
        for job in self.m.mlflow_jobs:
            container = job["containers"][0]
            env = {**self.m.env(container), **self.overrides()}
            for _ in range(10):  # the Job's backoffLimit: the server may still be starting
                proc = self.engine.run(["--rm", self.images["mlflow"], *self.m.command(container, env)], env)
                if proc.returncode == 0:
                    break
                time.sleep(3)
            assert proc.returncode == 0, f"{container['name']}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"

    def _start_ray(self) -> None:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes = ["ci-head"] + [f"ci-worker-{i}" for i in range(self.workers)]
        for i, node in enumerate(self.nodes):
            self._start_node(node, head=i == 0, worker_ports=20000 + 300 * i)
        wait_for(lambda: self.alive_nodes() == len(self.nodes), 180, "every node alive")

    def _start_node(self, name: str, head: bool, worker_ports: int) -> None:
        group = self.m.head_group if head else self.m.worker_group
        container = self.m.head if head else self.m.worker
        args = self.m.ray_start(group, head)
        # every port of the node, explicit: the nodes share the host's network
        args += ["--node-ip-address=127.0.0.1", f"--object-store-memory={OBJECT_STORE_BYTES}",
                 f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 299}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        if head:
            args += [f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        else:
            # KubeRay derives --num-cpus from the container's CPU limit: one CPU a worker here
            args += [f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=1"]
        env = {**self.m.env(container), **self.overrides(), **HEALTH_ENV}
        options = ["--workdir", container["workingDir"], f"--shm-size={self.m.shm_size(group)}",
                   "-v", f"{self.shared}:/shared"]
        if head:
            options += ["-v", f"{self.sweeps}:{container['workingDir']}/ci:ro"]
        self.engine.start(name, self.images["cpu"], args, env, options)

    @property
    def client_env(self) -> dict[str, str]:
        """This machine as the job submitter (KubeRay's submitter pod): Ray's token if the pods
        have one, S3 and MLflow as the pods see them."""
        env = {**os.environ, **self.m.env(self.m.head), **self.overrides(), "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        return env

    def alive_nodes(self) -> int:
        proc = subprocess.run([RAY, "list", "nodes", "--address", f"127.0.0.1:{self.gcs_port}",
                               "--format", "json", "--filter", "state=ALIVE"],
                              env=self.client_env, capture_output=True, text=True, timeout=60)
        try:
            return len(json.loads(proc.stdout))
        except ValueError:
            return 0

    def job(self, command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray job COMMAND --address ... ARGS` (the address before a submit's `--`)."""
        return subprocess.run([RAY, "job", command, "--address", f"http://127.0.0.1:{self.dashboard_port}",
                               *args], env=self.client_env, capture_output=True, text=True, timeout=timeout)

    def s3_keys(self, bucket: str) -> list[str]:
        pages = self.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def diagnosis(self) -> str:
        """What a failed run leaves to read: the job's status and log, each container's log."""
        parts = []
        if hasattr(self, "dashboard_port"):
            for what in ("status", "logs"):
                try:
                    proc = self.job(what, "ci-sweep", timeout=60)
                    parts.append(f"--- ray job {what}\n{(proc.stdout + proc.stderr)[-6000:]}")
                except subprocess.TimeoutExpired:
                    parts.append(f"--- ray job {what}: no answer in 60 s")
        for name in self.engine.started:
            parts.append(f"--- {name}\n{self.engine.logs(name)[-3000:]}")
        return "\n".join(parts)

    def job_ended(self) -> str | None:
        """`ray job status`'s verdict once the job has one: "succeeded", "failed", "was stopped"."""
        proc = self.job("status", "ci-sweep")
        ended = re.search(r"Job 'ci-sweep' (succeeded|failed|was stopped)", proc.stdout + proc.stderr)
        return ended.group(1) if ended else None

    def close(self) -> None:
        if hasattr(self, "s3"):
            self.s3.close()


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
        assert status == "succeeded", status + "\n" + logs[-5000:]
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
