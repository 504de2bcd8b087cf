"""A multi-node Ray cluster on loopback, with the services a cluster sweep needs.

    from cluster import LoopbackCluster

    with LoopbackCluster(workers=2, cpus_per_worker=4) as c:
        c.head_address            # "127.0.0.1:PORT": RAY_ADDRESS for a driver on this machine
        c.dashboard_address       # "http://127.0.0.1:PORT": for `ray job submit --address`
        c.env                     # what a client needs: Ray token, S3 endpoint and keys, MLflow
        c.client_dir              # "the laptop": submit `--working-dir .` from here
        c.submit(["python", "-m", "ditsweep.run", "sweep.yaml"])  # ray job submit, from client_dir
        c.kill_worker(0)          # SIGKILL worker node 0: its raylet, agents and workers
        c.stop(); c.start()       # the whole Ray cluster gone, then a fresh one (new disks, ports)

What runs: a moto S3 server (buckets `data` and `runs`), an `mlflow server` with MLflow's login
(`--app-name basic-auth`, the settings of cluster/base/mlflow.yaml; SQLite backend, artifacts in
s3://runs/mlflow) whose user `ditsweep` is made by the script of the Job mlflow-user, a Ray head started as KubeRay starts it (`ray start --head`,
0 CPUs: the driver's node, no trials) and `workers` worker nodes (`ray start --address`), each
with `cpus_per_worker` CPUs. Nodes are real `ray start` processes, not ray.cluster_utils: Ray
runs several raylets on one host when each has its own ports, and `ray start` is what a
cluster runs (KubeRay pods), including the dashboard's job server on the head.

Every node has its own working directory, TMPDIR and Ray temp dir under `base/NODE`, and, when
the kernel allows (`unshare -m`, as root or in a user namespace), its own mount namespace in
which the other nodes' directories and the client's are empty tmpfs mounts: a trial that reads
the driver's or the submitter's local disk fails, as on a real cluster. The namespace also
names a node's processes exactly, which is how `kill_worker` finds them (`isolated` says
whether this worked; without it the processes are found by temp dir and process tree).

The nodes get the environment a KubeRay pod gets from the ConfigMap and Secret: S3 endpoint
and keys, Ray's token, MLFLOW_TRACKING_URI with the user ditsweep's login, DITSWEEP_STORAGE
(s3://runs/ray), DITSWEEP_DATA_ROOT (s3://data), plus Ray's health checks lowered so that a dead node is declared dead within
about 5 s (HEALTH_ENV) instead of Ray's default 30 s or more.
"""

import json
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from configparser import ConfigParser
from pathlib import Path

import yaml

from procs import descendants, free_port, wait_for_port
from s3server import S3Server

RAY = str(Path(sys.executable).parent / "ray")
# GCS pings every raylet each second; 5 missed pings (2 s each at most) mark its node dead.
HEALTH_ENV = {"RAY_health_check_initial_delay_ms": "2000", "RAY_health_check_period_ms": "1000",
              "RAY_health_check_timeout_ms": "2000", "RAY_health_check_failure_threshold": "5"}
OBJECT_STORE_BYTES = 256 * 1024 ** 2  # per node; Ray's default (30% of RAM) per node adds up
MLFLOW_MANIFEST = Path(__file__).resolve().parents[1] / "cluster" / "base" / "mlflow.yaml"
ADMIN, USER = "admin", "ditsweep"  # MLflow's admin (people) and the sweeps' user (Ray's nodes)


class LoopbackCluster:
    def __init__(self, workers: int = 2, cpus_per_worker: float = 2, base: Path | None = None,
                 isolate: bool = True, extra_env: dict[str, str] | None = None):
        self.workers, self.cpus_per_worker = workers, cpus_per_worker
        # Under /tmp and short: Ray's Unix socket paths must stay under 108 characters.
        self.base = Path(base or tempfile.mkdtemp(prefix="lc", dir="/tmp"))
        self.client_dir = self.base / "client"
        self.client_dir.mkdir(parents=True, exist_ok=True)
        self.isolated = isolate and _can_unshare()
        self.extra_env = extra_env or {}
        self.token = secrets.token_hex(16)
        self.admin_password, self.password = secrets.token_hex(16), secrets.token_hex(16)
        self.s3: S3Server | None = None
        self.mlflow: subprocess.Popen | None = None
        self.tracking_uri = ""
        self.nodes: list[str] = []       # "head", "w0", "w1", ... of the running cluster
        self.namespaces: dict[str, str] = {}  # node -> its mount namespace ("mnt:[...]")
        self.gcs_port = self.dashboard_port = 0

    # --- addresses and environment -------------------------------------------------------------

    @property
    def head_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus what every node and client gets (the ConfigMap and Secret of a pod)."""
        env = {**os.environ, **self.s3.env(), **self.extra_env,
               "AWS_CONFIG_FILE": str(self.base / "no-aws-config"),  # never ~/.aws
               "AWS_SHARED_CREDENTIALS_FILE": str(self.base / "no-aws-credentials"),
               "MLFLOW_TRACKING_URI": self.tracking_uri,
               "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": self.password,
               "DITSWEEP_STORAGE": "s3://runs/ray", "DITSWEEP_DATA_ROOT": "s3://data",
               # Ray >= 2.59 protects clusters with a token: every node and client shares one.
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
               "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
               # The job's `python` is this test's interpreter, as in a pod whose image has one
               # Python: the venv's, whether or not the caller activated it.
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        for name in ("RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            env.pop(name, None)
        return env

    @property
    def admin_login(self) -> dict[str, str]:
        """MLflow's client environment of a person logged in as the admin."""
        return {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": self.admin_password}

    # --- services ------------------------------------------------------------------------------

    def _start_services(self) -> None:
        self.s3 = S3Server().start()
        for bucket in ("data", "runs"):
            self.s3.create_bucket(bucket)
        port = free_port()
        (self.base / "mlflow").mkdir(exist_ok=True)
        database = f"sqlite:///{self.base / 'mlflow' / 'mlflow.db'}"
        # The login's settings of cluster/base/mlflow.yaml; users in the runs' database, as there.
        docs = list(yaml.safe_load_all(MLFLOW_MANIFEST.read_text()))
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth"]
        ini = ConfigParser()
        ini.read_string(config_map["data"]["basic_auth.ini"])
        ini["mlflow"]["database_uri"] = database
        with open(self.base / "mlflow" / "basic_auth.ini", "w") as f:
            ini.write(f)
        self.mlflow = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", database, "--app-name", "basic-auth",
             "--artifacts-destination", "s3://runs/mlflow", "--workers", "1"],
            stdout=open(self.base / "mlflow" / "server.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**self.env, "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint_url,
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                 "MLFLOW_AUTH_CONFIG_PATH": str(self.base / "mlflow" / "basic_auth.ini"),
                 "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN, "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
                 "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
        self.tracking_uri = f"http://127.0.0.1:{port}"
        wait_for_port(port, timeout=120)
        # The sweeps' user, made as on the cluster: the Job mlflow-user's script, as the admin.
        (job,) = [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "mlflow-user"]
        script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        made = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              env={**self.env, **self.admin_login, "DITSWEEP_USER": USER,
                                   "DITSWEEP_PASSWORD": self.password})
        if made.returncode != 0:
            raise RuntimeError(f"the Job mlflow-user's script failed:\n{made.stderr[-3000:]}")

    # --- the Ray cluster -----------------------------------------------------------------------

    def start(self) -> "LoopbackCluster":
        """Start a fresh Ray cluster (empty node directories, new ports); services stay."""
        if self.s3 is None:
            self._start_services()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        # each node's worker ports: 200 of its own, below Linux's ephemeral range (free_port's)
        worker_ports = random.randrange(20000, 30000 - 200 * (self.workers + 1), 200)
        self.nodes = ["head"] + [f"w{i}" for i in range(self.workers)]
        for node in self.nodes:
            shutil.rmtree(self.base / node, ignore_errors=True)  # a new pod has an empty disk
            for sub in ("ray", "tmp"):
                (self.base / node / sub).mkdir(parents=True)
        for i, node in enumerate(self.nodes):
            self._start_node(node, worker_ports + 200 * i, worker_ports + 200 * i + 199)
        self.wait_for_nodes(len(self.nodes))
        return self

    def _start_node(self, node: str, min_worker_port: int, max_worker_port: int) -> None:
        d = self.base / node
        args = [RAY, "start", "--node-ip-address", "127.0.0.1", "--temp-dir", str(d / "ray"),
                "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats",
                "--include-log-monitor", "false",
                # every port a node opens, explicit: two nodes on one host must not collide
                "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--min-worker-port", str(min_worker_port), "--max-worker-port", str(max_worker_port),
                "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()),
                "--metrics-export-port", str(free_port())]
        if node == "head":  # as KubeRay's head: the driver and dashboard, 0 CPUs for trials
            args += ["--head", "--port", str(self.gcs_port), "--num-cpus", "0",
                     "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(free_port())]
        else:
            args += ["--address", self.head_address, "--num-cpus", str(self.cpus_per_worker)]
        env = {**self.env, **HEALTH_ENV, "TMPDIR": str(d / "tmp"), "RAY_TMPDIR": str(d / "ray")}
        command = " ".join(shlex.quote(a) for a in args)
        if self.isolated:
            # Hide every other node's directory and the client's: this node sees only its own.
            hidden = [self.base / n for n in self.nodes if n != node] + [self.client_dir]
            mounts = "; ".join(f"mount -t tmpfs -o size=1m lc-hidden {shlex.quote(str(h))}" for h in hidden)
            command = (f"set -e; {mounts}; readlink /proc/self/ns/mnt > {shlex.quote(str(d / 'mntns'))}; "
                       f"exec {command}")
            argv = ["unshare", "-m", *([] if os.geteuid() == 0 else ["-Ur"]), "sh", "-c", command]
        else:
            argv = ["sh", "-c", f"exec {command}"]
        for attempt in (1, 2, 3):
            proc = subprocess.run(argv, cwd=d, env=env, capture_output=True, text=True, timeout=300)
            if self.isolated and (d / "mntns").exists():
                self.namespaces[node] = (d / "mntns").read_text().strip()
            if proc.returncode == 0:
                break
            # On a busy machine a raylet gives up waiting for its agents (15 s): start it again.
            _kill(self.processes(node))
            if attempt == 3:
                raise RuntimeError(f"ray start of node {node} failed ({proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        if node == "head":
            wait_for_port(self.dashboard_port, timeout=120)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Wait until `count` nodes are alive in the GCS (the workers register after `ray start`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() == count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} Ray nodes not alive after {timeout} s ({self.alive_nodes()})")

    def alive_nodes(self) -> int:
        proc = subprocess.run([RAY, "list", "nodes", "--address", self.head_address, "--format",
                               "json", "--filter", "state=ALIVE"],
                              env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return len(json.loads(proc.stdout))
        except ValueError:
            return 0

    def processes(self, node: str) -> list[int]:
        """Every process of a node: its raylet, GCS (head), agents, and all its Ray workers."""
        if self.isolated:
            namespace, pids = self.namespaces.get(node), []
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and int(entry.name) != os.getpid():
                    try:
                        if namespace and os.readlink(entry / "ns" / "mnt") == namespace:
                            pids.append(int(entry.name))
                    except OSError:
                        continue
            return pids
        marker = str(self.base / node / "ray").encode()
        roots = [int(e.name) for e in Path("/proc").iterdir()
                 if e.name.isdigit() and marker in _cmdline(e)]
        return sorted({p for r in roots for p in [r] + [c for c, _ in descendants(r)]})

    def node_of(self, pid: int) -> str | None:
        """The node ("head", "w0", ...) a process runs on, or None."""
        return next((n for n in self.nodes if pid in self.processes(n)), None)

    def kill_worker(self, index: int) -> float:
        """SIGKILL every process of worker node `index` at once (a lost VM or a deleted pod);
        returns time.monotonic() of the kill."""
        node = f"w{index}"
        pids = self.processes(node)
        assert pids, f"worker node {node} has no processes"
        killed_at = time.monotonic()
        _kill(pids)
        return killed_at

    def stop(self) -> None:
        """The whole Ray cluster gone at once (the RayCluster deleted); services stay."""
        for node in self.nodes:
            _kill(self.processes(node))
        self.nodes = []

    def submit(self, entrypoint: list[str], timeout: float = 600, no_wait: bool = False,
               submission_id: str | None = None):
        """`ray job submit --working-dir .` from the client directory (the README's command).
        With no_wait, returns once the job is accepted (the job's id is in the output)."""
        args = [RAY, "job", "submit", "--address", self.dashboard_address, "--working-dir", "."]
        args += (["--no-wait"] if no_wait else []) + (["--submission-id", submission_id] if submission_id else [])
        for _ in range(30):  # the head's job agent needs a moment after `ray start`
            proc = subprocess.run([*args, "--", *entrypoint], cwd=self.client_dir, env=self.env,
                                  capture_output=True, text=True, timeout=timeout)
            if "No available agent" not in proc.stdout + proc.stderr:
                return proc
            time.sleep(2)
        return proc

    def job_logs(self, submission_id: str) -> str:
        proc = subprocess.run([RAY, "job", "logs", "--address", self.dashboard_address, submission_id],
                              env=self.env, capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    # --- context manager -----------------------------------------------------------------------

    def close(self) -> None:
        self.stop()
        if self.mlflow is not None and self.mlflow.poll() is None:
            os.killpg(self.mlflow.pid, signal.SIGKILL)
            self.mlflow.wait()
        if self.s3 is not None:
            self.s3.close()
        shutil.rmtree(self.base, ignore_errors=True)  # mounts live only in the nodes' namespaces

    def __enter__(self) -> "LoopbackCluster":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""


def _can_unshare() -> bool:
    """Whether `unshare -m` (as root) or `unshare -Urm` (a user namespace) can mount here."""
    argv = ["unshare", "-m", *([] if os.geteuid() == 0 else ["-Ur"]), "sh", "-c",
            "mount -t tmpfs none /mnt 2>/dev/null || mount -t tmpfs none /tmp"]
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
