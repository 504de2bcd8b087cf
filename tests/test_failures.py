"""Failure classes (ditsweep/train/failures.py, ditsweep/sweep/failure_summary.py): what is
retried, what ends a trial at once, and which trials fail the same way. The end-to-end checks
live in test_fault_tolerance.py (a diverging trial runs once; a killed worker resumes) and
test_eval_deadline.py (a hung evaluation)."""

import pytest
import torch

from ditsweep.config import SpecError
from ditsweep.data.errors import DataError
from ditsweep.sweep.failure_summary import same_failures, summary_lines, trial_status
from ditsweep.train.failures import DETERMINISTIC, TRANSIENT, classify
from ditsweep.train.loop import TrainingDiverged


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("did not raise")


@pytest.mark.parametrize("exc, kind, name", [
    (TrainingDiverged("training diverged: loss is nan at step 3"), DETERMINISTIC, "TrainingDiverged"),
    (DataError("s3://b/celeba32/shard-000003.tar: sha256 mismatch"), DETERMINISTIC, "DataError"),
    (SpecError("sweep.yaml: grid.model: unknown preset 'DiT-Q'"), DETERMINISTIC, "SpecError"),
    (_raised(lambda: torch.zeros(2, 3) @ torch.zeros(2, 3)), DETERMINISTIC, "RuntimeError"),
    (_raised(lambda: torch.nn.Linear(3, 3)(torch.zeros(2, 3, dtype=torch.float64))), DETERMINISTIC,
     "RuntimeError"),
    (_raised(lambda: torch.nn.Linear(3, 3).load_state_dict({"weight": torch.zeros(4, 3),
                                                            "bias": torch.zeros(3)})),
     DETERMINISTIC, "RuntimeError"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), TRANSIENT, "OutOfMemoryError"),
    (ConnectionError("Connection refused"), TRANSIENT, "ConnectionError"),
    (RuntimeError("NCCL watchdog: something else"), TRANSIENT, "RuntimeError"),  # unknown: retried
])
def test_failures_are_classified(exc, kind, name):
    failure = classify(exc)
    assert (failure.kind, failure.type) == (kind, name)
    if name == "OutOfMemoryError":
        assert "retried from the last checkpoint" in failure.note


def test_a_ray_wrapped_exception_keeps_its_class():
    # Ray re-raises a remote exception as a subclass of both RayTaskError and the cause's class.
    from ray.exceptions import RayTaskError
    wrapped = RayTaskError("train_trial", "Traceback ...", TrainingDiverged("loss is nan")).as_instanceof_cause()
    assert classify(wrapped).kind == DETERMINISTIC and classify(wrapped).type == "TrainingDiverged"


def test_trials_failing_the_same_way_are_flagged():
    reasons = {
        "001_DiT-T-1_lr1e+06_N10_s0": "TrainingDiverged: training diverged: loss is nan at step 3 "
                                      "(trial 001_DiT-T-1_lr1e+06_N10_s0, lr 1000000.0)",
        "003_DiT-T-1_lr1e+06_N10_s1": "TrainingDiverged: training diverged: loss is inf at step 12 "
                                      "(trial 003_DiT-T-1_lr1e+06_N10_s1, lr 1000000.0)",
        "004_DiT-T-1_N10_s0": "DataError: /data/x/shard-000001.tar: sha256 mismatch",
    }
    groups = same_failures(reasons)
    assert [trials for _, trials in groups] == [["001_DiT-T-1_lr1e+06_N10_s0", "003_DiT-T-1_lr1e+06_N10_s1"]]
    (line,) = summary_lines(reasons)
    assert line.startswith("same failure in 2 trials (001_") and "TrainingDiverged" in line
    assert summary_lines({"a": "DataError: x", "b": "ValueError: x"}) == []  # other type: not the same


def test_trial_status_reads_the_failure_result():
    status, reason = trial_status({"ditsweep_failure": "DataError: bad shard",
                                   "ditsweep_failure_kind": "deterministic"}, None)
    assert status.startswith("FAILED (deterministic, not retried)") and reason == "DataError: bad shard"
    assert trial_status({"loss": 0.1}, None) == ("done", None)
    assert trial_status({"step": 20, "loss": 0.1}, None, steps=20) == ("done", None)
    # a trial Tune never started, or stopped with the sweep, is not "done"
    assert trial_status({}, None, steps=20)[0] == "not run"
    assert trial_status({"step": 10}, None, steps=20) == ("interrupted at step 10", "stopped at step 10 of 20")
    status, reason = trial_status(None, ConnectionError("refused"))
    assert status.startswith("ERROR (transient, retries used up)") and reason == "ConnectionError: refused"


def _trial_config(tmp_path, **overrides) -> dict:
    from conftest import tiny_sweep

    from ditsweep.config import Sweep, expand
    sweep = tiny_sweep(name="policy", tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                       eval={"psnr_gap": {"enabled": False}, "attention": {"enabled": False},
                             "samples": {"enabled": False}}, **overrides)
    from ditsweep.tracking import start_sweep_run
    trial = expand(Sweep.model_validate(sweep), check_data=False)[0]
    parent = start_sweep_run(trial.tracking_uri, trial.experiment, "policy", {})  # retries reattach
    return trial.model_copy(update={"parent_run_id": parent}).model_dump()


def _the_run(config: dict):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(config["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("policy").experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("ditsweep.role") == "trial"]
    return run


def test_the_trainable_retries_a_transient_failure_with_a_note_until_the_last_attempt(tmp_path, monkeypatch):
    """The policy in train_trial, called outside Tune (tune.report is then a no-op): a CUDA OOM,
    injected into the training step since this machine has no GPU, is re-raised for Tune to retry."""
    from ditsweep.train import trainable
    from ditsweep.train.loop import Trainer

    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    config = {trainable.TRIAL_KEY: _trial_config(tmp_path, resources={"max_failures": 1})}
    with pytest.raises(torch.OutOfMemoryError):
        trainable.train_trial(config)  # attempt 1 of 2: Tune would retry it
    run = _the_run(config[trainable.TRIAL_KEY])
    assert run.info.status == "RUNNING" and run.data.tags["ditsweep.attempts"] == "1"
    assert "retried from the last checkpoint" in run.data.tags["ditsweep.retry_note"]
    assert "attempt 1 at step 0: OutOfMemoryError" in run.data.tags["ditsweep.retry_note"]
    with pytest.raises(torch.OutOfMemoryError):
        trainable.train_trial(config)  # attempt 2: the last one Tune allows
    run = _the_run(config[trainable.TRIAL_KEY])
    assert run.info.status == "FAILED" and run.data.tags["ditsweep.attempts"] == "2"
    assert run.data.tags["ditsweep.failure_kind"] == "transient"


def test_the_trainable_ends_a_deterministic_failure_without_raising(tmp_path):
    from ditsweep.train import trainable
    config = {trainable.TRIAL_KEY: _trial_config(tmp_path, resources={"max_failures": 3})}
    config[trainable.TRIAL_KEY]["dataset"] = str(tmp_path / "no-such-dataset")  # DataError on load
    trainable.train_trial(config)  # returns: Tune sees a finished trial and does not restart it
    run = _the_run(config[trainable.TRIAL_KEY])
    assert run.info.status == "FAILED" and run.data.tags["ditsweep.attempts"] == "1"
    assert run.data.tags["ditsweep.failure"].startswith("DataError: ")
    assert run.data.tags["ditsweep.failure_kind"] == "deterministic"
