"""Reuse of finished trainings across sweeps: look up runs by trial identity, link them.

Every trial run carries the tags `ditsweep.identity` (ditsweep.identity.trial_identity) and
`ditsweep.recipe` (the same without the dataset checksum, for --dry-run, which opens no dataset).
A run that trained is an *original*; a run that stands in a sweep for an original trained
elsewhere is a *link*: a child run of the sweep with the tag `ditsweep.reused_from` = the
original's run id, the original's params and tags, and a copy of every metric's full history, so
the report and MLflow's compare view treat it as this sweep's trial.

Choices for the bad cases:
- the same identity in several FINISHED originals: the newest one is used (a deliberate
  `--no-reuse` rerun supersedes the older run), and a warning names the others;
- two sweeps training the same identity at once: the run that started first (then the smaller
  run id) trains; the other waits for it and links to it, or trains itself if that run fails or
  sends no heartbeat (`ditsweep.heartbeat`) for STALE_SECONDS.
"""

import logging
import os
import tempfile
import time
from typing import Any

from mlflow.entities import Metric, ViewType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from ditsweep.tracking.run_logger import log_batch
from ditsweep.tracking.mlflow_runs import (IDENTITY_TAG, ROLE_TAG, SWEEP_RUN_TAG, SWEEP_TAG, TRIAL_TAG,
                                           experiment_id, retrying)

log = logging.getLogger(__name__)

RECIPE_TAG = "ditsweep.recipe"
CODE_VERSION_TAG = "ditsweep.code_version"
REUSED_FROM_TAG = "ditsweep.reused_from"
REUSED_EXPERIMENT_TAG = "ditsweep.reused_from_experiment"
CHECKPOINT_TAG = "ditsweep.checkpoint"       # the final checkpoint's URL (identity store)
HEARTBEAT_TAG = "ditsweep.heartbeat"         # unix seconds, refreshed while a trial trains
STALE_SECONDS = float(os.environ.get("DITSWEEP_STALE_RUN_SECONDS", 1800))
POLL_SECONDS = float(os.environ.get("DITSWEEP_TWIN_POLL_SECONDS", 10))
# Tags of the original that describe the trial itself (not where or when it ran).
_COPIED_TAG_PREFIX = "ditsweep."
_NOT_COPIED = {SWEEP_TAG, TRIAL_TAG, HEARTBEAT_TAG, "ditsweep.trial_pid", "ditsweep.trial_host",
               "ditsweep.evaluator_pid", "ditsweep.evaluator_host", "ditsweep.resumed_from_step"}


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    ids, token = [], None
    while True:
        page = retrying(lambda: client.search_experiments(max_results=1000, page_token=token),
                        "search experiments")
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def search_by_tag(client: MlflowClient, tag: str, value: str, extra: str = "") -> list:
    """Trial runs in any experiment whose `tag` equals `value`, newest first."""
    query = f"tags.`{tag}` = '{value}' and tags.`{ROLE_TAG}` = 'trial'" + (f" and {extra}" if extra else "")
    runs, exp_ids = [], _all_experiment_ids(client)
    for i in range(0, len(exp_ids), 100):  # the REST API takes a bounded list of experiments
        chunk, token = exp_ids[i:i + 100], None
        while True:
            page = retrying(lambda: client.search_runs(chunk, query, ViewType.ACTIVE_ONLY,
                                                       max_results=1000, page_token=token), "search")
            runs += list(page)
            token = page.token
            if not token:
                break
    return sorted(runs, key=lambda r: -(r.info.start_time or 0))


def is_original(run) -> bool:
    return REUSED_FROM_TAG not in run.data.tags


def find_original(client: MlflowClient, identity: str, tag: str = IDENTITY_TAG):
    """The newest FINISHED run that trained this identity, or None. Warns when there are more."""
    found = [r for r in search_by_tag(client, tag, identity, "attributes.status = 'FINISHED'")
             if is_original(r)]
    if len(found) > 1:
        log.warning("identity %s has %d finished runs (%s); using the newest, %s", identity,
                    len(found), ", ".join(r.info.run_id for r in found), found[0].info.run_id)
    return found[0] if found else None


def is_alive(run, now: float | None = None) -> bool:
    """A RUNNING run whose trainer sent a heartbeat within STALE_SECONDS."""
    if run.info.status != "RUNNING":
        return False
    beat = float(run.data.tags.get(HEARTBEAT_TAG, (run.info.start_time or 0) / 1000))
    return (now or time.time()) - beat < STALE_SECONDS


def find_active(client: MlflowClient, identity: str, exclude_run: str | None = None,
                exclude_parent: str | None = None) -> list:
    """Originals of this identity training right now, oldest first (the first one trains)."""
    runs = [r for r in search_by_tag(client, IDENTITY_TAG, identity, "attributes.status = 'RUNNING'")
            if is_original(r) and is_alive(r) and r.info.run_id != exclude_run
            and (exclude_parent is None or r.data.tags.get(SWEEP_RUN_TAG) != exclude_parent)]
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def heartbeat(client: MlflowClient, run_id: str) -> None:
    log_batch(client, run_id, tags={HEARTBEAT_TAG: str(int(time.time()))}, attempts=2)


def wait_for_twin(client: MlflowClient, run_id: str, identity: str):
    """Called by a trial before it trains. Returns a FINISHED original of this identity to link
    to (another sweep trained it meanwhile, or is training it and started first), or None when
    this run should train. Waits while an earlier twin is alive."""
    me = retrying(lambda: client.get_run(run_id), "get run")
    mine = (me.info.start_time or 0, run_id)
    while True:
        # Active twins first, finished ones second: a twin that finishes between the two
        # searches is then seen as finished, not missed by both.
        first = [r for r in find_active(client, identity, exclude_run=run_id)
                 if (r.info.start_time or 0, r.info.run_id) < mine]
        done = find_original(client, identity)
        if done is not None and done.info.run_id != run_id:
            return done
        if not first:
            return None
        log.info("identity %s is being trained by run %s (sweep %s); waiting for it", identity,
                 first[0].info.run_id, first[0].data.tags.get(SWEEP_TAG))
        heartbeat(client, run_id)
        time.sleep(POLL_SECONDS)


def create_link(client: MlflowClient, experiment: str, parent_run_id: str, trial_name: str,
                sweep_name: str, original, params: dict[str, Any] | None = None) -> str:
    """A RUNNING child run of the sweep standing for `original`; call `copy_metrics` and
    `finish_link` next. `params` override the original's (e.g. eval settings computed now)."""
    exp_id = experiment_id(client, experiment)
    tags = {k: v for k, v in original.data.tags.items()
            if k.startswith(_COPIED_TAG_PREFIX) and k not in _NOT_COPIED}
    tags.update({TRIAL_TAG: trial_name, ROLE_TAG: "trial", SWEEP_TAG: sweep_name,
                 MLFLOW_RUN_NAME: trial_name, SWEEP_RUN_TAG: parent_run_id,
                 REUSED_FROM_TAG: original.info.run_id,
                 REUSED_EXPERIMENT_TAG: original.info.experiment_id,
                 "mlflow.note.content": f"Reused: trained in run {original.info.run_id} "
                                        f"(experiment {original.info.experiment_id}); "
                                        "metrics copied from it."})
    run = retrying(lambda: client.create_run(exp_id, run_name=trial_name, tags=tags), "create link run")
    merged = {**original.data.params, "sweep": sweep_name, **(params or {})}
    log_batch(client, run.info.run_id, params=merged)
    return run.info.run_id


def copy_metrics(client: MlflowClient, source_run_id: str, dest_run_id: str,
                 keys: list[str] | None = None) -> int:
    """Copy the full history of each metric (all of them by default); returns values copied."""
    source = retrying(lambda: client.get_run(source_run_id), "get run")
    batch = []
    for key in keys if keys is not None else source.data.metrics:
        history = retrying(lambda: client.get_metric_history(source_run_id, key), "history")
        batch += [Metric(m.key, m.value, m.timestamp, m.step) for m in history]
    log_batch(client, dest_run_id, metrics=batch)
    return len(batch)


def copy_artifacts(client: MlflowClient, source_run_id: str, dest_run_id: str,
                   skip: list[str] = ()) -> None:
    """Copy the original's artifacts (plots, sample grids, attention_pca/components.pt that a
    stage-2 sweep reads from this sweep's trial), except the top-level folders in `skip`
    (evaluations recomputed for the link)."""
    with tempfile.TemporaryDirectory(prefix="ditsweep-link-") as d:
        for item in retrying(lambda: client.list_artifacts(source_run_id), "list artifacts"):
            if item.path.split("/")[0] in skip:
                continue
            local = retrying(lambda: client.download_artifacts(source_run_id, item.path, d), "download")
            folder = os.path.dirname(item.path) or None
            if item.is_dir:
                retrying(lambda: client.log_artifacts(dest_run_id, local, item.path), "upload")
            else:
                retrying(lambda: client.log_artifact(dest_run_id, local, folder), "upload")


def finish_link(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    retrying(lambda: client.set_terminated(run_id, status=status), "end link run")


def link_to(client: MlflowClient, experiment: str, parent_run_id: str, trial_name: str,
            sweep_name: str, original, params: dict[str, Any] | None = None,
            finish: bool = True) -> str:
    """create_link + copy_metrics (+ finish_link)."""
    run_id = create_link(client, experiment, parent_run_id, trial_name, sweep_name, original, params)
    copy_metrics(client, original.info.run_id, run_id)
    copy_artifacts(client, original.info.run_id, run_id)
    if finish:
        finish_link(client, run_id)
    return run_id


def become_link(client: MlflowClient, run_id: str, original) -> None:
    """Turn a trial's own (untrained) run into a link to `original`: used by a trial that lost
    the race to a twin in another sweep. Its params are already the trial's own."""
    tags = {k: v for k, v in original.data.tags.items()
            if k.startswith(_COPIED_TAG_PREFIX) and k not in _NOT_COPIED}
    tags.update({REUSED_FROM_TAG: original.info.run_id,
                 REUSED_EXPERIMENT_TAG: original.info.experiment_id})
    log_batch(client, run_id, tags=tags)
    copy_metrics(client, original.info.run_id, run_id)
    copy_artifacts(client, original.info.run_id, run_id)
    finish_link(client, run_id)
