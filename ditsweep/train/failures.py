"""Failure classes: which trial failures are worth a retry (judged inside the trial; the
sweep's summary of them is ditsweep/sweep/failure_summary.py).

    deterministic  divergence (NaN/inf loss), DataError (checksum, truncated shard, undecodable
                   image), an invalid config, a shape or dtype error: a retry from the checkpoint
                   would fail again identically, so the trial ends at once.
    transient      a dead worker or node, a preempted pod, a lost connection, CUDA out of memory
                   (with a note), and anything not recognised: retried from the last checkpoint,
                   `resources.max_failures` times, as Tune does for every failure.

Tune has no per-exception policy, so the trainable applies this one itself (train_trial): it
re-raises a transient exception for Tune to retry, and ends itself with a `ditsweep_failure`
result on a deterministic one. Dead processes never reach Python code: Tune retries them.

Exceptions are matched by class *name* along the MRO, so this module imports nothing from the
layers it judges, and an exception that Ray re-raised as `RayTaskError(TrainingDiverged)` is
still recognised.
"""

import re
from dataclasses import dataclass

from ditsweep.data.errors import scrub

DETERMINISTIC, TRANSIENT = "deterministic", "transient"
ATTEMPTS_TAG = "ditsweep.attempts"      # how many times the trial started (1 = never retried)
FAILURE_TAG = "ditsweep.failure"        # the reason a trial ended
KIND_TAG = "ditsweep.failure_kind"      # deterministic | transient
NOTE_TAG = "ditsweep.retry_note"        # why the last attempt was retried (e.g. CUDA OOM)
RESULT_KEY = "ditsweep_failure"         # in the trial's final Tune result

_DETERMINISTIC_TYPES = {
    "TrainingDiverged",                             # ditsweep.train.loop
    "DataError",                                    # ditsweep.data.errors
    "SpecError", "ValidationError", "LayoutError",  # invalid config (pydantic, layouts)
}
_TRANSIENT_TYPES = {
    "OutOfMemoryError",                             # torch.OutOfMemoryError (CUDA)
    "ConnectionError", "TimeoutError", "MlflowUnavailable", "EndpointConnectionError",
    "ReadTimeoutError", "ConnectTimeoutError", "RayActorError", "ActorDiedError",
    "NodeDiedError", "WorkerCrashedError", "OwnerDiedError", "ObjectLostError",
}
# torch raises plain RuntimeErrors for shape and dtype mismatches; these messages are its own.
_SHAPE_DTYPE = re.compile(
    r"shapes cannot be multiplied|size mismatch|must match the size|is invalid for input of size|"
    r"must have the same dtype|expected scalar type|Expected .* dtype|dtype mismatch|"
    r"Expected all tensors to be on the same device|Given groups=.*expected input|"
    r"expected input\[.*to have \d+ channels|shape .* doesn't match")


@dataclass
class Failure:
    kind: str       # DETERMINISTIC or TRANSIENT
    type: str       # exception class name, e.g. "TrainingDiverged"
    message: str    # first line of the message, scrubbed of credentials
    note: str = ""  # for the run, e.g. why an OOM is retried

    @property
    def transient(self) -> bool:
        return self.kind == TRANSIENT

    @property
    def reason(self) -> str:
        return f"{self.type}: {self.message}"


def classify(exc: BaseException) -> Failure:
    """The failure class of an exception raised inside a trial."""
    names = [c.__name__ for c in type(exc).__mro__]
    message = _first_line(exc)
    name = next((n for n in names if n in _DETERMINISTIC_TYPES | _TRANSIENT_TYPES), names[0])
    if any(n in _DETERMINISTIC_TYPES for n in names):
        return Failure(DETERMINISTIC, name, message)
    if "OutOfMemoryError" in names or "CUDA out of memory" in message:
        return Failure(TRANSIENT, "OutOfMemoryError", message,
                       note="CUDA out of memory: retried from the last checkpoint; if it repeats, "
                            "lower train.batch_size or put fewer trials on a GPU "
                            "(resources.gpus_per_trial)")
    if any(n in _TRANSIENT_TYPES for n in names):
        return Failure(TRANSIENT, name, message)
    if "RuntimeError" in names and _SHAPE_DTYPE.search(str(exc)):
        return Failure(DETERMINISTIC, names[0], message)
    return Failure(TRANSIENT, names[0], message, note="unclassified failure: retried")


def count_attempt(run) -> int:
    """Increment and return the trial's attempt counter, kept as a tag on its MLflow run (a
    retried trial reattaches to the same run, so the tag survives restarts)."""
    from ditsweep.tracking.mlflow_runs import retrying
    tags = retrying(lambda: run.client.get_run(run.run_id), "get run").data.tags
    attempt = int(tags.get(ATTEMPTS_TAG, "0")) + 1
    run.set_tags({ATTEMPTS_TAG: str(attempt)})
    return attempt


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # Ray's RayTaskError text starts with a traceback header; the cause is the last line.
    if lines and lines[0].startswith(("ray::", "Traceback")):
        lines = lines[-1:]
    return scrub(lines[0] if lines else type(exc).__name__)[:500]
