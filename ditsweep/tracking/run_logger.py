"""One writer for a run's metrics: batches, retries, and never the same (metric, step) twice.

A trial's run is written by the trial process (loss) and by evaluation actors (PSNR gap, FID,
...), and either may be re-run: a trial restarted from its last checkpoint replays steps it had
already logged, an evaluation retried after its actor died computes the same values again.
`RunLogger` reads which steps each metric already has in MLflow the first time it sends that
metric, and from then on skips them, so MLflow's history holds every (metric, step) once.

    logger = RunLogger(client, run_id)
    logger.add({"loss": 0.3}, step=200)
    logger.send()                      # raises if MLflow is unreachable; the values stay queued
"""

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class RunLogger:
    """Queued metric values of one run, sent in batches, each (metric, step) at most once."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.pending: dict[tuple[str, int], float] = {}
        self._logged: dict[str, set[int]] | None = None  # metric -> steps already in MLflow

    def add(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.pending[(key, int(step))] = float(value)

    def send(self, attempts: int = 8) -> int:
        """Send the queued values that MLflow does not have yet; returns how many were sent.
        On failure the values stay queued and the error is raised."""
        if not self.pending:
            return 0
        logged = self._steps_in_mlflow({key for key, _ in self.pending}, attempts)
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, s) for (k, s), v in sorted(self.pending.items())
                 if s not in logged.get(k, ())]
        log_batch(self.client, self.run_id, metrics=batch, attempts=attempts)
        for key, step in self.pending:
            logged.setdefault(key, set()).add(step)
        self.pending.clear()
        return len(batch)

    def _steps_in_mlflow(self, keys: set[str], attempts: int) -> dict[str, set[int]]:
        """Steps of `keys` already logged, read from MLflow once per metric (the run may have been
        written by an earlier attempt of the trial or of the evaluation)."""
        if self._logged is None:
            run = retrying(lambda: self.client.get_run(self.run_id), "get run", attempts)
            self._in_run = set(run.data.metrics)
            self._logged = {}
        for key in keys - set(self._logged):
            history = (retrying(lambda: self.client.get_metric_history(self.run_id, key), "history",
                                attempts) if key in self._in_run else [])
            self._logged[key] = {m.step for m in history}
        return self._logged


def log_batch(client: MlflowClient, run_id: str, metrics: list[Metric] = (),
              params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
              attempts: int = 8) -> None:
    """log_batch in chunks below MLflow's limits (1000 metrics, 100 params and 100 tags per call)."""
    param_list = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    metrics = list(metrics)
    for i in range(0, max(len(param_list), len(tag_list)), 100):
        retrying(lambda: client.log_batch(run_id, params=param_list[i:i + 100], tags=tag_list[i:i + 100]),
                 "log params", attempts)
    for i in range(0, len(metrics), 1000):
        chunk = metrics[i:i + 1000]
        retrying(lambda: client.log_batch(run_id, metrics=chunk), "log metrics", attempts=attempts)
