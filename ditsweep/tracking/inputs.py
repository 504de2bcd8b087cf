"""Inputs of a sweep that another sweep's trial made (e.g. stage 1's PCA components): found by
(experiment, trial name, artifact path) in MLflow, checked before a sweep starts, fetched by the
trial that needs them."""

import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from ditsweep.tracking.mlflow_runs import TRIAL_TAG, retrying


class MissingInput(LookupError):
    """An input artifact does not exist (yet); the message names experiment, trial and artifact."""


def _describe(ref) -> str:
    return f"artifact {ref.artifact!r} of trial {ref.trial!r} in MLflow experiment {ref.experiment!r}"


def find_input(tracking_uri: str, ref) -> tuple[str, str]:
    """(run id, artifact path) of a finished trial's artifact; MissingInput when there is none."""
    client = MlflowClient(tracking_uri)
    exp = retrying(lambda: client.get_experiment_by_name(ref.experiment), "get experiment")
    if exp is None:
        raise MissingInput(f"{_describe(ref)}: the experiment does not exist; run stage 1 first")
    runs = retrying(lambda: client.search_runs(
        [exp.experiment_id], f"tags.`{TRIAL_TAG}` = '{ref.trial}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"]), "search runs")
    if not runs:
        raise MissingInput(f"{_describe(ref)}: no finished run of that trial")
    folder = ref.artifact.rpartition("/")[0]
    for run in runs:  # the newest finished run that has it
        listed = retrying(lambda: client.list_artifacts(run.info.run_id, folder or None), "list")
        if any(a.path == ref.artifact for a in listed):
            return run.info.run_id, ref.artifact
    raise MissingInput(f"{_describe(ref)}: the trial's run has no such artifact "
                       f"(run {runs[0].info.run_id})")


def check_inputs(tracking_uri: str, inputs: dict) -> list[str]:
    """The problems with a sweep's inputs, one message each (empty: all present)."""
    problems = []
    for role, ref in inputs.items():
        try:
            find_input(tracking_uri, ref)
        except MissingInput as e:
            problems.append(f"inputs.{role}: {e}")
    return problems


def fetch_input(tracking_uri: str, ref, directory: str | None = None) -> Path:
    """Download an input artifact; returns its local path."""
    run_id, artifact = find_input(tracking_uri, ref)
    directory = directory or tempfile.mkdtemp(prefix="ditsweep-input-")
    client = MlflowClient(tracking_uri)
    return Path(retrying(lambda: client.download_artifacts(run_id, artifact, directory), "download"))


def pca_components_for(cfg):
    """Stage 1's [blocks, K, N, N] components for a pca-attention trial (TrialConfig), else None."""
    if cfg.variant != "pca-attention":
        return None
    import torch

    path = fetch_input(cfg.tracking_uri, cfg.inputs["pca_components"])
    return torch.load(path, map_location="cpu", weights_only=True)["components"]
