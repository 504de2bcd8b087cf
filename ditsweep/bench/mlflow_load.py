"""MLflow under a sweep's load: many trial processes logging at once, rows lost or duplicated.

    python -m ditsweep.loadtest [--procs 32] [--seconds 180] [--store sqlite server]

Each process plays one trial as the trainable does it: a `TrialRun` (child of one parent run,
created by all processes at the same moment), metrics queued every `--log-every` seconds (loss
and lr at the next step) and sent every `--flush-every` seconds with a non-insisting flush, then
`finish()`. Afterwards every run's history is read back: rows lost = steps a process logged but
the store lacks, duplicated = rows beyond one per (metric, step). Stores: the embedded default
(`sqlite:///...`, what a sweep without tracking.uri uses) and an `mlflow server` process on
loopback with a SQLite backend (the cluster setup). Prints one Markdown row per store.
"""

import argparse
import json
import logging
import math
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METRICS = ("loss", "lr")


class _Counter(logging.Handler):
    """Counts MLflow retries (ditsweep.tracking logs one warning per retry) and 'locked' errors."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.retries = self.locked = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.retries += "retry" in text or "keeping them" in text
        self.locked += "locked" in text


def trial(args: tuple, start, results) -> None:
    """One simulated trial; puts what it logged and how long its flushes took on `results`."""
    uri, experiment, parent, index, seconds, log_every, flush_every = args
    from ditsweep.tracking.mlflow_runs import TrialRun

    counter = _Counter()
    logging.getLogger("ditsweep").addHandler(counter)
    start.wait()  # all trials start together, as in a sweep
    out = {"index": index, "steps": 0, "flush_s": [], "kept": 0, "error": None}
    try:
        t0 = time.perf_counter()
        run = TrialRun(uri, experiment, parent, f"{index:03d}_loadtest", {"index": index})
        out["create_s"] = time.perf_counter() - t0
        out["run_id"] = run.run_id
        end = time.monotonic() + seconds
        next_flush = time.monotonic() + flush_every
        while time.monotonic() < end:
            out["steps"] += 1
            s = out["steps"]
            run.log_metrics({"loss": 1.0 / s, "lr": 1e-4 * (1 + s % 7)}, s)
            if time.monotonic() >= next_flush:
                t0 = time.perf_counter()
                out["kept"] += not run.flush()  # False: kept queued for the next flush
                out["flush_s"].append(time.perf_counter() - t0)
                next_flush = time.monotonic() + flush_every
            time.sleep(log_every)
        t0 = time.perf_counter()
        run.finish()
        out["flush_s"].append(time.perf_counter() - t0)
    except Exception as e:  # a crashed trial loses its rows: counted, not hidden
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out["retries"], out["locked"] = counter.retries, counter.locked
    results.put(out)


def count_rows(uri: str, results: list[dict]) -> dict:
    """Rows expected, found, lost and duplicated, read back from the store."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    expected = found = lost = duplicated = 0
    for r in results:
        if "run_id" not in r:
            expected += r["steps"] * len(METRICS)
            lost += r["steps"] * len(METRICS)
            continue
        for key in METRICS:
            history = client.get_metric_history(r["run_id"], key)
            steps = {m.step for m in history}
            expected += r["steps"]
            found += len(history)
            lost += len(set(range(1, r["steps"] + 1)) - steps)
            duplicated += len(history) - len(steps)
    return {"expected": expected, "found": found, "lost": lost, "duplicated": duplicated}


def run_load(uri: str, procs: int, seconds: float, log_every: float, flush_every: float) -> dict:
    from mlflow.tracking import MlflowClient

    from ditsweep.tracking.mlflow_runs import experiment_id, start_sweep_run

    experiment = f"loadtest-{int(time.time())}"
    parent = start_sweep_run(uri, experiment, "loadtest", {"procs": procs})  # as the driver does
    experiment_id(MlflowClient(uri), experiment)
    # forkserver: the trial processes fork from one process that imported MLflow once.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mlflow", "ditsweep.tracking.mlflow_runs"])
    start, queue = ctx.Barrier(procs + 1), ctx.Queue()
    workers = [ctx.Process(target=trial, args=((uri, experiment, parent, i, seconds, log_every,
                                                 flush_every), start, queue)) for i in range(procs)]
    for w in workers:
        w.start()
    start.wait(timeout=300)
    t0 = time.monotonic()
    results = [queue.get(timeout=seconds + 900) for _ in workers]
    wall = time.monotonic() - t0
    for w in workers:
        w.join()
    rows = count_rows(uri, results)
    flushes = sorted(s for r in results for s in r["flush_s"])
    pct = lambda p: flushes[min(len(flushes) - 1, int(p * len(flushes)))] if flushes else math.nan  # noqa: E731
    return {**rows, "procs": procs, "seconds": seconds, "wall_s": round(wall, 1),
            "crashed": [r["error"] for r in results if r["error"]],
            "flushes": len(flushes), "flush_p50_s": round(pct(0.5), 3), "flush_p95_s": round(pct(0.95), 3),
            "flush_max_s": round(flushes[-1], 3) if flushes else math.nan,
            "create_max_s": round(max((r.get("create_s", 0) for r in results), default=0), 2),
            "kept_for_later": sum(r["kept"] for r in results),
            "retries": sum(r["retries"] for r in results), "locked": sum(r["locked"] for r in results)}


def mlflow_server(backend: Path, artifacts: Path, port: int, workers: int | None) -> subprocess.Popen:
    """`mlflow server` on loopback with a SQLite backend (by default its own worker count)."""
    import socket
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{backend}", "--artifacts-destination", str(artifacts)]
        + (["--workers", str(workers)] if workers else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("mlflow server did not start within 120 s")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group, started above)."""
    import os
    import signal
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditsweep.loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, default=32, help="concurrent trial processes")
    p.add_argument("--seconds", type=float, default=180, help="how long each trial logs")
    p.add_argument("--log-every", type=float, default=0.25, help="seconds between logged steps")
    p.add_argument("--flush-every", type=float, default=2.0, help="seconds between sends to MLflow")
    p.add_argument("--store", nargs="+", choices=["sqlite", "server"], default=["sqlite", "server"])
    p.add_argument("--server-workers", type=int, help="mlflow server --workers (default: mlflow's)")
    p.add_argument("--dir", help="where the stores go (default: a temporary directory)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="ditsweep-loadtest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for store in args.store:
        server = None
        if store == "sqlite":
            uri = f"sqlite:///{workdir / 'embedded.db'}"
        else:
            port = free_port()
            server = mlflow_server(workdir / "server.db", workdir / "artifacts", port, args.server_workers)
            uri = f"http://127.0.0.1:{port}"
        try:
            results[store] = run_load(uri, args.procs, args.seconds, args.log_every, args.flush_every)
        finally:
            if server is not None:
                stop(server)
    print("| store | procs x seconds | rows expected | lost | duplicated | crashed | flush p50 / p95 / max (s) "
          "| retries (locked) |")
    print("|---|---|---|---|---|---|---|---|")
    for store, r in results.items():
        print(f"| {store} | {r['procs']} x {r['seconds']:g} | {r['expected']} | {r['lost']} | {r['duplicated']} "
              f"| {len(r['crashed'])} | {r['flush_p50_s']} / {r['flush_p95_s']} / {r['flush_max_s']} "
              f"| {r['retries']} ({r['locked']}) |")
        for error in r["crashed"][:3]:
            print(f"  crashed: {error}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["lost"] == r["duplicated"] == 0 and not r["crashed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
