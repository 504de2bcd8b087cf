"""Failure classes (ditsweep/failures.py): what is retried, what ends a trial at once, and which
trials fail the same way. The end-to-end checks live in test_fault_tolerance.py (a diverging
trial runs once; a killed worker resumes) and test_eval_deadline.py (a hung evaluation)."""

import pytest
import torch

from ditsweep.data.errors import DataError
from ditsweep.failures import (DETERMINISTIC, TRANSIENT, classify, same_failures, summary_lines,
                               trial_status)
from ditsweep.spec import SpecError
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
    status, reason = trial_status(None, ConnectionError("refused"))
    assert status.startswith("ERROR (transient, retries used up)") and reason == "ConnectionError: refused"
