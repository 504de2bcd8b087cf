"""ditsweep's own images, built with docker/build.sh and run as containers of this machine's engine
(Docker or Podman, docker/engine.sh), the way cluster/'s manifests run them.

    from containers import Engine, Manifests, build_images

    images = build_images()                   # {"cpu": "ditsweep-ray:ci-cpu", "mlflow": ...}
    engine = Engine()
    engine.run(["--rm", image, "true"])       # `ENGINE run ...` with the engine's flags
    m = Manifests(secrets={...})              # cluster/ read: ConfigMap, Secret keys, RayJob
    m.env(m.head)                             # the environment Kubernetes gives the head pod
    m.ray_start(m.head_group, head=True)      # `ray start` as KubeRay builds it from rayStartParams

Every container uses the host's network (builds need it on CI's machines, and it is what keeps
the cluster on loopback): Ray nodes therefore get every port explicitly, as tests/cluster.py's
nodes do. Environment goes in through --env-file, never on a command line.
"""

import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
TAG = "ci"


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
