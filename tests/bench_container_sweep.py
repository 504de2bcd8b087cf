"""Where the smoke sweep's time goes in ditsweep's containers: run by the cpu image's default
command in one container, and as the RayJob's entry point on the images as a KubeRay cluster
(tests/containers.py's ContainerCluster: a head with 0 CPUs, two 1-CPU workers, the MLflow
server, S3 on loopback), one after the other on this machine. Prints each phase of both runs
side by side, read from the MLflow runs each leaves, and what the idle cluster costs the host.

    python tests/bench_container_sweep.py        # root, Podman or Docker; ~8 min, images cached

The cluster reads the sweep's data from S3 (packed from the built-in photos, as a cluster must);
the single container reads the built-in photos, as the image's default command does.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).parent))
from containers import RAY, REPO, ContainerCluster, Engine, build_images, owned_dir  # noqa: E402
from procs import cpu_seconds  # noqa: E402


def cpu_busy(seconds: float) -> float:
    """The host's busy share of all its cores over `seconds` (from /proc/stat)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / (t1 - t0)


def container_cpu(engine: Engine, name: str) -> float:
    """CPU seconds the container's processes have used so far (its cgroup's accounting)."""
    pid = engine("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):  # cgroup v1
            return int(Path(f"/sys/fs/cgroup/cpuacct{path}/cpuacct.usage").read_text()) / 1e9
        if number == "0" and Path(f"/sys/fs/cgroup{path}/cpu.stat").exists():  # cgroup v2
            stat = dict(row.split() for row in Path(f"/sys/fs/cgroup{path}/cpu.stat").read_text().splitlines())
            return int(stat["usage_usec"]) / 1e6
    raise RuntimeError(f"no CPU accounting found for container {name}")


def timed_lines(command: list[str], env: dict | None = None, timeout: float = 1800) -> list[tuple[float, str]]:
    """Run `command` to its end; each line of its output with the wall-clock time it arrived."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip()))
        assert time.time() < deadline, f"{command[:3]} ran past {timeout} s"
    proc.wait()
    return lines


def phases(client: MlflowClient, experiment: str, started: float, ended: float) -> dict[str, float]:
    """The sweep's phases from its MLflow runs (times in seconds, wall clock)."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    sweep = next(r for r in runs if r.data.tags.get("ditsweep.role") == "sweep")
    trials = [r for r in runs if r.data.tags.get("ditsweep.role") == "trial"]
    s = lambda ms: ms / 1000  # noqa: E731
    first_start = min(s(r.info.start_time) for r in trials)
    rows, to_first, steps_per_s, tails, evals = {}, [], [], [], 0.0
    for r in trials:
        loss = sorted(client.get_metric_history(r.info.run_id, "loss"), key=lambda m: m.step)
        to_first.append(s(loss[0].timestamp) - s(r.info.start_time))
        steps_per_s.append((loss[-1].step - loss[0].step) / (s(loss[-1].timestamp) - s(loss[0].timestamp)))
        tails.append(s(r.info.end_time) - s(loss[-1].timestamp))
        evals += sum(m.value for name in r.data.metrics if name.startswith("eval_seconds_")
                     for m in client.get_metric_history(r.info.run_id, name))
    rows["start -> sweep's MLflow run opened"] = s(sweep.info.start_time) - started
    rows["sweep run -> first trial's run"] = first_start - s(sweep.info.start_time)
    rows["trial's run -> its first logged step (mean)"] = statistics.mean(to_first)
    rows["  of which the first step (mean)"] = statistics.mean(
        float(r.data.tags.get("ditsweep.first_step_s", "nan")) for r in trials)
    rows["training, steps/s a trial (mean)"] = statistics.mean(steps_per_s)
    rows["last step -> trial's run ended (mean)"] = statistics.mean(tails)
    rows["evaluation jobs' compute, all trials"] = evals
    rows["trials' span (first run opened -> last ended)"] = max(s(r.info.end_time) for r in trials) - first_start
    rows["last trial ended -> sweep's run ended"] = s(sweep.info.end_time) - max(s(r.info.end_time) for r in trials)
    rows["sweep's run ended -> exit"] = ended - s(sweep.info.end_time)
    rows["in all"] = ended - started
    return rows


def one_container(images: dict, engine: Engine, base: Path) -> tuple[dict, list]:
    results = owned_dir(base / "results")
    started = time.time()
    log = timed_lines([*engine.cmd, "run", "--network", "host", *engine.run_flags, "--rm",
                       "--shm-size=2g", "-v", f"{results}:/home/ray/ditsweep", images["cpu"]])
    ended = time.time()
    assert any("4/4 trials finished" in line for _, line in log), "\n".join(line for _, line in log[-60:])
    return phases(MlflowClient(f"sqlite:///{results / 'mlflow.db'}"), "smoke", started, ended), \
        [(t - started, line) for t, line in log]


def cluster(images: dict, engine: Engine, base: Path) -> tuple:
    c = ContainerCluster(images, engine, base)
    try:
        started = time.time()
        c.start()
        up = time.time() - started
        idle = cpu_busy(20)
        data = f"{c.m.config['DITSWEEP_DATA_ROOT']}/photos8"
        pack = subprocess.run([sys.executable, "-m", "ditsweep.data", "pack", "builtin:photos", data,
                               "--resolution", "8", "--workers", "1"], env=c.client_env,
                              capture_output=True, text=True, timeout=300)
        assert pack.returncode == 0, pack.stderr[-3000:]
        sweep = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
        sweep["grid"]["dataset"] = [data]
        (c.sweeps / "smoke.yaml").write_text(yaml.safe_dump(sweep))
        entrypoint = [a if not a.startswith("sweeps/") else "ci/smoke.yaml" for a in c.m.entrypoint]
        cpu = {name: container_cpu(engine, name) for name in engine.started}
        cpu["S3 server (moto, this machine)"] = cpu_seconds(c.s3.proc.pid)
        started = time.time()
        submit = c.job("submit", "--submission-id", "ci-sweep", "--no-wait", "--", *entrypoint)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        # the job's log, each line timed as it arrives; `--follow` returns when the job ends
        log = timed_lines([RAY, "job", "logs", "--address", f"http://127.0.0.1:{c.dashboard_port}",
                           "--follow", "ci-sweep"], env=c.client_env)
        ended = time.time()
        cpu = {name: (container_cpu(engine, name) if name in engine.started else cpu_seconds(c.s3.proc.pid))
               - before for name, before in cpu.items()}
        assert c.job_ended() == "SUCCEEDED", c.diagnosis()[-8000:]
        login = {k: c.client_env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
                 if k in c.client_env}
        os.environ.update(login)  # the sweeps' MLflow login, for this process's client
        return phases(MlflowClient(c.tracking_uri), "smoke", started, ended), up, idle, cpu, \
            [(t - started, line) for t, line in log]
    finally:
        engine.close()
        c.close()


def main() -> None:
    t = time.monotonic()
    images, _ = build_images(("cpu", "mlflow"))
    print(f"images ready in {time.monotonic() - t:.0f} s; host idle: {cpu_busy(10):.0%} of its cores busy")
    engine = Engine()
    with tempfile.TemporaryDirectory() as tmp:
        single, single_log = one_container(images, engine, Path(tmp) / "single")
        many, up, idle, cpu, many_log = cluster(images, engine, Path(tmp) / "cluster")
    print(f"\ncontainer cluster up in {up:.0f} s; idle, it keeps {idle:.0%} of this host's cores busy\n")
    print(f"{'smoke sweep (4 trials, 2 at a time)':48} {'one container':>14} {'cluster':>10}")
    for name in single:
        unit = "" if "steps/s" in name else " s"
        print(f"{name:48} {single[name]:>12.1f}{unit:2} {many[name]:>8.1f}{unit:2}")
    print(f"\nCPU seconds during the cluster's job ({many['in all']:.0f} s on {os.cpu_count()} cores):")
    for name, seconds in cpu.items():
        print(f"  {name:34} {seconds:7.1f}")
    for title, log in (("one container", single_log), ("cluster (ray job logs --follow)", many_log)):
        print(f"\ndriver's output, {title} (seconds from the start):")
        for at, line in log:
            if line.strip():
                print(f"  {at:6.1f}  {line[:150]}")


if __name__ == "__main__":
    main()
