"""Pre-flight: `python -m ditsweep.run SWEEP.yaml --check`, and briefly at the start of every
sweep on a cluster (RAY_ADDRESS set), before any trial starts.

One small Ray task runs on one node of each node type and GPU kind (node group label, accelerator
type, with or without GPUs) and checks there what a trial will need:

    versions   Python, Ray, torch, CUDA and NATTEN equal the driver's (Ray refuses a Python patch
               mismatch; NATTEN wheels are tied to one torch/CUDA build)
    natten     GPU nodes: libnatten is present and one na2d forward and backward equals the torch
               path (without the library NATTEN runs 3x slower, silently); CPU nodes: n/a
    data       every packed dataset's manifest is readable from there
    mlflow     the tracking server is reachable and writable (a run is created, then deleted)
    storage    the Tune storage path is writable; a local path on a cluster of several nodes
               must be one shared directory (a volume mounted on every node: NFS, a ReadWriteMany
               PVC): the marker file the driver wrote there is read back on each node type
    fid        the InceptionV3 weights file exists, where FID is enabled

and on the driver: the working directory fits `ray job submit`'s upload limit (the files Ray
would upload, i.e. honouring .gitignore and .rayignore as Ray does), naming the biggest offenders;
and, on a cluster of more than one node, that tracking.uri and each dataset are not local paths
(each node would see its own disk), one line per field.
It prints a table; any failure names the node and the item, and the sweep exits 2.
"""

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from ditsweep.config import Sweep, TrialConfig

WORKING_DIR_LIMIT = 100 * 1024 * 1024  # bytes; `ray job submit` refuses larger uploads
PROBE_TIMEOUT_S = 180.0                # a node whose probe cannot start by then fails the check
MLFLOW_TIMEOUT_S = 10                  # per HTTP request to the tracking server during the check


@dataclass
class Check:
    node: str
    item: str
    ok: bool | None  # None: not applicable here
    detail: str


def versions() -> dict[str, str]:
    import torch
    try:
        import natten
        natten_version = natten.__version__
    except ImportError:
        natten_version = "not installed"
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "natten": natten_version}


def probe(spec: dict) -> list[dict]:
    """Everything checked on one node; runs as a Ray task (and is importable without Ray)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(MLFLOW_TIMEOUT_S)
    checks = []

    def run(item: str, fn, *args) -> None:
        try:
            ok, detail = fn(*args)
        except Exception as e:  # noqa: BLE001 - every problem is a failed check, with its reason
            ok, detail = False, f"{type(e).__name__}: {_one_line(e)}"
        checks.append({"item": item, "ok": ok, "detail": detail})

    run("versions", _check_versions, spec["driver_versions"])
    run("natten", _check_natten)
    for uri in spec["datasets"]:
        run(f"data {uri}", _check_manifest, uri, spec["resolution"])
    run("mlflow", _check_mlflow, spec["tracking_uri"], spec["experiment"])
    run("storage", _check_storage, spec["storage"])
    if spec.get("storage_marker"):
        run("storage shared", _check_shared, spec["storage"], spec["storage_marker"])
    if spec["fid_weights"] is not None:
        run("fid weights", _check_fid, spec["fid_weights"][0])
    return checks


def _check_versions(driver: dict) -> tuple[bool, str]:
    here = versions()
    differ = [f"{k} {here[k]} (driver {driver[k]})" for k in driver if here.get(k) != driver[k]]
    if differ:
        return False, "differs from the driver: " + ", ".join(differ)
    return True, " ".join(f"{k} {v}" for k, v in here.items())


def _check_natten() -> tuple[bool | None, str]:
    import torch
    if not torch.cuda.is_available():
        return None, "not applicable (no GPU on this node; CPU trials use the torch path)"
    from ditsweep.models.attention import has_libnatten, natten_na2d, neighborhood_attention
    if not has_libnatten():
        return False, ("NATTEN has no CUDA library (natten.HAS_LIBNATTEN is False): local attention "
                       "would run ~3x slower; install a NATTEN build for this torch/CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, W, heads, D, k = 2, 8, 8, 2, 32, 3
    q, key, v = (torch.randn(B, H, W, heads, D, device="cuda", generator=g, requires_grad=True)
                 for _ in range(3))
    out = natten_na2d(q, key, v, k)
    grads = torch.autograd.grad(out.square().sum(), (q, key, v))
    flat = lambda x: x.detach().reshape(B, H * W, heads, D).transpose(1, 2).requires_grad_(True)  # noqa: E731
    q2, k2, v2 = flat(q), flat(key), flat(v)
    ref = neighborhood_attention(q2, k2, v2, (H, W), k)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q2, k2, v2))
    back = lambda x: x.transpose(1, 2).reshape(B, H, W, heads, D)  # noqa: E731
    err = max([(out - back(ref)).abs().max().item()]
              + [(a - back(b)).abs().max().item() for a, b in zip(grads, ref_grads)])
    if err > 1e-3:
        return False, f"na2d forward/backward differs from the torch path by {err:.2e}"
    return True, f"libnatten on {torch.cuda.get_device_name()}: na2d fwd+bwd = torch path (max diff {err:.1e})"


def _check_manifest(uri: str, resolution: int) -> tuple[bool, str]:
    from ditsweep.data.split import open_packed
    _, manifest = open_packed(uri, resolution)
    return True, f"manifest: {manifest.count} images, {len(manifest.shards)} shards"


def _check_mlflow(uri: str, experiment: str) -> tuple[bool, str]:
    from mlflow.tracking import MlflowClient

    from ditsweep.tracking.mlflow_runs import ROLE_TAG, safe_uri
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                client.create_experiment(experiment)
            except Exception:  # noqa: BLE001 - another node's check created it first; read it below
                pass
            exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id
        run = client.create_run(exp_id, run_name="preflight", tags={ROLE_TAG: "preflight"})
        client.log_metric(run.info.run_id, "preflight", 1.0)
        client.delete_run(run.info.run_id)  # reports and searches never see it
    except Exception as e:  # noqa: BLE001 - MLflow raises many types for "cannot reach"
        cause = _one_line(e).split("Caused by ")[-1]  # urllib3 puts the reason last
        return False, _login_problem(cause, safe_uri(uri), experiment) or \
            f"tracking server {safe_uri(uri)} not reachable or not writable ({type(e).__name__}: {cause[:200]})"
    return True, f"{safe_uri(uri)}: created and deleted a run in {experiment!r}"


def _login_problem(cause: str, uri: str, experiment: str) -> str | None:
    """One line for a tracking server that refused the login (HTTP 401) or the write (403), naming
    what to set; None for any other failure. MLflow's client sends MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) of the process, here of the node."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if "error code 401" in cause:
        login = (user and os.environ.get("MLFLOW_TRACKING_PASSWORD")) or os.environ.get("MLFLOW_TRACKING_TOKEN")
        if not login:
            return (f"tracking server {uri} requires a login, but MLFLOW_TRACKING_USERNAME and "
                    f"MLFLOW_TRACKING_PASSWORD are not set here (on Kubernetes: the Secret's "
                    f"MLFLOW_TRACKING_PASSWORD, cluster/README.md)")
        return (f"tracking server {uri} refused the login of user {user!r} (HTTP 401): "
                f"MLFLOW_TRACKING_PASSWORD is wrong or the user does not exist (on Kubernetes the Job "
                f"mlflow-user sets it from the Secret, cluster/README.md)")
    if "error code 403" in cause:
        return (f"user {user!r} may not write to experiment {experiment!r} on {uri} (HTTP 403): "
                f"another user created it; have the admin grant {user!r} EDIT on it, or rename the sweep")
    return None


def _check_storage(path: str) -> tuple[bool, str]:
    name = f".ditsweep-preflight-{platform.node()}-{os.getpid()}"
    if "://" in path:
        import pyarrow.fs
        fs, root = pyarrow.fs.FileSystem.from_uri(path)
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(b"ok")
        fs.delete_file(f"{root}/{name}")
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / name).write_bytes(b"ok")
        (Path(path) / name).unlink()
    return True, f"{path}: wrote and removed a file"


def _check_shared(path: str, marker: dict) -> tuple[bool, str]:
    found = Path(_local(path)) / marker["name"]
    if found.is_file() and found.read_text() == marker["token"]:
        return True, f"{path}: the driver's marker file is here (one shared directory)"
    return False, (f"{path} is not the driver's directory here (no marker file {marker['name']}): "
                   f"mount one shared volume there on every node, or {SHARED_INSTEAD['storage_path']}")


def write_marker(storage: str) -> dict:
    """A file only this pre-flight writes, in a local storage_path, for every node to look for."""
    import secrets
    marker = {"name": f".ditsweep-shared-{secrets.token_hex(8)}", "token": secrets.token_hex(16)}
    Path(_local(storage)).mkdir(parents=True, exist_ok=True)
    (Path(_local(storage)) / marker["name"]).write_text(marker["token"])
    return marker


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _check_fid(weights: str | None) -> tuple[bool, str]:
    try:
        from ditsweep.config.weights import check_weights_path
    except ImportError:
        from ditsweep.eval.fid import check_weights_path
    check_weights_path(weights)  # ValueError with the reason
    return True, f"{weights}"


def working_dir_checks(root: Path, limit: int = WORKING_DIR_LIMIT) -> Check:
    """What `ray job submit --working-dir ROOT` would upload, with Ray's own exclusion rules."""
    from ray._private.runtime_env.packaging import _dir_travel
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    sizes: dict[Path, int] = {}

    def add(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            sizes[path] = path.stat().st_size  # uncompressed: checkpoints and wheels barely zip

    _dir_travel(root.resolve(), [], add, include_gitignore=include_gitignore)
    total = sum(sizes.values())
    top: dict[str, int] = {}
    for path, size in sizes.items():
        first = path.relative_to(root.resolve()).parts[0]
        top[first] = top.get(first, 0) + size
    worst = [kv for kv in sorted(top.items(), key=lambda kv: -kv[1])[:3] if kv[1] >= limit // 100]
    biggest = [kv for kv in sorted(sizes.items(), key=lambda kv: -kv[1])[:3] if kv[1] >= limit // 100]
    detail = (f"{_mib(total)} in {len(sizes)} files (limit {_mib(limit)}; .gitignore/.rayignore "
              "honoured)")
    if total <= limit:
        return Check("driver", "working dir", True, detail)
    return Check("driver", "working dir", False, detail + "; biggest: "
                 + ", ".join(f"{name}/ {_mib(s)}" if (root / name).is_dir() else f"{name} {_mib(s)}"
                             for name, s in worst)
                 + "; largest files: " + ", ".join(f"{p.relative_to(root.resolve())} {_mib(s)}"
                                                   for p, s in biggest)
                 + "; add them to .rayignore or move them out")


# What to use instead of a local path, per field of the sweep file.
SHARED_INSTEAD = {
    "storage_path": "use s3://bucket/prefix (or set DITSWEEP_STORAGE)",
    "tracking.uri": "run an `mlflow server` and use its http:// URI (or set MLFLOW_TRACKING_URI)",
    "grid.dataset": "pack it to s3://bucket/prefix (python -m ditsweep.data pack)",
}


def is_local(uri: str) -> bool:
    """A path on one machine's disk: no scheme, file://, or MLflow's sqlite:/file: stores."""
    return "://" not in uri or uri.startswith(("file:", "sqlite:"))


def local_path_checks(tracking_uri: str, datasets: list[str], nodes: int) -> list[Check]:
    """On a cluster of several nodes a local path is a different disk on each node: one MLflow
    store per node, data missing on the workers. One failed check per local path, naming its
    field; none on a single node. (A local storage_path may be a shared volume: the probes
    look for the driver's marker file there.)"""
    if nodes <= 1:
        return []
    local = []
    if is_local(tracking_uri) and not tracking_uri.startswith("databricks"):
        local.append(("tracking.uri", tracking_uri))
    local += [("grid.dataset", d) for d in datasets if not d.startswith("builtin:") and is_local(d)]
    return [Check("driver", field, False, f"{value} is a local path but the cluster has {nodes} "
                  f"nodes; {SHARED_INSTEAD[field]}") for field, value in local]


def node_groups() -> list[tuple[str, dict]]:
    """(label, node) for one alive node of each node type and GPU kind."""
    groups: dict[tuple, tuple[str, dict]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res, labels = node.get("Resources", {}), node.get("Labels", {}) or {}
        gpu_kind = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")),
                        "gpu" if res.get("GPU") else "cpu")
        group = labels.get("ray.io/node-group") or labels.get("ray.io/node-type") or ""
        head = "head" if "node:__internal_head__" in res else ""  # the driver's node: a type of its own
        key = (group, head, gpu_kind, res.get("GPU", 0) > 0)
        where = " ".join(dict.fromkeys(p for p in (node.get("NodeManagerHostname"), node.get("NodeManagerAddress")) if p))
        name = f"{where} ({', '.join(p for p in (group, head, gpu_kind) if p)})"
        groups.setdefault(key, (name, node))
    return sorted(groups.values(), key=lambda g: g[0])


def connect() -> None:
    """Join the cluster of RAY_ADDRESS, or start a local Ray, exactly as run_sweep would."""
    if ray.is_initialized():
        return
    from ditsweep.data.credentials import move_env_credentials_to_file
    move_env_credentials_to_file()
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=None if address != "local" else False)


def run_checks(sweep: Sweep, trials: list[TrialConfig], storage: str) -> list[Check]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    connect()
    first = trials[0]
    fid = sweep.eval.fid
    spec = {"driver_versions": versions(), "resolution": sweep.data.resolution,
            "datasets": sorted({t.dataset for t in trials if not t.dataset.startswith("builtin:")}),
            "tracking_uri": first.tracking_uri, "experiment": first.experiment, "storage": storage,
            "fid_weights": [fid.feature_extractor_weights_path] if fid.enabled else None}
    checks = [working_dir_checks(Path.cwd())]
    groups = node_groups()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    checks += local_path_checks(first.tracking_uri, spec["datasets"], nodes)
    if nodes > 1 and is_local(storage):
        try:
            spec["storage_marker"] = write_marker(storage)
        except OSError as e:
            checks.append(Check("driver", "storage_path", False, f"{storage}: cannot write there ({e})"))
    remote = ray.remote(probe)
    refs = {}
    for name, node in groups:
        gpus = 0.01 if node.get("Resources", {}).get("GPU") else 0  # CUDA visible, GPU still free
        refs[name] = remote.options(num_cpus=0, num_gpus=gpus, max_retries=0,
                                    scheduling_strategy=NodeAffinitySchedulingStrategy(
                                        node["NodeID"], soft=False)).remote(spec)
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    for name, ref in refs.items():
        try:
            found = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            checks += [Check(name, c["item"], c["ok"], c["detail"]) for c in found]
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            checks.append(Check(name, "probe", False, f"the check task did not run within "
                                f"{PROBE_TIMEOUT_S:.0f} s (node busy or its resources taken?)"))
        except Exception as e:  # noqa: BLE001 - a node that cannot run a task fails the check
            checks.append(Check(name, "probe", False, f"{type(e).__name__}: {_one_line(e)}"))
    if spec.get("storage_marker"):
        (Path(_local(storage)) / spec["storage_marker"]["name"]).unlink(missing_ok=True)
    return checks


def table(checks: list[Check]) -> str:
    rows = [("node", "check", "result", "detail")] + [
        (c.node, c.item, {True: "ok", False: "FAILED", None: "n/a"}[c.ok], c.detail) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)


def preflight(sweep: Sweep, trials: list[TrialConfig], storage: str, brief: bool = False) -> bool:
    """Run the checks and print them; False (after naming each failure) if any failed."""
    start = time.monotonic()
    checks = run_checks(sweep, trials, storage)
    failed = [c for c in checks if c.ok is False]
    nodes = len({c.node for c in checks} - {"driver"})
    if not brief or failed:
        print(table(checks))
    for c in failed:
        print(f"preflight FAILED on {c.node}: {c.item}: {c.detail}", file=sys.stderr)
    verdict = "FAILED" if failed else "passed"
    print(f"preflight {verdict}: {len(checks) - len(failed)}/{len(checks)} checks on {nodes} node "
          f"type(s) in {time.monotonic() - start:.1f} s" + ("; no trial started" if failed else ""))
    return not failed


def _one_line(e: BaseException) -> str:
    from ditsweep.data.errors import scrub
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return scrub(lines[-1] if lines and lines[0].startswith(("ray::", "Traceback")) else
                 (lines[0] if lines else ""))[:300]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
