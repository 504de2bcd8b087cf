"""The failure summary of a finished sweep: each trial's status line, and the trials that failed
the same way. The failure classes themselves are decided inside the trials
(ditsweep/train/failures.py).
"""

import re

from ditsweep.train.failures import DETERMINISTIC, RESULT_KEY, classify


def signature(reason: str) -> str:
    """What makes two failures "the same": type and message with trial names, numbers and
    hex ids masked (two diverging trials differ in step and learning rate, not in cause)."""
    text = re.sub(r"\b\d{3}_[^\s,;)]+", "TRIAL", reason)        # trial names: 001_DiT-T-1_...
    text = re.sub(r"0x[0-9a-fA-F]+|\b[0-9a-f]{16,}\b", "#", text)
    return re.sub(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|\b(nan|inf)\b", "#", text)


def same_failures(reasons: dict[str, str]) -> list[tuple[str, list[str]]]:
    """[(signature, [trials...])] for every failure shared by two trials or more."""
    groups: dict[str, list[str]] = {}
    for trial, reason in sorted(reasons.items()):
        groups.setdefault(signature(reason), []).append(trial)
    return [(sig, trials) for sig, trials in groups.items() if len(trials) > 1]


def trial_status(metrics: dict | None, error: BaseException | None,
                 steps: int | None = None) -> tuple[str, str | None]:
    """(status for the summary table, failure reason or None) of an ended Tune trial of `steps`
    training steps (None: not checked). A trial without error that did not reach its last step
    was never started or was stopped (the sweep interrupted): not "done"."""
    metrics = metrics or {}
    if metrics.get(RESULT_KEY):
        return f"FAILED ({metrics.get('ditsweep_failure_kind', DETERMINISTIC)}, not retried): " \
               f"{metrics[RESULT_KEY]}"[:200], metrics[RESULT_KEY]
    if error is None:
        step = metrics.get("step")
        if steps is not None and step is None:
            return "not run", "never started (the sweep was stopped before it)"
        if steps is not None and step < steps:
            return f"interrupted at step {step}", f"stopped at step {step} of {steps}"
        return "done", None
    cause = getattr(error, "cause", None) or error
    failure = classify(cause)
    return f"ERROR ({failure.kind}, retries used up): {failure.reason}"[:200], failure.reason


def summary_lines(reasons: dict[str, str]) -> list[str]:
    """Lines for the end of a sweep that flag trials failing the same way."""
    lines = []
    for sig, trials in same_failures(reasons):
        lines.append(f"same failure in {len(trials)} trials ({', '.join(trials)}): {sig[:200]}")
    return lines
