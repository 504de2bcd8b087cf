"""A sweep on a multi-node Ray cluster on loopback (tests/cluster.py), checked by hand with
`--check` and submitted as the README says (`ray job submit --working-dir .`), with data, Tune
storage, identity checkpoints and MLflow artifacts in S3, survives a worker node killed
mid-trial and a whole lost Ray cluster (a RayJob retry: new cluster, same job).

Before it, on the same cluster, nobody gets in without credentials: a job submitted with no Ray
token or a wrong one is refused and runs nothing, the dashboard's REST API and the GCS refuse
them, MLflow's REST API answers reads and writes without its login with 401 and changes nothing,
and `--check`'s MLflow item says in one line what is missing or wrong. After it, none of the
secrets (Ray's token, MLflow's passwords, the S3 key) is in MLflow, the logs, S3 or any node's
disk."""

import base64
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster import ADMIN, RAY, USER, LoopbackCluster
from conftest import REPO, tiny_sweep, write_sweep
from procs import cpu_seconds, http, wait_for

pytestmark = pytest.mark.slow
STEPS, LOG_EVERY, CHECKPOINT_EVERY, EVAL_EVERY = 120, 10, 20, 40


def cluster_sweep() -> dict:
    sweep = tiny_sweep(name="cluster")
    sweep["grid"].update(seed=[0, 1], dataset=["${DITSWEEP_DATA_ROOT}/photos8"])
    sweep["train"].update(steps=STEPS, log_every=LOG_EVERY, checkpoint_every=CHECKPOINT_EVERY)
    sweep["eval"] = {"psnr_gap": {"num_images": 8, "steps": 3, "every": EVAL_EVERY},
                     "attention": {"enabled": False}, "samples": {"enabled": False},
                     # real CPUs: the evaluators live on the worker nodes, as on a cluster
                     "actors": {"count": 2, "cpus": 1, "max_retries": 2}}
    # One trial at a time: the first is killed and resumed, then finishes; the second is the
    # one the lost cluster interrupts. storage_path and tracking: the nodes' environment.
    sweep["resources"] = {"cpus_per_trial": 1, "max_failures": 3, "max_concurrent_trials": 1}
    return sweep


def trial_runs(client: MlflowClient) -> dict[str, object]:
    exp = client.get_experiment_by_name("cluster")
    if exp is None:
        return {}
    return {r.data.tags["ditsweep.trial"]: r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("ditsweep.role") == "trial"}


def stored_checkpoint(c: LoopbackCluster, run) -> dict | None:
    """The identity store's latest.json in S3, if this run wrote it."""
    key = f"ray/checkpoints/{run.data.tags['ditsweep.identity']}/latest.json"
    try:
        latest = json.loads(c.s3.client().get_object(Bucket="runs", Key=key)["Body"].read())
    except c.s3.client().exceptions.NoSuchKey:
        return None
    return latest if latest["run_id"] == run.info.run_id else None


def wait_for_checkpoint(c: LoopbackCluster, client: MlflowClient, trial: str, timeout: float = 240):
    """(run, latest.json) once `trial` has stored a checkpoint of its own in S3."""
    def ready():
        run = trial_runs(client).get(trial)
        latest = run and "ditsweep.trial_pid" in run.data.tags and stored_checkpoint(c, run)
        return (run, latest) if latest else None
    try:
        return wait_for(ready, timeout, f"a stored checkpoint of {trial}", interval=0.3)
    except TimeoutError:
        print("\n--- the sweep's job log\n" + c.job_logs("sweep-1")[-8000:])
        raise


def history(client: MlflowClient, run_id: str, metric: str) -> list:
    return sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.timestamp, m.step))


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module: the refusals first, then the sweep."""
    started = time.monotonic()
    with LoopbackCluster(workers=2, cpus_per_worker=3) as c:
        c.up_s = time.monotonic() - started
        yield c


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_nobody_gets_in_without_credentials(cluster, monkeypatch):
    c = cluster
    marker = c.base / "intruded"  # what an intruder's job would write (visible to the head)
    job = ["--", "python", "-c", f"open({str(marker)!r}, 'w').write('in')"]
    no_token = {**c.env, "RAY_AUTH_MODE": "disabled"}  # a client that sends no token at all
    no_token.pop("RAY_AUTH_TOKEN")
    wrong = {**c.env, "RAY_AUTH_TOKEN": "0" * len(c.token)}
    # The GCS (port 6379): a driver without the token cannot join the cluster. Its client retries
    # for about 20 s before it gives up, so these two run while the rest is tried.
    drivers = [subprocess.Popen([sys.executable, "-c", f"import ray; ray.init(address={c.head_address!r}); "
                                 "print('joined', ray.cluster_resources())"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for env in (no_token, wrong)]
    for name, env, refusal, says in [("none", no_token, 401, "Authentication required"),
                                     ("wrong", wrong, 403, "Authentication failed")]:
        # `ray job submit`, as the README's command (and as anyone who reaches port 8265 would)
        proc = subprocess.run([RAY, "job", "submit", "--address", c.dashboard_address,
                               "--submission-id", f"intruder-{name}", *job],
                              env=env, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and says in out, out[-2000:]
        # the dashboard's REST API: the job list, and a submission by hand
        headers = {} if name == "none" else {"Authorization": f"Bearer {wrong['RAY_AUTH_TOKEN']}"}
        status, text = http(f"{c.dashboard_address}/api/jobs/", headers=headers)
        assert status == refusal, (status, text[:300])
        status, text = http(f"{c.dashboard_address}/api/jobs/", {"entrypoint": shlex.join(job[1:]),
                            "submission_id": f"intruder-{name}-rest"}, headers)
        assert status == refusal, (status, text[:300])
    for driver in drivers:
        out = driver.communicate(timeout=240)[0]
        assert driver.returncode != 0 and "joined" not in out and "InvalidAuthToken" in out, out[-2000:]
    # Nothing ran: no job of theirs is known to the cluster, and their file was never written.
    listed = subprocess.run([RAY, "job", "list", "--address", c.dashboard_address], env=c.env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "intruder" not in listed.stdout, listed.stdout[-2000:]
    assert not marker.exists()
    # With the token the same REST call works: the refusals above were about the token.
    assert http(f"{c.dashboard_address}/api/jobs/", headers={"Authorization": f"Bearer {c.token}"})[0] == 200

    # MLflow: a read and writes without the login, or with a wrong password, get 401, also just
    # after the right password passed (cluster/base/mlflow.yaml keeps passed logins a minute) ...
    api = f"{c.tracking_uri}/api/2.0/mlflow"
    search = f"{api}/experiments/search?max_results=10"
    assert http(search, headers=basic(USER, c.password))[0] == 200
    for headers in [{}, basic(USER, "wrong-password"), basic(ADMIN, c.password)]:
        assert http(search, headers=headers)[0] == 401
        assert http(f"{api}/experiments/create", {"name": "intruder"}, headers)[0] == 401
        assert http(f"{api}/experiments/delete", {"experiment_id": "0"}, headers)[0] == 401
    # ... and change nothing; the sweeps' own user may not make users (only the admin may).
    admin = basic(ADMIN, c.admin_password)
    status, text = http(f"{api}/experiments/get-by-name?experiment_name=intruder", headers=admin)
    assert status == 404 and "RESOURCE_DOES_NOT_EXIST" in text, (status, text[:300])
    status, text = http(f"{api}/experiments/get?experiment_id=0", headers=admin)
    assert status == 200 and json.loads(text)["experiment"]["lifecycle_stage"] == "active", text[:300]
    assert http(f"{api}/users/create", {"username": "x", "password": "x" * 16},
                basic(USER, c.password))[0] == 403
    # That cache at work: the slow password hash (scrypt) runs once for the right login, not per
    # request, so 40 requests cost the server less CPU than 20 checks of the hash.
    from werkzeug.security import check_password_hash, generate_password_hash
    hashed = generate_password_hash(c.password)
    started = time.process_time()
    assert check_password_hash(hashed, c.password)
    one_check = time.process_time() - started
    before = cpu_seconds(c.mlflow.pid)
    for _ in range(40):
        assert http(search, headers=basic(USER, c.password))[0] == 200
    used = cpu_seconds(c.mlflow.pid) - before
    assert used < 20 * one_check, f"40 requests took {used:.2f} s of CPU; one hash check {one_check:.3f} s"

    # `--check`'s MLflow item (run on each node with the node's login) in one line: missing,
    # wrong, right.
    from ditsweep.sweep.preflight import _check_mlflow
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    ok, detail = _check_mlflow(c.tracking_uri, "preflight")
    assert not ok and "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not set" in detail, detail
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    ok, detail = _check_mlflow(c.tracking_uri, "preflight")
    assert not ok and f"refused the login of user {USER!r} (HTTP 401)" in detail, detail
    assert "\n" not in detail and "wrong-password" not in detail
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", c.password)
    assert _check_mlflow(c.tracking_uri, "preflight")[0]


def test_evaluators_without_cpus_stay_off_the_cpuless_head(cluster):
    """`eval.actors.cpus: 0` reserves nothing, so Ray could place an evaluator on any node, the
    0-CPU head (on KubeRay the driver's pod) included; the pool keeps them on nodes with CPUs."""
    script = f"""
import ray
from ditsweep.config import EvalActorSettings
from ditsweep.eval.actors import EvalWorker, off_cpuless_nodes
ray.init(address={cluster.head_address!r})
head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and not n["Resources"].get("CPU")]
options = off_cpuless_nodes(EvalActorSettings(count=6, cpus=0))
workers = [EvalWorker.options(num_cpus=0, scheduling_strategy="SPREAD", **options).remote(0, 0)
           for _ in range(6)]
nodes = ray.get([w.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                 for w in workers], timeout=120)
print("on the head:", sum(n in head for n in nodes), "of", len(nodes), "head:", len(head))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=300)
    assert "on the head: 0 of 6 head: 1" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]


def test_sweep_on_a_cluster_survives_a_lost_node_and_a_lost_cluster(cluster, monkeypatch):
    started, c, up = time.monotonic(), cluster, cluster.up_s
    # This process reads MLflow as the sweeps' user, as `python -m ditsweep.report` would.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", c.password)
    # The dataset, packed into S3 as the README says; the job's directory: code and sweep.
    pack = subprocess.run([sys.executable, "-m", "ditsweep.data", "pack", "builtin:photos",
                           "s3://data/photos8", "--resolution", "8", "--workers", "1"],
                          env=c.env, capture_output=True, text=True, timeout=300)
    assert pack.returncode == 0, pack.stderr[-3000:]
    shutil.copytree(REPO / "ditsweep", c.client_dir / "ditsweep",
                    ignore=shutil.ignore_patterns("__pycache__"))
    write_sweep(c.client_dir, cluster_sweep())
    # Each node sees its own disk only: not the submitter's directory, not the head's.
    for node in ("w0", "w1"):
        seen = lambda path: Path(f"/proc/{c.processes(node)[0]}/root{path}")  # noqa: E731
        assert seen(c.base / node / "ray").is_dir()
        if c.isolated:
            assert not seen(c.client_dir / "sweep.yaml").exists()
            assert not seen(c.base / "head" / "ray").exists()  # the head's disk: hidden

    # The pre-flight by hand from "the laptop", against this head (RAY_ADDRESS): it joins the
    # cluster (no local Ray) and passes; under `ray job submit` it also runs by itself.
    check = subprocess.run([sys.executable, "-m", "ditsweep.run", "sweep.yaml", "--check"],
                           cwd=c.client_dir, env={**c.env, "RAY_ADDRESS": c.head_address},
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert "preflight passed" in check.stdout and "versions" in check.stdout, check.stdout
    assert f":{c.gcs_port}" in check.stderr and "Started a local Ray instance" not in check.stderr

    # 1-3. The sweep through `ray job submit`; the first trial's node is killed mid-trial.
    client = MlflowClient(c.tracking_uri)
    submit = c.submit(["python", "-m", "ditsweep.run", "sweep.yaml"], no_wait=True,
                      submission_id="sweep-1")
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    first, second = "000_DiT-T-1_global_N10_s0", "001_DiT-T-1_global_N10_s1"
    run, latest = wait_for_checkpoint(c, client, first)
    assert latest["step"] < STEPS, latest
    node = c.node_of(int(run.data.tags["ditsweep.trial_pid"]))
    assert node in ("w0", "w1"), node
    # the evaluators take CPUs, so they live on the workers (none on the head): one on this node
    evaluators = {n: [p for p in c.processes(n) if b"EvalWorker" in _cmd(p)] for n in c.nodes}
    assert evaluators["w0"] and evaluators["w1"] and not evaluators["head"], evaluators
    coordinator = [p for p in c.processes("head") if b"EvalCoordinator" in _cmd(p)]
    assert coordinator, "the evaluation pool's coordinator lives with the driver, on the head"
    killed_wall = time.time()
    c.kill_worker(int(node[1:]))
    wait_for(lambda: c.alive_nodes() == 2, 60, "the killed node declared dead")
    detected = time.time() - killed_wall

    # The trial resumes on the surviving node: its first loss value logged after the kill.
    def resumed_loss():
        after = [m for m in history(client, run.info.run_id, "loss") if m.timestamp / 1000 > killed_wall]
        return after[0] if after else None
    first_after = wait_for(resumed_loss, 240, "the killed trial's next step")
    recovery = first_after.timestamp / 1000 - killed_wall
    print(f"\nworker node {node} killed at step >= {latest['step']}: declared dead after "
          f"{detected:.1f} s; the trial's next step ({first_after.step}) logged {recovery:.1f} s "
          f"after the kill")

    logs = c.job_logs("sweep-1")
    assert "preflight passed" in logs, logs[-3000:]  # on a cluster it runs by itself, first
    # The evaluator that died with the node is replaced when a job meets it (the pool hands jobs
    # to its workers in turn) and the job run again; the sweep's log says so (eval_attempts may
    # not: a job of a step the run had already logged logs nothing).
    wait_for(lambda: "evaluation pool: 1 evaluator(s) replaced (0 past a deadline, the rest died)"
             in c.job_logs("sweep-1"), 180, "the sweep's log of the replaced evaluator", interval=3)

    # 4. The whole Ray cluster lost once the second trial has a checkpoint of its own.
    run2, latest2 = wait_for_checkpoint(c, client, second)
    first_disks = secrets_written(c)  # the first cluster's disks go with it
    c.stop()
    assert latest2["step"] < STEPS
    assert trial_runs(client)[first].info.status == "FINISHED"
    lost_at = time.monotonic()
    c.start()  # a RayJob retry: a new Ray cluster, empty disks, the same job
    rerun = c.submit(["python", "-m", "ditsweep.run", "sweep.yaml"], timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert "preflight passed" in out and "2/2 trials finished" in out, out[-3000:]
    assert "1 already finished in this sweep; 1 to train" in out, out[-3000:]
    assert "succeeded" in out, out[-3000:]  # the job's own status, as `ray job submit` prints it
    second_job = time.monotonic() - lost_at

    # MLflow: one sweep run, one run per trial, each with every loss step once, in order.
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs if r.data.tags.get("ditsweep.role") == "sweep"] == ["FINISHED"]
    trials = trial_runs(client)
    assert sorted(trials) == [first, second]
    for name, trial in trials.items():
        assert trial.info.status == "FINISHED", name
        assert trial.data.tags["ditsweep.attempts"] == "2", name  # one restart each
        resumed = int(trial.data.tags["ditsweep.resumed_from_step"])
        assert 0 < resumed < STEPS and resumed % CHECKPOINT_EVERY == 0, (name, resumed)
        steps = [m.step for m in history(client, trial.info.run_id, "loss")]
        assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), (name, steps)
        psnr = sorted(m.step for m in client.get_metric_history(trial.info.run_id, "psnr_gap_mean"))
        assert len(psnr) == len(set(psnr)) and psnr[-1] == STEPS, (name, psnr)
        # An evaluation is missing only where the run says why: a job queued by the killed
        # attempt whose weights died with it (OwnerDiedError, not retried), at a step the
        # resumed attempt did not train again (it was at or before the restored checkpoint).
        failures = trial.data.tags.get("ditsweep.eval_failure", "")
        for step in set(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)) - set(psnr):
            assert f"step {step} " in failures, (name, step, psnr, failures)
    # from its last checkpoint in S3 (it may have stored one more while the cluster went down)
    assert int(trials[second].data.tags["ditsweep.resumed_from_step"]) >= latest2["step"]

    # Everything the sweep keeps is in S3: Tune's experiment, checkpoints, MLflow artifacts.
    keys = [o["Key"] for page in c.s3.client().get_paginator("list_objects_v2").paginate(Bucket="runs")
            for o in page.get("Contents", [])]
    assert any(k.startswith("ray/cluster/") for k in keys), keys[:20]
    assert sum(k.startswith("ray/checkpoints/") and k.endswith("latest.json") for k in keys) == 2
    assert any(k.startswith("mlflow/") and k.endswith("psnr_gap.png") for k in keys), keys[:20]

    # No secret in MLflow (params, tags, metric names), the job's output, S3, or on any disk
    # of either cluster (Ray's temp dirs and logs, the nodes' TMPDIRs, the client, MLflow's).
    secrets = {"Ray token": c.token, "MLflow admin password": c.admin_password,
               "MLflow password": c.password, "S3 secret key": c.s3.secret}
    for r in runs:
        text = json.dumps([r.data.params, r.data.tags, sorted(r.data.metrics)])
        assert not [k for k, s in secrets.items() if s in text], r.info.run_id
    assert not [k for k, s in secrets.items() if s in out + logs], "secret in the job's output"
    s3 = c.s3.client()
    bodies = [s3.get_object(Bucket="runs", Key=k)["Body"].read() for k in keys]
    assert not [(k, n) for k, body in zip(keys, bodies) for n, s in secrets.items() if s.encode() in body]
    assert not first_disks and not secrets_written(c), (first_disks, secrets_written(c))
    print(f"cluster test: {time.monotonic() - started:.0f} s (cluster up {up:.0f} s, after the lost "
          f"cluster: restart and second job {second_job:.0f} s); recovery after the node kill "
          f"{recovery:.1f} s")


def secrets_written(c: LoopbackCluster) -> list[tuple[str, str]]:
    """(file, which secret) for every secret found in a file under the cluster's directory."""
    secrets = {"Ray token": c.token, "MLflow admin password": c.admin_password,
               "MLflow password": c.password, "S3 secret key": c.s3.secret}
    found = []
    for path in c.base.rglob("*"):
        if path.name == "credentials" and path.parent.name.startswith("ditsweep-aws-"):
            # by design: the driver's private S3 credentials file (ditsweep/data/credentials.py),
            # which keeps the keys out of Ray's runtime_env logs; only its owner may read it
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
            continue
        try:
            data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        except OSError:
            continue
        found += [(str(path), name) for name, s in secrets.items() if s.encode() in data]
    return found


def _cmd(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
