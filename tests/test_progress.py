"""The progress view with hundreds of trials: on a terminal the summary and the trials that matter
fit the screen; in a log only status changes and a periodic summary are printed; a fused group's
members are trials of their own. Driven through Tune's callback hooks with Tune's own Trial
objects and a clock the test moves."""

import io
import re

from ray.tune.experiment import Trial
from rich.console import Console

from ditsweep.sweep.progress import SweepProgress

STEPS = 100


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sweep(n: int, terminal: bool, height: int = 40, width: int = 100, log_seconds: float = 30.0):
    """A SweepProgress of n trials set up as Tune sets it up, its Tune trials, clock and output."""
    clock, out = Clock(), io.StringIO()
    names = [f"{i:03d}_DiT-T_1-global-N10-s{i}" for i in range(n)]
    console = Console(file=out, width=width, height=height, force_terminal=terminal)
    progress = SweepProgress({name: STEPS for name in names}, log_seconds=log_seconds,
                             console=console, clock=clock)
    progress.setup()
    trials = [Trial("ditsweep", config={"trial_config": {"trial": name}}, stub=True) for name in names]
    return progress, trials, clock, out


def report(progress, trials, trial, result: dict) -> None:
    progress.on_trial_result(0, trials, trial, result)


def finish(progress, trials, trial, result: dict) -> None:
    """A trial's final result, then Tune's completion hook (which reads trial.last_result)."""
    trial.run_metadata.last_result = result
    progress.on_trial_result(0, trials, trial, result)
    progress.on_trial_complete(0, trials, trial)


def run_300(progress, trials, clock) -> None:
    """300 trials: 60 ended (one failed), 40 running at various steps, 2 evaluating, the rest
    pending; the clock moves 1 s per round of results."""
    for trial in trials[:100]:
        progress.on_trial_start(0, trials, trial)
    for step in range(10, 60, 10):
        clock.now += 1.0
        for trial in trials[:100]:
            report(progress, trials, trial, {"step": step, "loss": 1.0 / step})
    clock.now += 1.0
    for trial in trials[:59]:
        finish(progress, trials, trial, {"step": STEPS, "loss": 0.01, "mlflow_run_id": "r"})
    finish(progress, trials, trials[59], {"step": 30, "ditsweep_failure": "diverged at step 30"})
    report(progress, trials, trials[60], {"step": STEPS, "loss": 0.02})  # waits for its evaluations
    report(progress, trials, trials[61], {"step": STEPS, "loss": 0.02})


def test_three_hundred_trials_fit_a_40_line_terminal_with_summary_and_active_trials():
    progress, trials, clock, _ = sweep(300, terminal=True)
    assert progress.live is not None  # a terminal: redrawn in place
    run_300(progress, trials, clock)
    progress.live.stop()

    frame = io.StringIO()
    Console(file=frame, width=100, height=40, force_terminal=True).print(progress.render(40))
    lines = frame.getvalue().splitlines()
    assert len(lines) <= 40, len(lines)
    text = re.sub(r"\x1b\[[0-9;]*m", "", frame.getvalue())
    assert "sweep: 60/300 trials ended (38 running, 2 evaluating, 200 pending, 59 done, 1 failed)" in text
    # 5 rounds of 100 trials x 10 steps, then 59 + 2 trials 50 steps further, in 6 s; 60 trials
    # ended in the 6 s since the first started
    assert re.search(r"1341\.7 trial-steps/s, 600\.0 trials/min; 6s elapsed, ETA \d+s", text), text
    rows = [line for line in text.splitlines() if re.match(r"\d{3}_DiT", line)]
    assert len(rows) == 40 - 2 - 3  # summary, table header and rule, caption
    assert not any(" pending " in row for row in rows)  # pending trials are only counted
    statuses = [row.split()[1] for row in rows]
    assert statuses.count("failed") == 1 and statuses.count("evaluating") == 2
    assert re.search(r"not shown: \d+ running, 200 pending", text)
    # the rows and the screen never wrap, even with long names and a narrow screen
    for width in (60, 80, 200):
        frame = io.StringIO()
        Console(file=frame, width=width, height=40).print(progress.render(40))
        assert len(frame.getvalue().splitlines()) <= 40 and max(map(len, frame.getvalue().splitlines())) <= width

    # a minute later the ended trials leave the screen to the running ones
    clock.now += 61
    assert {v.status for v in progress.shown(35)} == {"running", "evaluating"}
    assert len(progress.shown(35)) == 35


def test_a_small_sweep_shows_every_trial():
    progress, trials, _, _ = sweep(4, terminal=True)
    progress.on_trial_start(0, trials, trials[0])
    progress.live.stop()
    assert [v.status for v in progress.shown(35)] == ["running", "pending", "pending", "pending"]


def test_a_log_gets_status_changes_and_a_periodic_summary_only():
    progress, trials, clock, out = sweep(300, terminal=False, log_seconds=30.0)
    assert progress.live is None
    run_300(progress, trials, clock)
    for _ in range(10):  # 40 s more of steps from the running trials, no status change
        clock.now += 4.0
        for trial in trials[62:100]:
            report(progress, trials, trial, {"step": 60 + int(clock.now) % 30, "loss": 0.1})
        progress.on_step_end(0, trials)
    progress.on_experiment_end(trials)

    lines = out.getvalue().splitlines()
    changes = [line for line in lines if re.match(r"\[\d+s\] \d{3}_DiT\S+: ", line)]
    summaries = [line for line in lines if re.match(r"\[\d+s\] sweep: ", line)]
    assert len(changes) + len(summaries) == len(lines), lines
    # one line per status change: 100 started, 59 done, 1 failed, 2 evaluating
    assert len(changes) == 100 + 59 + 1 + 2
    assert sum(": running, step 0/100" in line for line in changes) == 100
    assert sum(": done, step 100/100, loss 0.0100" in line for line in changes) == 59
    assert any("059_DiT-T_1-global-N10-s59: failed, step 30/100" in line for line in changes)
    assert sum(": evaluating, step 100/100" in line for line in changes) == 2
    # the summary once in 30 s (the run took 46 s) and at the end
    assert len(summaries) == 2, summaries
    assert "sweep: 60/300 trials ended (38 running, 2 evaluating, 200 pending, 59 done, 1 failed)" in summaries[-1]
    assert "trial-steps/s" in summaries[-1] and "ETA" in summaries[-1]


def test_each_member_of_a_fused_group_is_a_trial_of_its_own():
    clock, out = Clock(), io.StringIO()
    names = ["a", "b", "c", "d", "e"]
    progress = SweepProgress({n: STEPS for n in names}, log_seconds=1e9, clock=clock,
                             console=Console(file=out, width=100, height=40, force_terminal=False))
    progress.setup()
    group = Trial("ditsweep", stub=True, config={"trial_config": {
        "trial": "a+3", "members": [{"trial": n} for n in names[:4]]}})
    alone = Trial("ditsweep", stub=True, config={"trial_config": {"trial": "e"}})
    trials = [group, alone]
    progress.on_trial_start(0, trials, group)
    assert progress.counts() == {"running": 4, "pending": 1}

    clock.now += 2
    report(progress, trials, group, {"step": 20, "members": {
        "a": {"step": 20, "loss": 0.5}, "b": {"step": 20, "loss": 0.4},
        "c": {"step": 20, "ditsweep_failure": "diverged", "ditsweep_failure_kind": "deterministic"},
        "d": {"step": 20, "loss": 0.3}}})
    clock.now += 2
    report(progress, trials, group, {"step": 40, "members": {
        "a": {"step": STEPS, "loss": 0.1, "mlflow_run_id": "ra"},  # finished and evaluated
        "b": {"step": 40, "loss": 0.2}, "c": {"step": 20, "ditsweep_failure": "diverged"},
        "d": {"step": STEPS, "loss": 0.1}}})  # waits for its final evaluation
    views = progress.views
    assert [views[n].status for n in names] == ["done", "running", "failed", "evaluating", "pending"]
    assert views["b"].step == 40 and views["b"].loss == 0.2 and views["b"].rate == 10.0
    assert progress.counts() == {"done": 1, "running": 1, "failed": 1, "evaluating": 1, "pending": 1}
    assert progress.throughput()[0] == (4 * 20 + 80 + 20 + 80) / 4  # trial-steps in 4 s

    # the group ends: its members are done (c stays failed); the single trial still runs
    group.run_metadata.last_result = {"step": STEPS, "members": {
        "a": {"step": STEPS, "mlflow_run_id": "ra"}, "b": {"step": STEPS, "mlflow_run_id": "rb"},
        "c": {"step": 20, "ditsweep_failure": "diverged"}, "d": {"step": STEPS, "mlflow_run_id": "rd"}}}
    progress.on_trial_complete(0, trials, group)
    progress.on_trial_start(0, trials, alone)
    assert [views[n].status for n in names] == ["done", "done", "failed", "done", "running"]
    assert "sweep: 4/5 trials ended (1 running, 3 done, 1 failed)" in progress.summary()[0]
    logged = out.getvalue()
    assert "c: failed, step 20/100" in logged and "d: evaluating, step 100/100" in logged
