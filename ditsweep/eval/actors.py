"""The evaluation pool: Ray actors that evaluate trials while the trials go on training.

    run_sweep:  pool = start_pool(sweep)  ...  tuner.fit()  ...  stop_pool(pool)
    trial:      evaluator = Evaluator(cfg, run_id)
                evaluator.submit(ema, step)          # returns at once
                final = evaluator.finish(ema, step)  # the final job, then waits for all jobs
    fused:      submit_group(evaluators, emas, step)  # members' finals, FID sampled batched

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
The final jobs of a fused group's members that sample FID run as ONE pool job (eval/jobs.py
run_group_jobs: the members' samples drawn batched over members), holding every member's lock.
A trial that gets more than MAX_PENDING evaluations ahead of the pool waits for it (each queued
job holds a copy of the weights).
"""

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, defaultdict

import ray
import torch
from ray.exceptions import RayActorError

from ditsweep.config import EvalActorSettings, Sweep, TrialConfig
from ditsweep.eval.deadline import job_deadline
from ditsweep.eval.jobs import METRICS, EvalJob, EvalResult, metrics_due, process_info, run_group_jobs

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

    def run(self, jobs: list[EvalJob]) -> list[EvalResult]:
        """One job, or a fused group's final jobs (same step; FID sampled for all at once)."""
        weights = [ray.get(j.weights) if isinstance(j.weights, ray.ObjectRef) else j.weights for j in jobs]
        return run_group_jobs(jobs, weights, self.device)


class _Worker:
    def __init__(self, settings: EvalActorSettings):
        # SPREAD: one lost node takes at most its share of the pool, not every evaluator
        self.handle = EvalWorker.options(num_cpus=settings.cpus, num_gpus=settings.gpus,
                                         scheduling_strategy="SPREAD", **off_cpuless_nodes(settings),
                                         ).remote(settings.cpus, settings.gpus)
        self.info = self.handle.info.remote()  # resolves once the actor is up


def off_cpuless_nodes(settings: EvalActorSettings) -> dict:
    """Actor options that keep a worker reserving neither CPUs nor GPUs off the nodes with 0 CPUs
    (a KubeRay head: the driver's node), while another node exists for it. A node that joins later
    counts from the next replacement on; with only 0-CPU nodes alive (GPU workers that scale from
    zero) the worker goes where Ray puts it, the head included (README, "On a cluster")."""
    if settings.cpus or settings.gpus:
        return {}  # Ray places it where its CPUs or GPUs are
    alive = [n for n in ray.nodes() if n.get("Alive")]
    cpuless = [n["NodeID"] for n in alive if not n.get("Resources", {}).get("CPU")]
    if not cpuless or len(cpuless) == len(alive):
        return {}
    return {"label_selector": {"ray.io/node-id": f"!in({','.join(cpuless)})"}}


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
        return (await self.evaluate_group([job]))[0]

    async def evaluate_group(self, jobs: list[EvalJob]) -> list[EvalResult]:
        """Run jobs of different trials as one (a fused group's finals) after each trial's
        earlier jobs; log each job's values to its trial's run; their results in job order."""
        counts = [self.per_trial[j.trial["trial"]] for j in jobs]  # for the progress view
        for c in counts:
            c["queued"] += 1
        async with contextlib.AsyncExitStack() as held:
            # asyncio.Lock wakes waiters in FIFO order; taken in name order, so groups never deadlock
            for name in sorted(j.trial["trial"] for j in jobs):
                await held.enter_async_context(self.trial_locks[name])
            for c in counts:
                c["queued"] -= 1
                c["running"] += 1
            results = await self._run_with_retries(jobs)
            for job, result, c in zip(jobs, results, counts):
                try:
                    await asyncio.to_thread(record_result, job, result)
                except Exception as e:  # MLflow unreachable even after retries: say so, keep going
                    log.error("could not log evaluation %s to MLflow: %s", job.name, e)
                    result.failures["mlflow"] = f"{type(e).__name__}: {e}"
                self.counts["jobs"] += 1
                c["running"] -= 1
                c["failed" if result.failures else "done"] += 1
        return results

    async def _run_with_retries(self, jobs: list[EvalJob]) -> list[EvalResult]:
        reasons = []
        # A hung job (a stuck collective, NFS, a deadlock) would wait forever: past its deadline,
        # scaled from its size, its actor is killed and replaced and the job retried.
        deadline = sum([await asyncio.to_thread(job_deadline, j.trial, j.metrics, self.settings) for j in jobs])
        name = jobs[0].name + (f" +{len(jobs) - 1} fused" if len(jobs) > 1 else "")
        started = time.monotonic()

        def each(**fields) -> list[EvalResult]:
            return [EvalResult(step=j.step, final=j.final, **fields) for j in jobs]
        for attempt in range(1, self.settings.max_retries + 2):
            worker = await self.idle.get()
            try:
                self.running[name] = {**await worker.info, "attempt": attempt, "deadline_s": deadline}
                results = await asyncio.wait_for(
                    asyncio.wrap_future(worker.handle.run.remote(jobs).future()), deadline)
            except RayActorError as e:
                # The worker process is gone: replace it and run the job again on a live one.
                reasons.append(f"attempt {attempt}: evaluation actor died ({_first_line(e)})")
                log.warning("evaluation %s: %s", name, reasons[-1])
                worker = self._replace(worker)
                continue
            except asyncio.TimeoutError:
                reasons.append(f"attempt {attempt}: no result within its deadline of {deadline:.0f} s, "
                               f"actor killed")
                log.warning("evaluation %s: %s", name, reasons[-1])
                self.counts["deadlines_missed"] += 1
                worker = self._replace(worker)
                continue
            except Exception as e:  # the job itself raised (e.g. its weights were lost): no retry
                self.counts["failed_jobs"] += len(jobs)
                return each(attempts=attempt, failures={"job": f"{type(e).__name__}: {_first_line(e)}"})
            finally:
                self.running.pop(name, None)
                self.idle.put_nowait(worker)  # the replacement, if this one died
            for result in results:
                result.attempts = attempt
            self.counts["retried_jobs"] += (attempt > 1) * len(jobs)
            return results
        self.counts["failed_jobs"] += len(jobs)
        took = time.monotonic() - started
        return each(attempts=len(reasons), seconds={"job": took},
                    failures={"job": f"gave up after {len(reasons)} attempts in {took:.0f} s: " + "; ".join(reasons)})

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
        job = self.job(model, step, final)
        if job is not None:
            self.pending.append(self.pool.evaluate.remote(job))
        return job is not None

    def job(self, model: torch.nn.Module, step: int, final: bool) -> EvalJob | None:
        """The job of the metrics due at `step` (None if none are due), once the pool has room."""
        metrics = metrics_due(self.cfg.eval, step, final, self.cfg.n_train)
        if not metrics:
            return None
        self._limit_pending()
        # A CPU copy now: training goes on changing the weights while the job waits in the queue.
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return EvalJob(trial=self.cfg.model_dump(), run_id=self.run_id, step=step, final=final,
                       metrics=metrics, weights=ray.put(state))

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
        return self.wait(step, submitted=self.submit(model, step, final=True))

    def wait(self, step: int, submitted: bool = True) -> EvalResult | None:
        """Wait for every job of this trial; the final one's result if it was `submitted` (a
        fused group submits all its members' final evaluations first, then waits for each)."""
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


def submit_group(evaluators: list[Evaluator], models: list[torch.nn.Module], step: int) -> list[bool]:
    """The final evaluations of a fused group's members, all at `step`: the members that sample
    FID go to the pool as one job (their samples drawn batched over members, each member's as
    its own job would draw them); the others as their own jobs. Then `evaluator.wait` each."""
    jobs = [e.job(m, step, final=True) for e, m in zip(evaluators, models)]
    together = [i for i, j in enumerate(jobs) if j is not None and "fid" in j.metrics]
    if len(together) > 1:
        refs = evaluators[together[0]].pool.evaluate_group.options(num_returns=len(together)).remote(
            [jobs[i] for i in together])
        for i, ref in zip(together, refs):
            evaluators[i].pending.append(ref)
    for i, (e, j) in enumerate(zip(evaluators, jobs)):
        if j is not None and (i not in together or len(together) == 1):
            e.pending.append(e.pool.evaluate.remote(j))
    return [j is not None for j in jobs]


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
    # On the driver's node: a 0-CPU actor may otherwise land on any worker node, and die with it
    # (or with an autoscaler's scale-down of an "idle" node), taking the whole pool along.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    coordinator = EvalCoordinator.options(name=pool_name(sweep.name), namespace=NAMESPACE,
                                          max_concurrency=10_000, scheduling_strategy=here,
                                          ).remote(actors.model_dump())
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
