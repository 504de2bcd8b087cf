"""Reading a sweep from MLflow: its parent run, the trials it planned (`trials.json`) and its
child runs, as one table with a row per trial and the reason for every trial without values."""

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from ditsweep.tracking.mlflow_runs import ROLE_TAG, TRIAL_TAG, retrying
from ditsweep.tracking.tags import configuration, dataset_name, readable_layout

FAILURE_TAG = "ditsweep.failure"
CELL_KEYS = ["model", "variant", "config", "dataset", "n_train"]
CURVES = ("psnr_train_t", "psnr_test_t", "psnr_gap_t")


@dataclass(frozen=True)
class Metric:
    key: str    # the MLflow metric
    title: str
    digits: int


METRICS = (Metric("fid", "FID ↓", 4), Metric("psnr_gap_mean", "Mean PSNR gap (dB) ↓", 3))

# Table 1's dagger runs (Appendix A): random seed 143, another dataset shuffle, batch 128. Their
# trials are shown as the model "DiT-XS/1 †", in rows of their own.
DAGGER_SEED, DAGGER_BATCH, DAGGER = 143, 128, " †"


@dataclass
class SweepData:
    experiment: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    trials: pd.DataFrame                       # one row per planned (or found) trial
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)


def load_sweep(client: MlflowClient, experiment: str, parent_run_id: str | None = None,
               with_curves: bool = True) -> SweepData:
    exp = retrying(lambda: client.get_experiment_by_name(experiment), "get experiment")
    if exp is None:
        raise LookupError(f"no MLflow experiment named {experiment!r}")
    parent = (retrying(lambda: client.get_run(parent_run_id), "get sweep run") if parent_run_id
              else _newest_sweep_run(client, exp))
    planned = _planned_trials(client, parent.info.run_id)
    # Deleted runs too, so that a deleted trial says so instead of looking as if it never ran.
    children = _search(client, exp.experiment_id,
                       f"tags.`ditsweep.sweep_run_id` = '{parent.info.run_id}'")
    trials = _trial_frame(planned, children)
    sweep = parent.data.tags.get("ditsweep.sweep", parent.info.run_name or "")
    data = SweepData(experiment, exp.experiment_id, parent.info.run_id, sweep, trials)
    if with_curves:
        data.curves = _curves(client, trials)
    return data


def _newest_sweep_run(client: MlflowClient, exp):
    runs = retrying(lambda: client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'",
                                               max_results=1,
                                               order_by=["attributes.start_time DESC"]), "search")
    if not runs:
        raise LookupError(f"experiment {exp.name!r} has no sweep run (tag {ROLE_TAG}=sweep); "
                          "was it made by `python -m ditsweep.run`?")
    return runs[0]


def _search(client: MlflowClient, exp_id: str, query: str) -> list:
    runs, token = [], None
    while True:
        page = retrying(lambda: client.search_runs([exp_id], query, ViewType.ALL, max_results=1000,
                                                   page_token=token), "search runs")
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _planned_trials(client: MlflowClient, run_id: str) -> list[dict]:
    """The parent's trials.json; empty for a sweep that predates it (then the runs are all)."""
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(run_id, "trials.json", d)
        except Exception:  # MLflow raises several types for a missing artifact
            return []
        return json.loads(Path(path).read_text())


def _trial_frame(planned: list[dict], runs: list) -> pd.DataFrame:
    """Planned trials joined with their runs by trial name; runs without a plan are kept too."""
    by_name: dict[str, object] = {}
    for run in sorted(runs, key=_run_preference):
        by_name.setdefault(run.data.tags.get(TRIAL_TAG) or run.info.run_name, run)
    names = [p["trial"] for p in planned] + sorted(set(by_name) - {p["trial"] for p in planned})
    plan = {p["trial"]: p for p in planned}
    rows = [_trial_row(name, plan.get(name, {}), by_name.get(name)) for name in names]
    columns = ["trial", "run_id", "model", "arch", "variant", "layout", "layout_shown", "config",
               "dataset", "dataset_uri", "n_train", "seed", "status", "reason", "loss",
               *[m.key for m in METRICS]]
    return pd.DataFrame(rows, columns=columns)


def _run_preference(run) -> tuple:
    # A trial with several runs (a deleted one and its rerun): prefer a live, finished, new one.
    return (run.info.lifecycle_stage == "deleted", run.info.status != "FINISHED",
            -(run.info.start_time or 0))


def _trial_row(name: str, plan: dict, run) -> dict:
    params = run.data.params if run else {}
    get = lambda key, default="": params.get(key, plan.get(key, default))  # noqa: E731
    arch, layout = str(get("arch", "dit")), str(get("layout", "-"))
    status, reason = _status(run)
    metrics = run.data.metrics if run else {}
    seed = int(get("seed", 0))
    dagger = seed == DAGGER_SEED and int(get("train.batch_size", DAGGER_BATCH)) == DAGGER_BATCH
    # celeba32-shuffle1 is celeba32 packed in another order: the same cell (replicates of it)
    dataset = re.sub(r"[-_]shuffle\d+$", "", dataset_name(str(get("dataset"))))
    return {
        "trial": name, "run_id": run.info.run_id if run else "",
        "model": str(get("model")) + (DAGGER if dagger else ""), "arch": arch,
        "variant": str(get("variant", "standard")),
        "layout": layout, "layout_shown": readable_layout(layout, arch),
        "config": configuration(layout, arch), "dataset": dataset,
        "dataset_uri": str(get("dataset")), "n_train": int(get("n_train", 0)),
        "seed": seed, "status": status, "reason": reason,
        "loss": metrics.get("loss", math.nan),
        # Only a finished trial's numbers count: a failed one may have logged partial values.
        **{m.key: metrics.get(m.key, math.nan) if status == "finished" else math.nan
           for m in METRICS},
    }


def _status(run) -> tuple[str, str]:
    if run is None:
        return "not run", "not run (no MLflow run: the trial never started)"
    if run.info.lifecycle_stage == "deleted":
        return "deleted", "deleted: its MLflow run was deleted"
    status = run.info.status
    if status == "FINISHED":
        return "finished", ""
    if status == "FAILED":
        why = run.data.tags.get(FAILURE_TAG) or "no reason recorded; see the Ray Tune trial log"
        return "failed", f"failed: {why}"
    if status == "KILLED":
        return "killed", "killed before it finished"
    return "running", f"unfinished (run status {status})"


def _curves(client: MlflowClient, trials: pd.DataFrame) -> pd.DataFrame:
    """The per-timestep PSNR curves of the finished trials, one row per (trial, curve, t)."""
    rows = []
    for trial in trials[trials.status == "finished"].itertuples():
        for key in CURVES:
            history = retrying(lambda: client.get_metric_history(trial.run_id, key), "history")
            rows += [{"trial": trial.trial, "curve": key, "t": m.step, "value": m.value}
                     for m in history]
    curves = pd.DataFrame(rows, columns=["trial", "curve", "t", "value"])
    return curves.merge(trials[["trial", *CELL_KEYS]], on="trial")
