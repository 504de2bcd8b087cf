"""MLflow bookkeeping: one parent run per sweep, one child run per trial.

Everything goes through an explicit `MlflowClient` and run ids (no global "active run"), because
trials log from Ray worker processes and evaluation actors log into the same run. A trial finds
its child run again by the tag `ditsweep.trial` under its parent, so a retried trial reattaches
to its run instead of creating a second one.
"""

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

log = logging.getLogger(__name__)
T = TypeVar("T")

TRIAL_TAG = "ditsweep.trial"
SWEEP_TAG = "ditsweep.sweep"
ROLE_TAG = "ditsweep.role"  # "sweep" or "trial"


def retrying(call: Callable[[], T], what: str, attempts: int = 8, first_wait: float = 0.5) -> T:
    """Run an MLflow call, retrying with exponential backoff (a busy SQLite file, a server restart)."""
    wait = first_wait
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:  # MLflow raises many types for "not reachable right now"
            if attempt == attempts:
                raise
            log.warning("MLflow %s failed (%s: %s); retry %d/%d in %.1fs",
                        what, type(e).__name__, str(e)[:200], attempt, attempts - 1, wait)
            time.sleep(wait)
            wait = min(wait * 2, 15.0)
    raise AssertionError("unreachable")


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = retrying(lambda: client.get_experiment_by_name(name), "get experiment")
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it first
        return retrying(lambda: client.get_experiment_by_name(name), "get experiment").experiment_id


def start_sweep_run(tracking_uri: str, experiment: str, sweep_name: str,
                    params: dict[str, Any], run_id: str | None = None) -> str:
    """Create the sweep's parent run (or reopen `run_id` when resuming) and return its id."""
    client = MlflowClient(tracking_uri)
    if run_id:
        retrying(lambda: client.update_run(run_id, status="RUNNING"), "reopen sweep run")
        return run_id
    exp_id = experiment_id(client, experiment)
    run = retrying(lambda: client.create_run(exp_id, run_name=sweep_name,
                                             tags={SWEEP_TAG: sweep_name, ROLE_TAG: "sweep"}),
                   "create sweep run")
    _log_batch(client, run.info.run_id, params=params)
    return run.info.run_id


def find_sweep_run(tracking_uri: str, experiment: str, sweep_name: str) -> str | None:
    """The newest parent run of a sweep, for resuming it."""
    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, experiment)
    query = f"tags.`{SWEEP_TAG}` = '{sweep_name}' and tags.`{ROLE_TAG}` = 'sweep'"
    runs = retrying(lambda: client.search_runs([exp_id], query, max_results=1,
                                               order_by=["attributes.start_time DESC"]), "search")
    return runs[0].info.run_id if runs else None


def log_planned_trials(tracking_uri: str, run_id: str, trials: list) -> None:
    """Every trial the sweep plans, as `trials.json` on the parent run, so a report can tell a
    trial that never ran from one that was never planned."""
    client = MlflowClient(tracking_uri)
    rows = [{k: v for k, v in t.model_dump().items() if k in PLANNED_FIELDS} for t in trials]
    retrying(lambda: client.log_dict(run_id, rows, "trials.json"), "log trials.json")


PLANNED_FIELDS = ("trial", "model", "arch", "layout_name", "layout", "variant", "n_train", "seed",
                  "dataset")


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client = MlflowClient(tracking_uri)
    retrying(lambda: client.set_terminated(run_id, status=status), "end run")


class MlflowUnavailable(RuntimeError):
    """Metrics could not be delivered to the tracking server, even after retries."""


class TrialRun:
    """The child run of one trial: created once, found again after a retry or a resume.

    Metrics are queued and sent in batches. A failed send keeps them queued (the server may be
    restarting) and the next flush tries again; `finish` insists, so nothing is dropped silently.
    Steps that a previous attempt of the trial already logged are not logged again.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str | None,
                 trial_name: str, params: dict[str, Any], tags: dict[str, str] | None = None):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        exp_id = experiment_id(self.client, experiment)
        self.run_id = self._find(exp_id, parent_run_id, trial_name)
        self.logged_up_to: dict[str, int] = {}  # metric -> last step already in MLflow
        self.pending: dict[tuple[str, int], float] = {}
        if self.run_id is None:
            all_tags = {TRIAL_TAG: trial_name, ROLE_TAG: "trial", MLFLOW_RUN_NAME: trial_name,
                        **(tags or {})}
            if parent_run_id:
                all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
            run = retrying(lambda: self.client.create_run(exp_id, run_name=trial_name,
                                                          tags=all_tags), "create trial run")
            self.run_id = run.info.run_id
            _log_batch(self.client, self.run_id, params=params)
        else:
            run = retrying(lambda: self.client.get_run(self.run_id), "get run")
            for key in run.data.metrics:
                history = retrying(lambda: self.client.get_metric_history(self.run_id, key), "history")
                self.logged_up_to[key] = max((m.step for m in history), default=-1)
            retrying(lambda: self.client.update_run(self.run_id, status="RUNNING"), "reopen run")

    def _find(self, exp_id: str, parent_run_id: str | None, trial_name: str) -> str | None:
        if not parent_run_id:
            return None  # without a parent there is nothing to reattach to
        query = (f"tags.`{TRIAL_TAG}` = '{trial_name}' and "
                 f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'")
        runs = retrying(lambda: self.client.search_runs([exp_id], query, max_results=2), "search")
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at a step (sent at the next flush)."""
        for key, value in metrics.items():
            if step > self.logged_up_to.get(key, -1):
                self.pending[(key, int(step))] = float(value)

    def log_series(self, name: str, steps: Iterable[int], values: Iterable[float]) -> None:
        """A curve as one metric whose MLflow step is the x-axis (e.g. the diffusion timestep)."""
        for step, value in zip(steps, values):
            self.log_metrics({name: value}, step)

    def flush(self, must: bool = False) -> bool:
        """Send queued metrics. Returns False (keeping them) if MLflow is unreachable, unless
        `must`, in which case it retries longer and then raises MlflowUnavailable."""
        if not self.pending:
            return True
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, s) for (k, s), v in sorted(self.pending.items())]
        try:
            _log_batch(self.client, self.run_id, metrics=batch, attempts=8 if must else 2)
        except Exception as e:
            message = (f"could not log {len(batch)} metric values to MLflow at "
                       f"{safe_uri(self.tracking_uri)} (run {self.run_id}): {type(e).__name__}")
            if must:
                raise MlflowUnavailable(message) from None
            log.warning("%s; keeping them for the next attempt", message)
            return False
        for key, step in self.pending:
            self.logged_up_to[key] = max(self.logged_up_to.get(key, -1), step)
        self.pending.clear()
        return True

    def set_tags(self, tags: dict[str, str]) -> None:
        _log_batch(self.client, self.run_id, tags=tags)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        retrying(lambda: self.client.log_artifact(self.run_id, path, artifact_path), "artifact")

    def finish(self, status: str = "FINISHED") -> None:
        self.flush(must=True)
        retrying(lambda: self.client.set_terminated(self.run_id, status=status), "end run")


def safe_uri(uri: str) -> str:
    """A URI without the user:password part, for messages and logs."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def _log_batch(client: MlflowClient, run_id: str, metrics: list[Metric] = (),
               params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
               attempts: int = 8) -> None:
    """log_batch in chunks below MLflow's limits (1000 metrics, 100 params per call)."""
    param_list = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    metrics = list(metrics)
    for i in range(0, max(len(param_list), 1), 100):
        chunk = param_list[i:i + 100]
        if chunk or (i == 0 and tag_list):
            retrying(lambda: client.log_batch(run_id, params=chunk, tags=tag_list if i == 0 else []),
                     "log params")
    for i in range(0, len(metrics), 1000):
        chunk = metrics[i:i + 1000]
        retrying(lambda: client.log_batch(run_id, metrics=chunk), "log metrics", attempts=attempts)
