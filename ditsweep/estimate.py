"""What a sweep will cost: trial count, resources and GPU-hours, for `--dry-run`.

`trial_gpu_hours` is the one place that turns a trial into compute time; `plan_summary` prints
the sweep's total.
"""

from ditsweep.spec import Sweep, TrialConfig


def trial_gpu_hours(sweep: Sweep, trial: TrialConfig) -> float | None:
    """Device-hours (GPU, or CPU when the sweep uses none) one trial's training takes, or None
    when no speed is known."""
    r = sweep.resources
    if not r.steps_per_second:
        return None
    return trial.train.steps / r.steps_per_second / 3600 * (r.gpus_per_trial or r.cpus_per_trial)


def plan_summary(sweep: Sweep, trials: list[TrialConfig]) -> str:
    """Trial count, resources, and the compute the sweep will take at the YAML's steps/s."""
    r = sweep.resources
    lines = [f"{len(trials)} trials x {sweep.train.steps} steps; per trial {r.cpus_per_trial:g} CPU, "
             f"{r.gpus_per_trial:g} GPU; at most "
             f"{r.max_concurrent_trials or 'as many as fit'} at once; {r.max_failures} restarts per trial"]
    if r.steps_per_second:
        hours = len(trials) * sweep.train.steps / r.steps_per_second / 3600
        kind = "GPU" if r.gpus_per_trial else "CPU"
        busy = hours * (r.gpus_per_trial or r.cpus_per_trial)
        lines.append(f"estimate at {r.steps_per_second:g} steps/s per trial: {hours:,.1f} trial-hours "
                     f"= {busy:,.1f} {kind}-hours of training (evaluation not included)")
    else:
        lines.append("no estimate: set resources.steps_per_second to the measured training speed")
    return "\n".join(lines)
