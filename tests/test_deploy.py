"""The deployment (docker/, cluster/, .dockerignore), checked offline: no container engine and no
Kubernetes cluster exist where these tests run.

- Every manifest parses, and the three kustomizations (cluster/, cluster/interactive/,
  cluster/resume/) render, here in Python and, where kubectl is installed, with `kubectl
  kustomize` too.
- The core Kubernetes objects, and every Ray pod template, validate against Kubernetes' own
  schemas (kubernetes-validate, strict: unknown fields are errors).
- The RayJob and RayCluster validate against KubeRay's ray.io/v1 CRD schema: the required fields,
  types and field names kept in tests/fixtures/kuberay/ (source version in its header).
- What the images install resolves to pyproject.toml's pins; the MLflow server is the client's
  version; the GPU image's CUDA is the pinned torch build's.
- The RayJob runs the README's entry point on a sweep file that exists and passes --dry-run.
- Secrets only in the Secret: not in ConfigMaps, images, git or the Docker build context.
"""

import base64
import copy
import fnmatch
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import PYTHON, REPO

CLUSTER = REPO / "cluster"
RAY_DOCKERFILE = REPO / "docker" / "ray.Dockerfile"
MLFLOW_DOCKERFILE = REPO / "docker" / "mlflow.Dockerfile"
KUBERAY_SCHEMA = REPO / "tests" / "fixtures" / "kuberay" / "ray.io_v1.schema.yaml"
# The kustomizations a researcher applies (kubectl apply -k cluster/<dir>), by directory.
KUSTOMIZATIONS = ["", "interactive", "resume"]
# Kubernetes versions whose schemas the core objects must satisfy: the oldest we support and
# the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.30", latest_version()]
SECRET_NAME = "ditsweep-secrets"
CONFIG_NAME = "ditsweep-config"
SECRET_LOOKING = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL", re.I)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEPENDENCIES = {canonicalize_name(Requirement(d).name): Requirement(d)
                for d in PYPROJECT["project"]["dependencies"]}


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins for a package (torch==2.14.1 -> '2.14.1')."""
    (spec,) = [s for s in DEPENDENCIES[canonicalize_name(name)].specifier if s.operator == "=="]
    return spec.version


# ---------------------------------------------------------------------------------------------
# Rendering the kustomizations
# ---------------------------------------------------------------------------------------------

def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def read_env_file(path: Path) -> dict[str, str]:
    """A kustomize env file. secrets.env is never in git: its .example stands in for it."""
    if not path.exists():
        path = path.with_name(path.name + ".example")
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def walk_containers(node):
    """Every container (and init container) anywhere in an object, custom resources included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from walk_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_containers(item)


def json_patch(obj: dict, operations: list[dict]) -> None:
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target = obj
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        assert op["op"] in ("replace", "add"), f"json_patch: op {op['op']} not supported here"
        if op["op"] == "replace":
            assert last in target, f"json_patch: replace of missing {op['path']}"
        target[last] = op["value"]


@cache
def render(directory: str) -> tuple[dict, ...]:
    """The objects `kubectl apply -k cluster/<directory>` applies, rendered in Python: the
    kustomize features cluster/ uses (resources, components with images, secretGenerator,
    namespace, JSON patches). test_python_rendering_matches_kubectl_kustomize holds it to the
    real thing."""
    root = CLUSTER / directory
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = (root / resource).resolve()
        if path.is_dir():
            objects += copy.deepcopy(list(render(str(path.relative_to(CLUSTER.resolve())))))
        else:
            objects += load_documents(path)
    for generator in kustomization.get("secretGenerator", []):
        data = {}
        for env in generator.get("envs", []):
            data.update(read_env_file(root / env))
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": generator["name"]},
                        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
    images = {}
    for component in kustomization.get("components", []):
        spec = yaml.safe_load((root / component / "kustomization.yaml").read_text())
        assert spec["kind"] == "Component"
        images.update({i["name"]: f"{i['newName']}:{i['newTag']}" for i in spec.get("images", [])})
    for container in walk_containers(objects):
        container["image"] = images.get(container["image"], container["image"])
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matches = [o for o in objects
                   if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        assert len(matches) == 1, f"{directory}: patch target {target} matches {len(matches)} objects"
        json_patch(matches[0], yaml.safe_load(patch["patch"]))
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return tuple(objects)


def all_objects() -> list[dict]:
    """Every distinct object of the three kustomizations."""
    seen = {}
    for directory in KUSTOMIZATIONS:
        for obj in render(directory):
            seen.setdefault((obj["kind"], obj["metadata"]["name"]), obj)
    return list(seen.values())


def find(objects, kind: str, name: str | None = None) -> dict:
    (match,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return match


def rayjob() -> dict:
    return find(load_documents(CLUSTER / "placement" / "rayjob.yaml"), "RayJob")


def config_map() -> dict:
    return find(render(""), "ConfigMap", CONFIG_NAME)


def ray_pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a RayJob's or RayCluster's head and worker groups."""
    spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return templates


def ray_objects() -> list[dict]:
    return [o for o in all_objects() if o["apiVersion"].startswith("ray.io/")]


# ---------------------------------------------------------------------------------------------
# Manifests: parse, render, validate
# ---------------------------------------------------------------------------------------------

def test_every_manifest_parses_and_names_its_object():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert files, "no manifests in cluster/"
    for path in files:
        for doc in load_documents(path):
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: no apiVersion/kind"
            if not path.name == "kustomization.yaml":
                assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without a name"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: f"cluster/{d}")
def test_kustomization_renders_and_lists_every_manifest(directory):
    objects = render(directory)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "StatefulSet"} <= kinds
    assert kinds & {"RayJob", "RayCluster"}, f"cluster/{directory}: no Ray cluster"
    for obj in objects:
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "ditsweep"
    # No manifest lies around unused: each file of cluster/ is in some kustomization.
    listed = set()
    for kustomization in CLUSTER.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        listed |= {(kustomization.parent / r).resolve() for r in k.get("resources", [])}
    manifests = {p.resolve() for p in CLUSTER.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests <= listed, f"not in any kustomization: {sorted(map(str, manifests - listed))}"


def kubectl_kustomize(directory: str, tmp_path: Path) -> list[dict]:
    tree = tmp_path / "cluster"
    shutil.copytree(CLUSTER, tree)
    secrets = tree / "base" / "secrets.env"
    if not secrets.exists():
        shutil.copy(tree / "base" / "secrets.env.example", secrets)
    proc = subprocess.run(["kubectl", "kustomize", str(tree / directory)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: f"cluster/{d}")
def test_python_rendering_matches_kubectl_kustomize(directory, tmp_path):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot be compared here")

    def summary(objects):
        return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]):
                (sorted(c["image"] for c in walk_containers(o)), o.get("spec", {}).get("entrypoint"))
                for o in objects}

    assert summary(kubectl_kustomize(directory, tmp_path)) == summary(render(directory))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_and_ray_pod_templates_validate_against_kubernetes_schemas(version):
    checked = 0
    for obj in all_objects():
        if obj["apiVersion"].startswith("ray.io/"):
            # The pods KubeRay will create: each template in full, as a core v1 PodTemplate
            # (the RayJob's submitter too).
            templates = ray_pod_templates(obj)
            if "submitterPodTemplate" in obj["spec"]:
                templates = templates + [("submitter", obj["spec"]["submitterPodTemplate"])]
            for where, template in templates:
                pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                                "metadata": {"name": obj["metadata"]["name"]}, "template": template}
                try:
                    kubernetes_validate.validate(pod_template, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{obj['kind']} {obj['metadata']['name']}, {where}: {e.message} "
                                f"at {'/'.join(map(str, e.absolute_path))} (Kubernetes {version})")
                checked += 1
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {e.message} at "
                        f"{'/'.join(map(str, e.absolute_path))} (Kubernetes {version})")
        checked += 1
    assert checked >= 10


@cache
def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{kind}"})


def kuberay_errors(obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in kuberay_validator(obj["kind"]).iter_errors(obj)]


def test_ray_resources_match_the_kuberay_crd_schema():
    objects = ray_objects()
    assert {o["kind"] for o in objects} == {"RayJob", "RayCluster"}
    for obj in objects:
        assert obj["apiVersion"] == "ray.io/v1"
        assert not kuberay_errors(obj), f"{obj['kind']} {obj['metadata']['name']}: {kuberay_errors(obj)}"


def _cluster(job):
    return job["spec"]["rayClusterSpec"]


def _head_container(job):
    return _cluster(job)["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("edit", [
    pytest.param(lambda j: j["spec"].update(shutdownAfterJobFinish=True), id="misspelt field"),
    pytest.param(lambda j: j["spec"].update(ttlSecondsAfterFinished="600"), id="TTL as a string"),
    pytest.param(lambda j: _cluster(j)["workerGroupSpecs"][0].update(maxReplicas=2**31),
                 id="int32 overflow"),
    pytest.param(lambda j: _cluster(j)["workerGroupSpecs"][0].pop("groupName"),
                 id="worker group without a name"),
    pytest.param(lambda j: _cluster(j)["headGroupSpec"].pop("template"), id="head without a template"),
    pytest.param(lambda j: _cluster(j)["autoscalerOptions"].update(upscalingMode="Fast"),
                 id="unknown upscaling mode"),
    pytest.param(lambda j: j["spec"].update(managedBy="ray.io/kuberay-operator"),
                 id="field of a later KubeRay"),
    pytest.param(lambda j: _head_container(j).pop("name"), id="container without a name"),
])
def test_kuberay_schema_catches(edit, request):
    """The CRD check is not vacuous: each of these mistakes fails it."""
    job = copy.deepcopy(rayjob())
    edit(job)
    assert kuberay_errors(job), f"the KubeRay schema accepts a RayJob with: {request.node.callspec.id}"


# ---------------------------------------------------------------------------------------------
# What the RayJob runs
# ---------------------------------------------------------------------------------------------

def entrypoint_argv(job: dict) -> list[str]:
    return shlex.split(job["spec"]["entrypoint"])


def test_rayjob_runs_the_readme_entry_point_and_cleans_up():
    job = rayjob()
    argv = entrypoint_argv(job)
    # `python -m ditsweep.run SWEEP.yaml`, exactly the README's command (no cluster-only path).
    assert argv[:3] == ["python", "-m", "ditsweep.run"] and len(argv) == 4, argv
    assert argv[3].startswith("sweeps/") and argv[3].endswith(".yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["submissionMode"] == "K8sJobMode"
    # A retry runs in a new Ray cluster and continues the sweep from MLflow and S3 (finished
    # trials kept, interrupted ones from their checkpoints: tests/test_cluster.py), so a lost
    # cluster is retried; a few times only, since a deterministic failure fails again.
    assert 1 <= spec.get("backoffLimit", 0) <= 3, spec.get("backoffLimit")


def test_rayjob_sweep_file_exists_and_passes_dry_run():
    argv = entrypoint_argv(rayjob())
    sweep = REPO / argv[3]
    assert (REPO / "ditsweep" / "run.py").is_file(), "ditsweep/run.py (the entry point) is missing"
    assert sweep.is_file(), (
        f"the RayJob (cluster/placement/rayjob.yaml) runs {argv[3]}, which is not a file of the "
        f"repository (the image copies the repository's sweeps/ into its working directory)")
    # The environment the entry point gets on the head: the ConfigMap (the Secret's S3 keys are
    # not needed to expand and validate a sweep).
    env = {**os.environ, **config_map()["data"]}
    proc = subprocess.run([PYTHON, *argv[1:], "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (f"`{' '.join(argv)} --dry-run` failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def test_rayjob_cluster_has_a_cpu_head_and_autoscaling_gpu_workers():
    cluster = rayjob()["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned("ray"), "rayVersion must be the images' Ray"
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "trials must not land on the head"
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"] == "ditsweep-ray-cpu"
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {})

    (workers,) = cluster["workerGroupSpecs"]
    assert 0 <= workers["minReplicas"] <= workers.get("replicas", 0) <= workers["maxReplicas"]
    assert workers["minReplicas"] < workers["maxReplicas"], "the GPU group must be able to scale"
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ditsweep-ray-gpu"
    resources = container["resources"]
    # Extended resources: requests must equal limits, and a worker needs at least one GPU.
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) \
        == resources["limits"]["nvidia.com/gpu"]
    # Shared memory for data loaders and the object store: a memory emptyDir on /dev/shm.
    for where, template in ray_pod_templates(rayjob()):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        (c,) = template["spec"]["containers"]
        shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{where}: no /dev/shm volume"
        assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", where


def test_ray_containers_get_settings_from_the_configmap_and_keys_from_the_secret():
    secret_keys = set(read_env_file(CLUSTER / "base" / "secrets.env"))
    for obj in ray_objects():
        for where, template in ray_pod_templates(obj):
            (c,) = template["spec"]["containers"]
            assert {"configMapRef": {"name": CONFIG_NAME}} in c.get("envFrom", []), where
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})}
            assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN",
                                 "MLFLOW_TRACKING_PASSWORD"}, where
            assert all(r["name"] == SECRET_NAME and r["key"] == name and r["key"] in secret_keys
                       for name, r in refs.items())
            assert c["workingDir"] == dockerfile_workdir(RAY_DOCKERFILE), \
                f"{where}: the entry point's relative sweep path needs the image's working directory"


def test_resume_overlay_adds_only_resume_to_the_entrypoint():
    name = rayjob()["metadata"]["name"]
    base_job, resumed = find(render(""), "RayJob", name), find(render("resume"), "RayJob", name)
    assert resumed["spec"]["entrypoint"] == base_job["spec"]["entrypoint"] + " --resume"
    assert {k: v for k, v in resumed["spec"].items() if k != "entrypoint"} == \
        {k: v for k, v in base_job["spec"].items() if k != "entrypoint"}
    names = lambda d: {(o["kind"], o["metadata"]["name"]) for o in render(d)}
    assert names("resume") <= names(""), "resume applies nothing that cluster/ does not"


def test_interactive_raycluster_is_the_rayjob_cluster():
    cluster = find(load_documents(CLUSTER / "interactive" / "raycluster.yaml"), "RayCluster")
    assert cluster["spec"] == rayjob()["spec"]["rayClusterSpec"], \
        "cluster/interactive/raycluster.yaml drifted from the RayJob's rayClusterSpec"


# ---------------------------------------------------------------------------------------------
# Who gets in: Ray's token, MLflow's login, NetworkPolicies (tried for real: tests/test_cluster.py)
# ---------------------------------------------------------------------------------------------

RAY_TOKEN_ENV = [{"name": "RAY_AUTH_MODE", "value": "token"},
                 {"name": "RAY_AUTH_TOKEN",
                  "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": "RAY_AUTH_TOKEN"}}}]


def test_every_ray_container_presents_the_token_from_the_secret():
    """A Ray process or client without the token is refused, so every container KubeRay makes for
    the RayJob and the RayCluster carries it: head, workers, the autoscaler KubeRay adds to the
    head pod (autoscalerOptions.env), and the RayJob's submitter. Nothing else gets it."""
    for obj in ray_objects():
        spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
        envs = {"autoscaler": spec["autoscalerOptions"].get("env", [])}
        envs |= {f"{where} {c['name']}": c.get("env", [])
                 for where, template in ray_pod_templates(obj) for c in template["spec"]["containers"]}
        if obj["kind"] == "RayJob":
            submitter = obj["spec"]["submitterPodTemplate"]["spec"]
            (c,) = submitter["containers"]
            assert "command" not in c and "args" not in c, "KubeRay fills in `ray job submit` itself"
            assert c["image"] == _head_container(obj)["image"] and submitter["restartPolicy"] == "Never"
            envs["submitter"] = c.get("env", [])
        for where, env in envs.items():
            assert all(e in env for e in RAY_TOKEN_ENV), f"{obj['kind']} {obj['metadata']['name']}, {where}"
    for obj in all_objects():
        if not obj["apiVersion"].startswith("ray.io/"):
            for c in walk_containers(obj):
                assert "RAY_AUTH_TOKEN" not in {e["name"] for e in c.get("env", [])}, c["name"]


def test_mlflow_server_requires_a_login_and_the_sweeps_log_in_as_their_own_user():
    objects = render("")
    (c,) = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    for name, key in [("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY"),
                      ("PGPASSWORD", "POSTGRES_PASSWORD")]:
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": key}, name
    # The login's settings: the ConfigMap mounted where MLFLOW_AUTH_CONFIG_PATH points, read as
    # mlflow.server.auth.config reads it. No password in it: the admin's comes from the
    # environment, the database's from PGPASSWORD (libpq).
    import configparser
    from sqlalchemy.engine import make_url
    path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if path.parent == Path(m["mountPath"])]
    (volume,) = [v for v in find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == mount["name"]]
    ini = configparser.ConfigParser()
    ini.read_string(find(objects, "ConfigMap", volume["configMap"]["name"])["data"][path.name])
    settings = ini["mlflow"]
    assert settings["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert "admin_password" not in settings
    url = make_url(settings["database_uri"])
    postgres = find(objects, "Service", "postgres")
    assert url.password is None and url.host == postgres["metadata"]["name"]
    assert url.port == postgres["spec"]["ports"][0]["port"]
    assert (url.username, url.database) == (config_map()["data"]["POSTGRES_USER"], config_map()["data"]["POSTGRES_DB"])
    # The sweeps log in as their own user, not as the admin; the Job mlflow-user creates it,
    # logged in as the admin, and runs again on the next apply (ttlSecondsAfterFinished).
    data = config_map()["data"]
    assert data["MLFLOW_TRACKING_USERNAME"] != data["MLFLOW_AUTH_ADMIN_USERNAME"]
    job = find(objects, "Job", "mlflow-user")
    assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= 3600
    (jc,) = job["spec"]["template"]["spec"]["containers"]
    assert jc["image"] == c["image"] and jc["command"][:2] == ["python", "-c"]
    compile(jc["command"][2], "mlflow-user", "exec")
    jenv = {e["name"]: e["valueFrom"] for e in jc["env"] if "valueFrom" in e}
    assert jenv["MLFLOW_TRACKING_USERNAME"]["configMapKeyRef"]["key"] == "MLFLOW_AUTH_ADMIN_USERNAME"
    assert jenv["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["key"] == "MLFLOW_AUTH_ADMIN_PASSWORD"
    assert jenv["DITSWEEP_USER"]["configMapKeyRef"]["key"] == "MLFLOW_TRACKING_USERNAME"
    assert jenv["DITSWEEP_PASSWORD"]["secretKeyRef"]["key"] == "MLFLOW_TRACKING_PASSWORD"


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) applied to labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        if not {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
                "Exists": has, "DoesNotExist": not has}[e["operator"]]:
            return False
    return True


def admitted(policies: list[dict], target: dict, port: int, source: dict | None) -> bool:
    """Whether NetworkPolicies let `source` (labels and namespace of a pod; None: an address
    outside the cluster) connect to TCP `port` of a pod labelled `target`, as the API defines it:
    a pod no policy selects takes anything; a selected one what some rule of theirs allows."""
    selecting = [p["spec"] for p in policies if _selects(p["spec"]["podSelector"], target)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for rule in [r for spec in selecting for r in spec.get("ingress", [])]:
        if rule.get("ports") and not any(p.get("port") in (port, None) and p.get("protocol", "TCP") == "TCP"
                                         for p in rule["ports"]):
            continue
        for peer in rule.get("from", [{"ipBlock": {"cidr": "0.0.0.0/0"}}]):
            if "ipBlock" in peer:
                return True  # ditsweep's policies have none: any ipBlock admits too much here
            if source is None:
                continue
            same = "namespaceSelector" not in peer and source["namespace"] == "ditsweep"
            other = "namespaceSelector" in peer and _selects(peer["namespaceSelector"],
                                                             {"kubernetes.io/metadata.name": source["namespace"]})
            if (same or other) and _selects(peer.get("podSelector", {}), source["labels"]):
                return True
    return False


def test_network_policies_let_only_the_namespace_in_and_only_mlflow_into_postgres():
    policies = [o for o in render("") if o["kind"] == "NetworkPolicy"]
    assert policies, "no NetworkPolicy in cluster/"
    # Every pod the platform, the RayJob and the RayCluster make, with its labels and ports.
    pods = {}
    for obj in all_objects():
        if obj["apiVersion"].startswith("ray.io/"):
            templates = ray_pod_templates(obj) + ([("submitter", obj["spec"]["submitterPodTemplate"])]
                                                  if "submitterPodTemplate" in obj["spec"] else [])
            pods |= {f"{obj['kind']} {where}": t for where, t in templates}
        elif "template" in obj.get("spec", {}):
            pods[f"{obj['kind']} {obj['metadata']['name']}"] = obj["spec"]["template"]
    ports = {name: [p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])]
             for name, t in pods.items()}
    labels = {name: t["metadata"]["labels"] for name, t in pods.items()}
    assert {6379, 8265, 10001} <= set(ports["RayJob head"]) and ports["Deployment mlflow"] == [5000]
    inside = lambda name: {"namespace": "ditsweep", "labels": labels[name]}  # noqa: E731
    for name, target in labels.items():
        # Every pod is selected: a pod no policy selects would take connections from anywhere.
        assert any(_selects(p["spec"]["podSelector"], target) for p in policies), f"{name}: no policy"
        for port in ports[name] or [8080]:
            for intruder in [None, {"namespace": "default", "labels": target},
                             {"namespace": "kuberay", "labels": {}}]:
                assert not admitted(policies, target, port, intruder), (name, port, intruder)
            if name == "StatefulSet postgres":
                assert admitted(policies, target, port, inside("Deployment mlflow"))
                for other in set(labels) - {name, "Deployment mlflow"}:
                    assert not admitted(policies, target, port, inside(other)), (other, "postgres")
            else:
                for other in labels:
                    assert admitted(policies, target, port, inside(other)), (other, name, port)
    # The evaluator is not vacuous: without the policies, anyone gets in.
    assert admitted([], labels["RayJob head"], 8265, None)


# ---------------------------------------------------------------------------------------------
# MLflow server
# ---------------------------------------------------------------------------------------------

def mlflow_server_options() -> set[str]:
    """The options of `mlflow server` in the installed mlflow, read from its source: the click
    decorators above `def server(` and the shared ones they name in mlflow.utils.cli_args
    (importing mlflow.cli would take seconds)."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None or spec.origin is None:
        pytest.skip("mlflow is not installed")
    package = Path(spec.origin).parent
    cli = (package / "cli" / "__init__.py") if (package / "cli").is_dir() else package / "cli.py"
    text, shared = cli.read_text(), (package / "utils" / "cli_args.py").read_text()
    end = text.index("\ndef server(")
    decorators = text[text.rindex("@cli.command", 0, end):end]
    options = set(re.findall(r'"(--[a-z][a-z-]*)(?:/--[a-z-]+)?"', decorators))
    for name in re.findall(r"@cli_args\.([A-Z_]+)", decorators):
        options |= set(re.findall(rf'^{name} = click\.option\(\s*"(--[a-z][a-z-]*)', shared, re.M))
    assert {"--host", "--port", "--backend-store-uri"} <= options, "mlflow's CLI source changed shape"
    return options


def test_mlflow_server_uses_postgres_and_s3_and_answers_in_cluster_names():
    objects = render("")
    deployment, service = find(objects, "Deployment", "mlflow"), find(objects, "Service", "mlflow")
    postgres = find(objects, "Service", "postgres")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    argv = c["command"] + c["args"]
    assert argv[:2] == ["mlflow", "server"]
    flags = {a.split("=")[0]: a.partition("=")[2] for a in argv[2:] if a.startswith("--")}

    from importlib.metadata import version
    if version("mlflow") == pinned("mlflow"):
        unknown = set(flags) - mlflow_server_options()
        assert not unknown, f"not options of mlflow server {version('mlflow')}: {unknown}"
    assert "--serve-artifacts" in flags, "trials log artifacts through the server"
    assert flags["--host"] == "0.0.0.0"

    env = {e["name"]: e for e in c["env"]}
    data = config_map()["data"]
    # Backend store: PostgreSQL through the postgres Service, password from the Secret.
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri.startswith("postgresql") and "$(POSTGRES_PASSWORD)" in uri
    assert f"@{postgres['metadata']['name']}:{postgres['spec']['ports'][0]['port']}/" in uri
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME
    # Artifact root: S3, from the ConfigMap.
    assert flags["--artifacts-destination"] == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert data["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")

    # The clients' tracking URI is this Service, on the port the server listens on.
    (port,) = service["spec"]["ports"]
    (container_port,) = c["ports"]
    assert port["targetPort"] == container_port["name"]
    assert int(flags["--port"]) == container_port["containerPort"]
    host = f"{service['metadata']['name']}:{port['port']}"
    assert data["MLFLOW_TRACKING_URI"] == f"http://{host}"
    # --allowed-hosts (mlflow matches with fnmatch when a pattern has '*', else exactly): the
    # Host headers of in-cluster clients and of a port-forward pass, a look-alike domain not.
    assert flags["--allowed-hosts"] == "$(MLFLOW_SERVER_ALLOWED_HOSTS)"
    patterns = data["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    allowed = lambda h: any(fnmatch.fnmatch(h, p) if "*" in p else h == p for p in patterns)
    namespace = service["metadata"]["namespace"]
    for good in [host, f"{service['metadata']['name']}.{namespace}.svc.cluster.local:{port['port']}",
                 "localhost:5000", "127.0.0.1:5000"]:
        assert allowed(good), good
    assert not allowed("mlflow.attacker.example") and not allowed("mlflow.attacker.example:5000")


# ---------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------

def test_secrets_only_in_the_secret():
    example = read_env_file(CLUSTER / "base" / "secrets.env")
    assert set(example) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD",
                            "RAY_AUTH_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
                            "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    if not (CLUSTER / "base" / "secrets.env").exists():
        assert set(example.values()) == {"replace-me"}, "the committed example holds placeholders only"
    assert "secrets.env" in (CLUSTER / "base" / ".gitignore").read_text().split()

    for obj in all_objects():
        if obj["kind"] == "ConfigMap":
            for key, value in obj["data"].items():
                assert not SECRET_LOOKING.search(key), f"ConfigMap {obj['metadata']['name']}: {key}"
                assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"credentials in {key}"
        for container in walk_containers(obj):
            for e in container.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["name"] == SECRET_NAME
                    assert ref["secretKeyRef"]["key"] in example, e
                elif "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["name"] == CONFIG_NAME
                    assert ref["configMapKeyRef"]["key"] in config_map()["data"] \
                        or ref["configMapKeyRef"].get("optional"), e
                else:
                    assert not SECRET_LOOKING.search(e["name"]) or "$(" in e.get("value", ""), \
                        f"{obj['kind']} {obj['metadata']['name']}: {e['name']} set inline"

    for dockerfile in (RAY_DOCKERFILE, MLFLOW_DOCKERFILE):
        for instruction, arguments in dockerfile_instructions(dockerfile):
            if instruction in ("ARG", "ENV"):
                for name in re.findall(r"(?:^|\s)(\w+)(?==|$)", arguments):
                    assert not SECRET_LOOKING.search(name) and not name.startswith("AWS_"), \
                        f"{dockerfile.name}: {instruction} {name} would bake a secret into the image"


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, arguments = line.partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
    return instructions


def dockerfile_args(path: Path) -> dict[str, str]:
    """Default values of the build arguments."""
    defaults = {}
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def dockerfile_workdir(path: Path) -> str:
    return [a for ins, a in final_stage(path) if ins == "WORKDIR"][-1]


def pip_requirements(path: Path) -> list[Requirement]:
    """The name==version pins of the Dockerfile's pip installs, build arguments substituted."""
    args = dockerfile_args(path)
    substitute = lambda s: re.sub(r"\$\{(\w+)\}|\$(\w+)",
                                  lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)
    pins = []
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "RUN" and "pip install" in arguments:
            for token in shlex.split(substitute(arguments)):
                if re.fullmatch(r"[A-Za-z0-9_.-]+(\[[\w,-]+\])?==[^\s]+", token):
                    pins.append(Requirement(token))
    return pins


@pytest.mark.parametrize("dockerfile", [RAY_DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_image_pins_resolve_to_pyproject_versions(dockerfile):
    pins = pip_requirements(dockerfile)
    assert pins, f"{dockerfile.name}: no pinned pip install found"
    for req in pins:
        (version,) = [s.version for s in req.specifier]
        name = canonicalize_name(req.name)
        if name in DEPENDENCIES:
            wanted = DEPENDENCIES[name]
            exact = [s.version for s in wanted.specifier if s.operator == "=="]
            if exact:
                assert Version(version) == Version(exact[0]), \
                    f"{dockerfile.name} installs {req}, pyproject.toml pins {wanted}"
            else:
                assert wanted.specifier.contains(version), \
                    f"{dockerfile.name} installs {req}, outside pyproject.toml's {wanted}"
        # A package pyproject.toml does not name (psycopg2-binary) is still pinned exactly.
    names = {canonicalize_name(r.name) for r in pins}
    if dockerfile == RAY_DOCKERFILE:
        # torch, torchvision and NATTEN are installed first and explicitly (their builds must
        # match), the rest from pyproject.toml itself (test below).
        assert {"torch", "torchvision"} <= names
        assert dockerfile_args(dockerfile)["NATTEN_VERSION"] == pinned("natten")
        # KubeRay's head runs Ray's dashboard and job server: ray[default].
        assert "default" in DEPENDENCIES["ray"].extras
    else:
        assert {"mlflow", "psycopg2-binary", "boto3"} <= names
        assert dockerfile_args(dockerfile)["MLFLOW_VERSION"] == pinned("mlflow"), \
            "the MLflow server must be the version of the clients in the Ray images"


def load_pyproject_deps():
    spec = importlib.util.spec_from_file_location("pyproject_deps", REPO / "docker" / "pyproject_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_images_install_exactly_pyprojects_dependencies(monkeypatch):
    deps = load_pyproject_deps()
    assert deps.dependencies(str(REPO / "pyproject.toml")) == PYPROJECT["project"]["dependencies"]
    runs = [a for ins, a in dockerfile_instructions(RAY_DOCKERFILE) if ins == "RUN"]
    order = [next(i for i, r in enumerate(runs) if needle in r)
             for needle in ("torch==", "install-natten.sh", "-r /tmp/requirements.txt",
                            "pyproject_deps.py check")]
    assert order == sorted(order), "torch, then NATTEN, then the rest, then the version check"
    assert "--no-build-isolation" in (REPO / "docker" / "install-natten.sh").read_text()

    # The build's final check: exact pins met (local labels such as +cu130 allowed), ranges too.
    installed = {name: pinned(name) for name in DEPENDENCIES if any(
        s.operator == "==" for s in DEPENDENCIES[name].specifier)}
    installed.update(torch="2.14.1+cu130", numpy="2.4.0", boto3="1.44.8")
    def fake_version(name):
        name = canonicalize_name(name)
        if name not in installed:
            raise deps.metadata.PackageNotFoundError(name)
        return installed[name]
    monkeypatch.setattr(deps.metadata, "version", fake_version)
    problems = deps.check(str(REPO / "pyproject.toml"))
    assert all("not installed" in p for p in problems), problems
    installed.update({canonicalize_name(Requirement(d).name): "99.0" for d in PYPROJECT["project"]["dependencies"]
                      if not any(s.operator == "==" for s in Requirement(d).specifier)})
    assert deps.check(str(REPO / "pyproject.toml")) == []
    installed["torch"] = "2.13.0"
    assert deps.check(str(REPO / "pyproject.toml")) == [
        f"torch: 2.13.0 installed, pyproject.toml asks torch=={pinned('torch')}"]


def test_gpu_image_cuda_matches_the_pinned_torch_build():
    args = dockerfile_args(RAY_DOCKERFILE)
    major_minor = ".".join(args["CUDA_VERSION"].split(".")[:2])
    assert args["TORCH_CUDA"] == "cu" + major_minor.replace(".", ""), \
        "torch's wheel index (cu130) and the CUDA base image must be the same CUDA"
    froms = [a for ins, a in dockerfile_instructions(RAY_DOCKERFILE) if ins == "FROM"]
    assert {"${GPU_BUILD_IMAGE} AS gpu-build", "${GPU_RUNTIME_IMAGE} AS gpu-runtime",
            "${CPU_BASE_IMAGE} AS cpu-build", "${CPU_BASE_IMAGE} AS cpu-runtime"} <= set(froms)
    assert args["GPU_BUILD_IMAGE"] == "docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION}"
    assert args["GPU_RUNTIME_IMAGE"] == "docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}"
    # The head (cpu) and the workers (gpu) on the same Ubuntu: the same Python, to the patch
    # level, which Ray requires of every node of a cluster.
    assert args["CPU_BASE_IMAGE"] == "docker.io/library/ubuntu:${UBUNTU_VERSION}"

    # Which CUDA the pinned torch is built for, read off the torch installed here when it is
    # PyPI's build of that version (torch/version.py, without importing torch).
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        pytest.skip("torch is not installed here")
    text = (Path(spec.origin).parent / "version.py").read_text()
    version = re.search(r"__version__ = '([^']+)'", text).group(1)
    cuda = re.search(r"cuda: Optional\[str\] = '([^']+)'", text)
    if version.split("+")[0] != pinned("torch") or cuda is None:
        pytest.skip(f"torch {version} here is not a CUDA build of the pinned {pinned('torch')}")
    assert cuda.group(1) == major_minor, f"torch {version} is built for CUDA {cuda.group(1)}"


def test_images_run_as_non_root():
    for dockerfile in (RAY_DOCKERFILE, MLFLOW_DOCKERFILE):
        users = [a for ins, a in final_stage(dockerfile) if ins == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"


def test_ray_image_provides_what_kuberay_and_ditsweep_need():
    stage = final_stage(RAY_DOCKERFILE)
    runs = " ".join(a for ins, a in stage if ins == "RUN")
    assert re.search(r"apt-get install[^&]*\bwget\b", runs), "KubeRay's probes and submitter call wget"
    # Inception weights: the URL and file name torch-fidelity itself uses, downloaded at build
    # time to the path DITSWEEP_INCEPTION_WEIGHTS names.
    args = dockerfile_args(RAY_DOCKERFILE)
    envs = dict(a.split("=", 1) for ins, a in stage if ins == "ENV" and "=" in a and " " not in a)
    weights = envs["DITSWEEP_INCEPTION_WEIGHTS"]
    assert weights.startswith("/opt/ditsweep/weights/")
    assert Path(weights).name == args["INCEPTION_URL"].rsplit("/", 1)[1]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is not None and spec.origin is not None:
        source = (Path(spec.origin).parent / "feature_extractor_inceptionv3.py").read_text()
        assert args["INCEPTION_URL"] in source, "not the URL of the installed torch-fidelity"
    # The entry point's relative sweep path resolves in the image: sweeps/ is copied to /opt
    # and linked into the working directory (a results volume there does not hide it), and the
    # default command's sweep exists.
    sweep_dir = entrypoint_argv(rayjob())[3].split("/")[0]
    assert any(ins == "COPY" and a.split() == [sweep_dir, f"/opt/ditsweep/{sweep_dir}"] for ins, a in stage)
    assert any(ins == "RUN" and f"ln -s /opt/ditsweep/{sweep_dir} {sweep_dir}" in a for ins, a in stage)
    (cmd,) = [a for ins, a in stage if ins == "CMD"]
    assert (REPO / yaml.safe_load(cmd)[-1].removeprefix("/opt/ditsweep/")).is_file()
    # The image placeholders of the manifests are the ones images/ maps to a registry.
    component = yaml.safe_load((CLUSTER / "images" / "kustomization.yaml").read_text())
    used = {c["image"] for path in CLUSTER.rglob("*.yaml") for doc in load_documents(path)
            for c in walk_containers(doc)}
    assert {i["name"] for i in component["images"]} == {u for u in used if u.startswith("ditsweep-")}


def dockerfile_stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name ("global": before the first FROM)."""
    stages, name = {"global": []}, "global"
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            stages[name] = []
        stages[name].append((instruction, arguments))
    return stages


def test_only_the_gpu_build_sees_natten_cuda_arch_and_every_fetch_is_a_build_argument():
    # NATTEN's setup.py compiles libnatten whenever NATTEN_CUDA_ARCH is set: the cpu flavour
    # (no nvcc) must never have it in a build step's environment, not even as a global ARG.
    stages = dockerfile_stages(RAY_DOCKERFILE)
    holders = [name for name, instructions in stages.items()
               if any("NATTEN_CUDA_ARCH" in a for ins, a in instructions if ins in ("ARG", "ENV"))]
    assert holders == ["gpu-build"], holders
    assert {a.split()[0] for ins, a in stages["deps"] if ins == "FROM"} == {"python"}
    for dockerfile in (RAY_DOCKERFILE, MLFLOW_DOCKERFILE):
        stages = dockerfile_stages(dockerfile)
        for name, instructions in stages.items():
            for ins, arguments in instructions:
                # every base is a build argument or an earlier stage (a mirror's, or a local one)
                if ins == "FROM":
                    base = arguments.split()[0]
                    assert base.startswith("${") or base in stages, f"{dockerfile.name}: FROM {base}"
                # every address fetched from is a build argument's default, none is in a step
                assert ins not in ("RUN", "ADD") or "://" not in arguments, \
                    f"{dockerfile.name} ({name}): {ins} {arguments[:80]}"
    args = dockerfile_args(RAY_DOCKERFILE)
    assert {"TORCH_INDEX_URL", "NATTEN_WHEEL_INDEX", "INCEPTION_URL", "INCEPTION_FILE",
            "EXTRA_CA_CERTS", "CPU_BASE_IMAGE", "GPU_BUILD_IMAGE", "GPU_RUNTIME_IMAGE"} <= set(args)
    assert {"BASE_IMAGE", "EXTRA_CA_CERTS"} <= set(dockerfile_args(MLFLOW_DOCKERFILE))


def test_install_natten_script_is_valid_bash():
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    proc = subprocess.run(["bash", "-n", str(REPO / "docker" / "install-natten.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------
# Build context (.dockerignore)
# ---------------------------------------------------------------------------------------------

def dockerignore_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax: * and ? within a path segment, ** across segments."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def excluded_from_context(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository) out of the build context:
    the last pattern matching the path or one of its parents decides, `!` re-includes."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_images_copy_and_nothing_secret():
    for dockerfile in (RAY_DOCKERFILE, MLFLOW_DOCKERFILE):
        for instruction, arguments in dockerfile_instructions(dockerfile):
            if instruction != "COPY" or "--from=" in arguments:
                continue
            *sources, _ = [a for a in arguments.split() if not a.startswith("--")]
            # ${EXTRA_CA_CERTS}, ${INCEPTION_FILE}: files the build machine puts in docker/local/
            for source in [s for s in sources if not s.startswith("${")]:
                assert (REPO / source).exists(), f"{dockerfile.name} copies missing {source}"
                files = [source] if (REPO / source).is_file() else [
                    str(p.relative_to(REPO)) for p in (REPO / source).rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts]
                kept_out = [f for f in files if excluded_from_context(f)]
                assert not kept_out, f"{dockerfile.name} copies {source}, .dockerignore drops {kept_out}"
    for private in ["cluster/base/secrets.env", ".git/config", ".venv/bin/python", "mlflow.db",
                    "mlruns/0/meta.yaml", "ray_results/smoke/state.json", "tests/test_deploy.py",
                    "ditsweep/__pycache__/run.cpython-312.pyc", "data/celeba/000001.jpg"]:
        assert excluded_from_context(private), f"{private} would be sent to the Docker builder"
