"""ditsweep's own images, built with docker/build.sh and run as containers of this machine's engine
(Docker or Podman, docker/engine.sh), the way cluster/'s manifests run them.

    from containers import ContainerCluster, Engine, Manifests, build_images

    images = build_images()                   # {"cpu": "ditsweep-ray:ci-cpu", "mlflow": ...}
    engine = Engine()
    engine.run(["--rm", image, "true"])       # `ENGINE run ...` with the engine's flags
    m = Manifests(secrets={...})              # cluster/ read: ConfigMap, Secret keys, RayJob
    m.env(m.head)                             # the environment Kubernetes gives the head pod
    m.ray_start(m.head_group, head=True)      # `ray start` as KubeRay builds it from rayStartParams
    c = ContainerCluster(images, engine, tmp).start()   # the images as KubeRay runs them, on loopback

Every container uses the host's network (builds need it on CI's machines, and it is what keeps
the cluster on loopback): Ray nodes therefore get every port explicitly, as tests/cluster.py's
nodes do. Environment goes in through --env-file, never on a command line.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from secrets import token_hex

import yaml

from cluster import HEALTH_ENV, OBJECT_STORE_BYTES
from procs import free_port, http, wait_for, wait_for_port
from s3server import FAKE_KEY_ID, FAKE_SECRET, S3Server

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
TAG = "ci"
RAY = str(Path(sys.executable).parent / "ray")
UID = 1000  # the images' user (ray, mlflow)


# --- building ------------------------------------------------------------------------------------

def build_images(images=("cpu", "mlflow"), timeout: float = 1800) -> tuple[dict[str, str], str]:
    """docker/build.sh as CI runs it; returns ({image: name}, the script's output).

    CI's machines reach PyPI and Debian's archive only: the base is made with debootstrap
    (`--base auto` finds no registry), torch comes from PyPI (TORCH_INDEX_URL empty), the host's
    CA bundle is trusted (a TLS proxy), and the Inception weights are a random file of the right
    shape (ditsweep/eval/fid.py, as every FID test uses), kept between runs so that the weights'
    layer stays cached."""
    weights = REPO / "docker" / "local" / "inception-ci.pth"
    if not weights.exists():
        from ditsweep.eval.fid import write_random_inception_weights
        write_random_inception_weights(weights)
    args = ["bash", str(REPO / "docker" / "build.sh"), "--tag", TAG, "--base", "auto",
            "--build-arg", "TORCH_INDEX_URL=",
            "--build-arg", f"INCEPTION_FILE={weights.relative_to(REPO)}"]
    ca = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():
        args += ["--extra-ca", str(ca)]
    proc = subprocess.run([*args, *images], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"docker/build.sh failed ({proc.returncode}):\n{out[-6000:]}")
    names = {"cpu": f"ditsweep-ray:{TAG}-cpu", "gpu": f"ditsweep-ray:{TAG}-gpu",
             "mlflow": f"ditsweep-mlflow:{dockerfile_arg(REPO / 'docker' / 'mlflow.Dockerfile', 'MLFLOW_VERSION')}"}
    return {i: names[i] for i in images}, out


def dockerfile_arg(path: Path, name: str) -> str:
    return re.search(rf"^ARG {name}=(.*)$", path.read_text(), re.M).group(1).strip('"')


# --- the engine ----------------------------------------------------------------------------------

class Engine:
    """This machine's container engine with the flags it needs (docker/engine.sh)."""

    def __init__(self):
        out = subprocess.run(["bash", str(REPO / "docker" / "engine.sh")], capture_output=True,
                             text=True, check=True).stdout
        parsed = dict(re.findall(r"^(\w+)=\((.*)\)$", out, re.M))
        self.cmd = shlex.split(parsed["ENGINE_CMD"])
        self.run_flags = shlex.split(parsed["ENGINE_RUN_FLAGS"])
        self.started: list[str] = []
        self.envdir = Path(tempfile.mkdtemp(prefix="ditsweep-env-"))

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(self.cmd + list(args[:3]))} ... failed "
                               f"({proc.returncode}): {proc.stderr[-3000:]}")
        return proc

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
        """`ENGINE run --network host ARGS`, its environment from a private env file."""
        return self("run", "--network", "host", *self.run_flags, *self._env_file(env), *args,
                    timeout=timeout, check=check)

    def start(self, name: str, image: str, command: list[str], env: dict[str, str] | None = None,
              options: list[str] = ()) -> str:
        """A detached container called `name` (host network, its own hostname)."""
        self("rm", "-f", name, check=False)
        self.started.append(name)
        self("run", "-d", "--name", name, "--hostname", name, "--network", "host", *self.run_flags,
             *self._env_file(env), *options, image, *command)
        return name

    def kill(self, name: str) -> None:
        self("kill", "--signal", "KILL", name)

    def logs(self, name: str) -> str:
        proc = self("logs", name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, name: str, command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return self("exec", name, *command, timeout=timeout, check=False)

    def close(self) -> None:
        for name in reversed(self.started):
            self("rm", "-f", "-t", "0", name, check=False, timeout=120)
        self.started = []
        for f in self.envdir.iterdir():
            f.unlink()

    def _env_file(self, env: dict[str, str] | None) -> list[str]:
        if not env:
            return []
        fd, path = tempfile.mkstemp(dir=self.envdir, suffix=".env")  # mode 0600
        with os.fdopen(fd, "w") as f:
            for key, value in env.items():
                assert "\n" not in value, key
                f.write(f"{key}={value}\n")
        return ["--env-file", path]


# --- the manifests -------------------------------------------------------------------------------

def load_yaml(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


class Manifests:
    """What cluster/ gives each pod, read from the files: the RayJob's groups, entry point and
    containers, the MLflow Deployment's container, the ConfigMap, and the Secret's keys (from
    secrets.env.example; their values are the caller's)."""

    def __init__(self, secrets: dict[str, str]):
        self.rayjob = load_yaml(CLUSTER / "placement" / "rayjob.yaml")[0]
        spec = self.rayjob["spec"]["rayClusterSpec"]
        self.head_group, self.worker_group = spec["headGroupSpec"], spec["workerGroupSpecs"][0]
        self.head = self.head_group["template"]["spec"]["containers"][0]
        self.worker = self.worker_group["template"]["spec"]["containers"][0]
        base = [d for path in sorted((CLUSTER / "base").glob("*.yaml")) for d in load_yaml(path)]
        self.mlflow_pod = next(d for d in base if d["kind"] == "Deployment"
                               and d["metadata"]["name"] == "mlflow")["spec"]["template"]["spec"]
        self.mlflow = self.mlflow_pod["containers"][0]
        # Jobs that run against the MLflow server (e.g. creating the sweeps' login)
        self.mlflow_jobs = [d["spec"]["template"]["spec"] for d in base if d["kind"] == "Job"
                            and d["spec"]["template"]["spec"]["containers"][0]["image"] == "ditsweep-mlflow"]
        self.config_maps = {d["metadata"]["name"]: d["data"] for d in base if d["kind"] == "ConfigMap"}
        self.config = self.config_maps["ditsweep-config"]
        keys = [line.split("=", 1)[0].strip() for line in
                (CLUSTER / "base" / "secrets.env.example").read_text().splitlines()
                if "=" in line and not line.lstrip().startswith("#")]
        missing = [k for k in keys if k not in secrets]
        assert not missing, f"no test value for the Secret's keys {missing}"
        self.secrets = {k: secrets[k] for k in keys}

    @property
    def entrypoint(self) -> list[str]:
        return shlex.split(self.rayjob["spec"]["entrypoint"])

    def env(self, container: dict) -> dict[str, str]:
        """The container's environment as Kubernetes builds it: envFrom first, then env in order,
        valueFrom references resolved and $(VAR) expanded from the variables before it."""
        env: dict[str, str] = {}
        sources = {"configMap": self.config, "secret": self.secrets}
        for source in container.get("envFrom", []):
            kind = "configMap" if "configMapRef" in source else "secret"
            env.update({source.get("prefix", "") + k: v for k, v in sources[kind].items()})
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
                continue
            ref = e["valueFrom"]
            kind, key = ("configMap", ref["configMapKeyRef"]) if "configMapKeyRef" in ref else \
                        ("secret", ref["secretKeyRef"])
            if key["key"] in sources[kind]:
                env[e["name"]] = sources[kind][key["key"]]
            else:
                assert key.get("optional"), f"{e['name']}: {kind} has no key {key['key']}"
        return env

    def command(self, container: dict, env: dict[str, str]) -> list[str]:
        """command + args with Kubernetes' $(VAR) expansion."""
        words = container.get("command", []) + container.get("args", [])
        return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), w) for w in words]

    def config_map_mounts(self, pod: dict, container: dict, where: Path, edit=None) -> list[str]:
        """-v options for the container's ConfigMap volumes: each map's keys written as files
        under `where` (edit(key, text) may change a file for this machine) and mounted read-only."""
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        options = []
        for mount in container.get("volumeMounts", []):
            source = volumes[mount["name"]].get("configMap")
            if source is None:
                continue
            d = where / mount["name"]
            d.mkdir(parents=True, exist_ok=True)
            for key, text in self.config_maps[source["name"]].items():
                (d / key).write_text(edit(key, text) if edit else text)
                (d / key).chmod(0o644)
            d.chmod(0o755)
            options += ["-v", f"{d}:{mount['mountPath']}:ro"]
        return options

    @staticmethod
    def ray_start(group: dict, head: bool) -> list[str]:
        """`ray start` as KubeRay writes it for a group: its rayStartParams as --key=value."""
        args = ["ray", "start", "--block"] + (["--head"] if head else [])
        return args + [f"--{k}={v}" for k, v in group.get("rayStartParams", {}).items()]

    @staticmethod
    def shm_size(group: dict) -> str:
        """The size of the group's /dev/shm volume (an emptyDir in memory), for --shm-size."""
        for volume in group["template"]["spec"].get("volumes", []):
            if volume.get("emptyDir", {}).get("medium") == "Memory":
                return volume["emptyDir"]["sizeLimit"].replace("Gi", "g")
        return "64m"


# --- the images as a KubeRay cluster on this machine ------------------------------------------

def owned_dir(path: Path) -> Path:
    """A host directory the images' user can write to (a bind mount keeps the host's owner)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:
        path.chmod(0o777)
    return path


class ContainerCluster:
    """S3 (moto, this machine's loopback), the MLflow server from the mlflow image, a Ray head and
    two workers from the cpu image, each started with its pod's command and environment from
    cluster/ (service addresses and the workers' CPUs are this machine's)."""

    def __init__(self, images: dict, engine: Engine, base: Path, workers: int = 2):
        self.images, self.engine, self.base, self.workers = images, engine, base, workers

    def start(self) -> "ContainerCluster":
        self.s3 = S3Server().start()
        values = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
        keys = [line.split("=", 1)[0] for line in
                (REPO / "cluster" / "base" / "secrets.env.example").read_text().splitlines()
                if "=" in line and not line.startswith("#")]
        self.m = Manifests({k: values.get(k, token_hex(12)) for k in keys})
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
        """The job's end state once it has one ("SUCCEEDED", "FAILED", "STOPPED"), from the
        dashboard's REST API: polling `ray job status` would cost a Python start each time."""
        token = self.client_env.get("RAY_AUTH_TOKEN")
        code, text = http(f"http://127.0.0.1:{self.dashboard_port}/api/jobs/ci-sweep",
                          headers={"Authorization": f"Bearer {token}"} if token else {})
        assert code == 200, (code, text[:300])
        status = json.loads(text)["status"]
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

    def close(self) -> None:
        if hasattr(self, "s3"):
            self.s3.close()
