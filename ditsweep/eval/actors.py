"""The evaluation pool: Ray actors that evaluate trials while the trials go on training.

    run_sweep:  pool = start_pool(sweep)  ...  tuner.fit()  ...  stop_pool(pool)
    trial:      evaluator = Evaluator(cfg, run_id)
                evaluator.submit(ema, step)          # returns at once
                final = evaluator.finish(ema, step)  # the final job, then waits for all jobs

One named coordinator actor (no resources of its own) owns `eval.actors.count` worker actors,
each with `eval.actors.cpus` CPUs and `eval.actors.gpus` GPUs. `start_pool` creates them before
Tune places any trial, so Ray reserves their resources and Tune fits the trials in the rest.
The default `cpus: 0` reserves nothing: on a 2-core laptop the workers share the trials' cores
and can never keep a trial from being scheduled (no deadlock); a cluster sweep reserves real
CPUs or a GPU fraction.

The coordinator runs a trial's jobs one at a time in submission order (so MLflow sees a trial's
evaluations in step order) and different trials' jobs in parallel on free workers. When a worker
dies (killed, out of memory, node lost), or a job passes its deadline (eval/deadline.py: scaled
from its images, steps and metrics), the worker is killed and replaced and the job re-run, at most
`eval.actors.max_retries` times; a job that still fails, or that raises, is recorded in the run
(tag `ditsweep.eval_failure`, with the reason) and never fails the training. Values are logged
only after a job succeeded, and a (metric, step) already in the run is never logged again.
A trial that gets more than MAX_PENDING evaluations ahead of the pool waits for it (each queued
job holds a copy of the weights).
"""

import asyncio
import logging
import os
import time
from collections import Counter, defaultdict

import ray
import torch
from ray.exceptions import RayActorError

from ditsweep.config import EvalActorSettings, Sweep, TrialConfig
from ditsweep.eval.deadline import job_deadline
from ditsweep.eval.jobs import METRICS, EvalJob, EvalResult, metrics_due, process_info, run_job

log = logging.getLogger(__name__)

NAMESPACE = "ditsweep"
FAILURE_TAG = "ditsweep.eval_failure"
READY_TIMEOUT_S = 600.0  # a cluster may need to start nodes for the workers' resources
MAX_PENDING = 4          # unfinished evaluation jobs per trial before the trial waits


def pool_name(sweep_name: str) -> str:
    return f"eval-pool:{sweep_name}"


@ray.remote(max_restarts=0)  # the coordinator replaces dead workers itself and counts retries
class EvalWorker:
    def __init__(self, cpus: float, gpus: float):
        # Match the reservation: a worker with cpus=0 shares cores with the trials, one thread.
        torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")

    def info(self) -> dict:
        return {**process_info(), "device": str(self.device)}

    def run(self, job: EvalJob) -> EvalResult:
        weights = ray.get(job.weights) if isinstance(job.weights, ray.ObjectRef) else job.weights
        return run_job(job, weights, self.device)


class _Worker:
    def __init__(self, settings: EvalActorSettings):
        self.handle = EvalWorker.options(num_cpus=settings.cpus, num_gpus=settings.gpus).remote(
            settings.cpus, settings.gpus)
        self.info = self.handle.info.remote()  # resolves once the actor is up


@ray.remote(num_cpus=0)
class EvalCoordinator:
    def __init__(self, settings: dict):
        self.settings = EvalActorSettings.model_validate(settings)
        self.workers = [_Worker(self.settings) for _ in range(self.settings.count)]
        self.idle: asyncio.Queue = asyncio.Queue()
        for worker in self.workers:
            self.idle.put_nowait(worker)
        self.trial_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.running: dict[str, dict] = {}
        self.counts: Counter = Counter()
        self.per_trial: dict[str, Counter] = defaultdict(Counter)  # queued/running/done/failed

    async def ready(self) -> list[dict]:
        """Wait until every worker runs (holds its resources); returns their pid/host/device."""
        return list(await asyncio.gather(*(w.info for w in self.workers)))

    async def status(self) -> dict:
        return {"running": dict(self.running), "counts": dict(self.counts),
                "trials": {name: dict(c) for name, c in self.per_trial.items()}}

    async def evaluate(self, job: EvalJob) -> EvalResult:
        """Run one job (retrying on a dead worker), log its values to the trial's run, return it."""
        jobs = self.per_trial[job.trial["trial"]]  # for the progress view
        jobs["queued"] += 1
        async with self.trial_locks[job.trial["trial"]]:  # asyncio.Lock wakes waiters in FIFO order
            jobs["queued"] -= 1
            jobs["running"] += 1
            result = await self._run_with_retries(job)
            try:
                await asyncio.to_thread(record_result, job, result)
            except Exception as e:  # MLflow unreachable even after retries: say so, keep going
                log.error("could not log evaluation %s to MLflow: %s", job.name, e)
                result.failures["mlflow"] = f"{type(e).__name__}: {e}"
            self.counts["jobs"] += 1
            jobs["running"] -= 1
            jobs["failed" if result.failures else "done"] += 1
            return result

    async def _run_with_retries(self, job: EvalJob) -> EvalResult:
        reasons = []
        # A hung job (a stuck collective, NFS, a deadlock) would wait forever: past its deadline,
        # scaled from its size, its actor is killed and replaced and the job retried.
        deadline = await asyncio.to_thread(job_deadline, job.trial, job.metrics, self.settings)
        started = time.monotonic()
        for attempt in range(1, self.settings.max_retries + 2):
            worker = await self.idle.get()
            try:
                self.running[job.name] = {**await worker.info, "attempt": attempt, "deadline_s": deadline}
                result = await asyncio.wait_for(
                    asyncio.wrap_future(worker.handle.run.remote(job).future()), deadline)
            except RayActorError as e:
                # The worker process is gone: replace it and run the job again on a live one.
                reasons.append(f"attempt {attempt}: evaluation actor died ({_first_line(e)})")
                log.warning("evaluation %s: %s", job.name, reasons[-1])
                worker = self._replace(worker)
                continue
            except asyncio.TimeoutError:
                reasons.append(f"attempt {attempt}: no result within its deadline of {deadline:.0f} s, "
                               f"actor killed")
                log.warning("evaluation %s: %s", job.name, reasons[-1])
                self.counts["deadlines_missed"] += 1
                worker = self._replace(worker)
                continue
            except Exception as e:  # the job itself raised (e.g. its weights were lost): no retry
                self.counts["failed_jobs"] += 1
                return EvalResult(step=job.step, final=job.final, attempts=attempt,
                                  failures={"job": f"{type(e).__name__}: {_first_line(e)}"})
            finally:
                self.running.pop(job.name, None)
                self.idle.put_nowait(worker)  # the replacement, if this one died
            result.attempts = attempt
            self.counts["retried_jobs"] += attempt > 1
            return result
        self.counts["failed_jobs"] += 1
        took = time.monotonic() - started
        return EvalResult(step=job.step, final=job.final, attempts=len(reasons), seconds={"job": took},
                          failures={"job": f"gave up after {len(reasons)} attempts in {took:.0f} s: "
                                           + "; ".join(reasons)})

    def _replace(self, worker: "_Worker") -> "_Worker":
        """Kill a dead, unreachable or hung worker and start another in its place."""
        self.counts["workers_replaced"] += 1
        self.workers.remove(worker)
        ray.kill(worker.handle, no_restart=True)  # SIGKILL: works on a hung (even stopped) process
        replacement = _Worker(self.settings)
        self.workers.append(replacement)
        return replacement

    async def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker.handle, no_restart=True)


def record_result(job: EvalJob, result: EvalResult) -> None:
    """Log a finished job's values to the trial's run (a (metric, step) the run already has is
    skipped: a job re-run after a trial restart must not log twice), and record failures."""
    from mlflow.tracking import MlflowClient

    from ditsweep.tracking.run_logger import RunLogger, log_batch

    client = MlflowClient(job.trial["tracking_uri"])
    logger = RunLogger(client, job.run_id)
    logger.add(result.scalars, job.step)
    logger.add({f"eval_seconds_{name}": s for name, s in result.seconds.items()}, job.step)
    logger.add({"eval_attempts": result.attempts}, job.step)
    for key, (steps, series) in result.series.items():
        for step, value in zip(steps, series):
            logger.add({key: value}, step)
    logger.send()
    tags = {}
    if result.evaluator:
        tags = {"ditsweep.evaluator_pid": str(result.evaluator["pid"]),
                "ditsweep.evaluator_host": str(result.evaluator["host"])}
    if result.failures:
        where = f"step {job.step}{' (final)' if job.final else ''}"
        reasons = "; ".join(f"{where} {name}: {reason}" for name, reason in result.failures.items())
        tags[FAILURE_TAG] = reasons[:5000]
    if tags:
        log_batch(client, job.run_id, tags=tags)


class Evaluator:
    """A trial's side of the pool: hand over the EMA weights and go on; wait at the end."""

    def __init__(self, cfg: TrialConfig, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.pending: list[ray.ObjectRef] = []
        try:
            self.pool = ray.get_actor(pool_name(cfg.sweep), namespace=NAMESPACE)
        except ValueError:
            raise RuntimeError(f"no evaluation pool {pool_name(cfg.sweep)!r} in Ray namespace "
                               f"{NAMESPACE!r}: trials are evaluated by the pool that "
                               f"`python -m ditsweep.run` starts (ditsweep.eval.actors.start_pool)") from None

    def submit(self, model: torch.nn.Module, step: int, final: bool = False) -> bool:
        """Queue the metrics due at `step` on a copy of the weights; False if none are due."""
        metrics = metrics_due(self.cfg.eval, step, final, self.cfg.n_train)
        if not metrics:
            return False
        self._limit_pending()
        # A CPU copy now: training goes on changing the weights while the job waits in the queue.
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        job = EvalJob(trial=self.cfg.model_dump(), run_id=self.run_id, step=step, final=final,
                      metrics=metrics, weights=ray.put(state))
        self.pending.append(self.pool.evaluate.remote(job))
        return True

    def _limit_pending(self) -> None:
        """Back-pressure: if evaluation falls behind training, each queued job pins a copy of the
        weights in the object store; beyond MAX_PENDING unfinished jobs the trial waits."""
        if len(self.pending) < MAX_PENDING:
            return
        _, unfinished = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
        if len(unfinished) >= MAX_PENDING:
            log.warning("trial %s waits for its evaluations to catch up (%d queued)",
                        self.cfg.trial, len(unfinished))
            ray.wait(unfinished, num_returns=len(unfinished) - MAX_PENDING + 1)

    def finish(self, model: torch.nn.Module, step: int) -> EvalResult | None:
        """Submit the final evaluation and wait for every job of this trial; returns the final
        job's result (its values are already in MLflow)."""
        submitted = self.submit(model, step, final=True)
        results = []
        for ref in self.pending:
            try:
                results.append(ray.get(ref))
            except Exception as e:  # the coordinator itself is gone: record, do not fail training
                failed = EvalResult(step=step, final=True, attempts=0,
                                    failures={"pool": f"{type(e).__name__}: {_first_line(e)}"})
                results.append(failed)
                try:
                    record_result(EvalJob(self.cfg.model_dump(), self.run_id, step, True, [], None), failed)
                except Exception:
                    log.exception("could not record the evaluation pool's failure in MLflow")
        self.pending.clear()
        return results[-1] if submitted and results else None


def evaluate_saved(pool, cfg: TrialConfig, run_id: str, state_dict: dict, step: int,
                   metrics: list[str]) -> ray.ObjectRef:
    """An evaluation-only job: `metrics` of saved weights, no training (e.g. FID added to the YAML
    of a trial reused from a run that lacks it). The pool logs the values to `run_id`; the
    returned reference resolves to the EvalResult."""
    job = EvalJob(trial=cfg.model_dump(), run_id=run_id, step=step, final=True, metrics=metrics,
                  weights=ray.put(state_dict))
    return pool.evaluate.remote(job)


def start_pool(sweep: Sweep, local: bool | None = None, trials: int | None = None):
    """Create the sweep's evaluation pool and wait until its workers hold their resources.
    `trials`: how many trials it will evaluate; the pool never has more workers than that (an
    idle worker only costs a process start and memory). Returns the coordinator handle, or None
    when the sweep evaluates nothing."""
    settings = sweep.eval
    if not any(getattr(settings, m).enabled for m in METRICS):
        return None
    actors = settings.actors
    if trials:
        actors = actors.model_copy(update={"count": min(actors.count, trials)})
    local = (not os.environ.get("RAY_ADDRESS")) if local is None else local
    check_fits(actors, sweep.resources.cpus_per_trial, sweep.resources.gpus_per_trial,
               ray.cluster_resources(), strict=local)
    coordinator = EvalCoordinator.options(name=pool_name(sweep.name), namespace=NAMESPACE,
                                          max_concurrency=10_000).remote(actors.model_dump())
    workers = ray.get(coordinator.ready.remote(), timeout=READY_TIMEOUT_S)
    log.info("evaluation pool %s: %d workers %s", pool_name(sweep.name), len(workers), workers)
    return coordinator


def stop_pool(coordinator) -> None:
    if coordinator is None:
        return
    try:
        ray.get(coordinator.shutdown.remote(), timeout=30)
    finally:
        ray.kill(coordinator)


def check_fits(actors: EvalActorSettings, cpus_per_trial: float, gpus_per_trial: float,
               cluster: dict, strict: bool = True) -> None:
    """Raise (or, on a cluster that may still grow, warn) when the workers' reservation leaves no
    room for a single trial: Tune would wait forever."""
    problems = []
    for resource, per_actor, per_trial, name in (("CPU", actors.cpus, cpus_per_trial, "cpus"),
                                                 ("GPU", actors.gpus, gpus_per_trial, "gpus")):
        reserved = actors.count * per_actor
        total = cluster.get(resource, 0.0)
        if reserved and total - reserved < per_trial:
            problems.append(
                f"eval.actors reserves {actors.count} x {per_actor:g} = {reserved:g} {resource}s, which "
                f"leaves {total - reserved:g} of this Ray cluster's {total:g} for trials that need "
                f"{per_trial:g} each (resources.{name}_per_trial); lower eval.actors.{name} or "
                f"eval.actors.count (0 CPUs = share the trials' cores)")
    if problems and strict:
        raise ValueError("; ".join(problems))
    for p in problems:
        log.warning("%s (waiting for the cluster to grow)", p)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]
