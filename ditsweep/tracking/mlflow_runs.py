"""MLflow bookkeeping: one parent run per sweep, one child run per trial.

Everything goes through an explicit `MlflowClient` and run ids (no global "active run"), because
trials log from Ray worker processes and evaluation actors log into the same run. A trial finds
its child run again by the tag `ditsweep.trial` under its parent, so a retried trial reattaches
to its run instead of creating a second one.
"""

import logging
import re
from collections.abc import Iterable
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE

from ditsweep.tracking.run_logger import RunLogger, log_batch, retrying

log = logging.getLogger(__name__)

TRIAL_TAG = "ditsweep.trial"
SWEEP_TAG = "ditsweep.sweep"
ROLE_TAG = "ditsweep.role"  # "sweep" or "trial"
IDENTITY_TAG = "ditsweep.identity"  # ditsweep.identity.trial_identity
# A trial run names its sweep run by this tag, not by MLflow's parent tag: the MLflow UI folds
# child runs under their parent, which hid every trial of a sweep behind one row.
SWEEP_RUN_TAG = "ditsweep.sweep_run_id"


# MLflow 3's UI opens an experiment without a kind on its GenAI overview ("No data"); marked as
# model training, the experiment's page opens on its runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = retrying(lambda: client.get_experiment_by_name(name), "get experiment")
    if exp is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        except Exception:  # another process created it first
            exp = retrying(lambda: client.get_experiment_by_name(name), "get experiment")
    if not any(exp.tags.get(k) for k in EXPERIMENT_KIND):  # made by an older ditsweep, or by hand
        for key, value in EXPERIMENT_KIND.items():
            retrying(lambda: client.set_experiment_tag(exp.experiment_id, key, value), "tag experiment")
    return exp.experiment_id


def start_sweep_run(tracking_uri: str, experiment: str, sweep_name: str,
                    params: dict[str, Any], run_id: str | None = None, description: str = "") -> str:
    """Create the sweep's parent run (or reopen `run_id` when resuming) and return its id.
    `description` becomes the run's description in the MLflow UI (Markdown)."""
    client = MlflowClient(tracking_uri)
    if run_id:
        retrying(lambda: client.update_run(run_id, status="RUNNING"), "reopen sweep run")
        return run_id
    exp_id = experiment_id(client, experiment)
    run = retrying(lambda: client.create_run(exp_id, run_name=sweep_name,
                                             tags={SWEEP_TAG: sweep_name, ROLE_TAG: "sweep"}),
                   "create sweep run")
    report = f"#/experiments/{exp_id}/runs/{run.info.run_id}/artifacts/report/REPORT.md"
    note = (f"{description}\n\n" if description else "") + (
        f"The trials are this run's child runs. When the sweep ends, its report (the paper's "
        f"tables and figures for these trials) is logged here as [report/REPORT.md]({report}).")
    log_batch(client, run.info.run_id, tags={MLFLOW_RUN_NOTE: note})
    log_batch(client, run.info.run_id, params=params)
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
        self.run_id = self._find(exp_id, parent_run_id, trial_name, (tags or {}).get(IDENTITY_TAG))
        if self.run_id is None:
            all_tags = {TRIAL_TAG: trial_name, ROLE_TAG: "trial", MLFLOW_RUN_NAME: trial_name,
                        **(tags or {})}
            if parent_run_id:
                all_tags[SWEEP_RUN_TAG] = parent_run_id
            run = retrying(lambda: self.client.create_run(exp_id, run_name=trial_name,
                                                          tags=all_tags), "create trial run")
            self.run_id = run.info.run_id
            log_batch(self.client, self.run_id, params=params)
        else:
            retrying(lambda: self.client.update_run(self.run_id, status="RUNNING"), "reopen run")
        # Skips the steps an earlier attempt of this trial already logged.
        self.metrics = RunLogger(self.client, self.run_id)

    def _find(self, exp_id: str, parent_run_id: str | None, trial_name: str,
              identity: str | None = None) -> str | None:
        if not parent_run_id:
            return None  # without a parent there is nothing to reattach to
        # By identity when known: a sweep continued after its YAML changed may reuse a trial
        # name for another trial, and must not append to that trial's run.
        key, value = (IDENTITY_TAG, identity) if identity else (TRIAL_TAG, trial_name)
        query = (f"tags.`{key}` = '{value}' and "
                 f"tags.`{SWEEP_RUN_TAG}` = '{parent_run_id}'")
        runs = retrying(lambda: self.client.search_runs([exp_id], query, max_results=2), "search")
        return runs[0].info.run_id if runs else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric values at a step (sent at the next flush)."""
        self.metrics.add(metrics, step)

    def log_series(self, name: str, steps: Iterable[int], values: Iterable[float]) -> None:
        """A curve as one metric whose MLflow step is the x-axis (e.g. the diffusion timestep)."""
        for step, value in zip(steps, values):
            self.log_metrics({name: value}, step)

    def flush(self, must: bool = False) -> bool:
        """Send queued metrics. Returns False (keeping them) if MLflow is unreachable, unless
        `must`, in which case it retries longer and then raises MlflowUnavailable."""
        pending = len(self.metrics.pending)
        try:
            self.metrics.send(attempts=8 if must else 2)
        except Exception as e:
            message = (f"could not log {pending} metric values to MLflow at "
                       f"{safe_uri(self.tracking_uri)} (run {self.run_id}): {type(e).__name__}")
            if must:
                raise MlflowUnavailable(message) from None
            log.warning("%s; keeping them for the next attempt", message)
            return False
        return True

    def set_tags(self, tags: dict[str, str]) -> None:
        log_batch(self.client, self.run_id, tags=tags)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        retrying(lambda: self.client.log_artifact(self.run_id, path, artifact_path), "artifact")

    def finish(self, status: str = "FINISHED") -> None:
        self.flush(must=True)
        retrying(lambda: self.client.set_terminated(self.run_id, status=status), "end run")


def safe_uri(uri: str) -> str:
    """A URI without the user:password part, for messages and logs."""
    return re.sub(r"//[^/@]*@", "//***@", uri)
