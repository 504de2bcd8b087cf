"""What a researcher sees while a sweep runs: a summary and the trials that matter now.

A Tune callback in the driver collects, for every trial, its status, step / total, loss, steps/s
and ETA, and its evaluation jobs (queued, running, done) from the evaluation pool. A fused group
(one Tune trial training k trials, ditsweep/train/group_trainable.py) reports each member under
the result's "members" key; every member is a trial of its own here, in the rows and the counts.

On a terminal the view is redrawn in place: a summary (trials by status, throughput in
trial-steps/s and trials ended per minute, the sweep's ETA), then a table of the trials that are
running or changed status in the last minute, cut to the screen's height. A sweep small enough
to fit shows every trial. In a log (not a TTY: `ray job submit`, CI) it prints one line per
status change and the summary line every `log_seconds`, so a sweep of hundreds of trials logs a
few lines per trial, not a line per running trial every 30 s. Both show the evaluators the pool
replaced (a lost node, a hung job) and the jobs it retried. Tune's own reporter is only shown
with `--verbose`.
"""

import math
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import ray
from ray.tune import Callback
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

TRIAL_KEY = "trial_config"  # the Tune config's one key (ditsweep/train/trainable.py)
MEMBERS = "members"         # a fused group's members, in its config and results (train/fused.py)
FAILURE_KEY = "ditsweep_failure"  # a trial's final result when it failed (train/failures.py)
ACTIVE = ("running", "evaluating", "restarting", "restarted")
ENDED = ("done", "failed", "reused")
SUMMARY_ORDER = ("running", "evaluating", "restarting", "restarted", "pending", "done", "reused", "failed")
POLL_SECONDS = 2.0       # how often the evaluation pool is asked for its job counts
FAST_POLL_SECONDS = 0.3  # ... while a trial waits for its final evaluation to show up
REDRAW_SECONDS = 0.5     # the terminal view is redrawn at most this often (200 trials report a lot)
MIN_REDRAW_SECONDS = 0.1  # ... or this often when a status changed
LOG_HOLD_SECONDS = 5.0   # in a log, an evaluating/done line waits this long at most for the pool's counts
RECENT_SECONDS = 60.0    # an ended trial stays in the table this long
RATE_WINDOW_SECONDS = 60.0  # the sweep's throughput: trial-steps over this last stretch
TABLE_LINES = 3          # the table's lines besides its rows: header, rule, caption
OTHER_COLUMNS = 64       # characters the columns after the trial's name need, padding included


@dataclass
class TrialView:
    name: str
    total: int
    status: str = "pending"
    step: int = 0
    loss: float | None = None
    rate: float | None = None   # steps/s, smoothed
    jobs: dict = field(default_factory=dict)  # queued / running / done / failed
    changed: float = 0.0        # when the status last changed (the callback's clock)
    _last: tuple[float, int] | None = None    # (time, step) of the previous result

    def update(self, step: int, loss: float | None, now: float) -> None:
        if self._last and now <= self._last[0]:  # results that arrive together count as one
            self.step = step
        elif self._last and step > self._last[1]:
            rate = (step - self._last[1]) / (now - self._last[0])
            self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
        if not self._last or now > self._last[0]:
            self._last = (now, step)
        self.step = step
        self.loss = loss if loss is not None else self.loss

    def set_status(self, status: str, now: float) -> bool:
        """True if the status changed."""
        if status == self.status:
            return False
        self.status, self.changed = status, now
        return True

    @property
    def eta_seconds(self) -> float | None:
        if self.status in ENDED:
            return 0.0
        if not self.rate:
            return None
        return (self.total - self.step) / self.rate

    def evals(self, compact: bool = True) -> str:
        """queued/running/done evaluation jobs, and /failed (compact) or (N failed) if any."""
        j = self.jobs
        if not j:
            return "-"
        evals = f"{j.get('queued', 0)}/{j.get('running', 0)}/{j.get('done', 0)}"
        if j.get("failed"):
            evals += f"/{j['failed']}" if compact else f" ({j['failed']} failed)"
        return evals

    def cells(self) -> list[str]:
        return [self.name, self.status, f"{self.step}/{self.total}",
                "-" if self.loss is None else f"{self.loss:.4f}",
                "-" if not self.rate or self.status in ENDED else f"{self.rate:.1f}",
                _duration(self.eta_seconds), self.evals()]


HEADER = ["trial", "status", "step", "loss", "steps/s", "ETA", "evals q/r/d/f"]


def status_from(values: dict, total: int, current: str) -> str:
    """A trial's status after a result (a single trial's, or one member's entry in a group's)."""
    if values.get(FAILURE_KEY):
        return "failed"
    if values.get("reused_from"):  # linked to a twin another sweep trained (train/continuity.py)
        return "reused"
    if int(values.get("step", 0)) >= total:
        # the final result carries the run id; before it the trial waits for its evaluations
        return "done" if "mlflow_run_id" in values else "evaluating"
    return "running" if current == "pending" else current


class SweepProgress(Callback):
    """Tune callback drawing the sweep's progress (see the module docstring)."""

    def __init__(self, trials: dict[str, int], pool=None, log_seconds: float = 30.0,
                 console: Console | None = None, clock=time.monotonic):
        """`trials`: trial name -> total steps; `pool`: the evaluation pool's coordinator."""
        self.views = {name: TrialView(name, total) for name, total in trials.items()}
        self.pool = pool
        self.console = console
        self.live: Live | None = None
        self.log_seconds = log_seconds
        self.clock = clock
        self.start = clock()
        self.first_start: float | None = None  # when the first trial started (for trials/min)
        self._printed: dict[str, str] = {}     # trial -> the status its last log line showed
        self._last_log = self.start
        self._last_draw = -math.inf
        self._last_poll = -math.inf
        self._asked = None                     # the pool's status, on its way
        self._asked_at = -math.inf
        self._answered = -math.inf             # when the pool was asked for its last answer read
        self._ending = False
        self.pool_counts: dict = {}            # the pool's own counts (workers replaced, ...)
        self._printed_pool = ""                # the pool line a log printed last
        self._steps = 0                        # steps made by all trials, for the throughput
        self._history: deque = deque([(self.start, 0)])  # (time, _steps), one a second at most

    def __getstate__(self) -> dict:
        # Tune pickles its run config (callbacks included) into the experiment folder; the
        # console and the live view hold locks and are made again in setup().
        return {**self.__dict__, "console": None, "live": None, "_asked": None}

    # --- Tune's hooks -------------------------------------------------------------------------
    def setup(self, **info) -> None:
        self.console = self.console or Console(file=sys.stdout)
        if self.console.is_terminal:
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.first_start = self.first_start or self.clock()
        self._set(trial, "running")

    def on_trial_restore(self, iteration, trials, trial, **info) -> None:
        self._set(trial, "restarted")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._set(trial, "restarting")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        now, changed = self.clock(), False
        for view, values in self._entries(trial, result):
            step = int(values.get("step", view.step))
            self._steps += max(0, step - view.step)  # a trial resumed from a checkpoint goes back
            view.update(step, values.get("loss"), now)
            changed |= view.set_status(status_from(values, view.total, view.status), now)
        if changed:  # e.g. evaluating: show its final job now, not at the next poll
            self._poll_pool(force=True)
        self._refresh(force=changed)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        now = self.clock()
        for view, values in self._entries(trial, trial.last_result or {}):
            if view.status not in ENDED:
                view.set_status("failed" if values.get(FAILURE_KEY) or values is MISSING
                                else "reused" if values.get("reused_from") else "done", now)
        self._poll_pool(force=True)
        self._refresh(force=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._set(trial, "failed")

    def on_step_end(self, iteration, trials, **info) -> None:
        self._refresh()

    def on_experiment_end(self, trials, **info) -> None:
        self._poll_pool(force=True, wait=5.0)
        self._last_draw = -math.inf  # the last frame always shows
        self._ending = True          # a log prints the lines still held for the pool's counts
        self._refresh(force=True)
        if self.live:  # the summary table that follows closes the log
            self.live.stop()
        elif self._last_log < self.clock():  # unless _refresh just printed it
            self._log_summary(self.clock())

    # --- trials and their members -------------------------------------------------------------
    def _names(self, trial) -> list[str]:
        entry = trial.config.get(TRIAL_KEY, {})
        if MEMBERS in entry:
            return [m["trial"] for m in entry[MEMBERS]]
        return [entry.get("trial", str(trial))]

    def _entries(self, trial, result: dict) -> list[tuple[TrialView, dict]]:
        """(view, its values) for the trial or each member of a fused group; a member absent
        from the group's result gets MISSING."""
        names = [n for n in self._names(trial) if n in self.views]
        if MEMBERS not in result:
            return [(self.views[n], result) for n in names]
        return [(self.views[n], result[MEMBERS].get(n, MISSING)) for n in names]

    def _set(self, trial, status: str) -> None:
        now, changed = self.clock(), False
        for name in self._names(trial):
            view = self.views.get(name)
            if view is not None and view.status not in ENDED:  # a group's done members stay done
                changed |= view.set_status(status, now)
        if changed:
            self._poll_pool(force=True)
            self._refresh(force=True)

    # --- the evaluation pool ------------------------------------------------------------------
    def _poll_pool(self, force: bool = False, wait: float = 0.0) -> None:
        """Ask the pool for its job counts without blocking Tune's loop: the answer is read at a
        later call (or within `wait` seconds)."""
        if self.pool is None:
            return
        now = self.clock()
        waiting = any(v.status == "evaluating" and not (v.jobs.get("queued") or v.jobs.get("running"))
                      for v in self.views.values())  # its final job may be queued any moment
        interval = FAST_POLL_SECONDS if waiting else POLL_SECONDS
        if self._asked is None and (force or now - self._last_poll >= interval):
            self._last_poll = now
            try:
                self._asked = self.pool.status.remote()
                self._asked_at = now
            except Exception:  # the pool is gone: show the last counts
                return
        if self._asked is None:
            return
        ready, _ = ray.wait([self._asked], timeout=wait)
        if not ready:
            if now - self._last_poll > 30:  # never answered: ask again later
                self._asked = None
            return
        self._asked, self._answered = None, self._asked_at
        try:
            status = ray.get(ready[0])
        except Exception:  # the pool is busy or gone: show the last counts
            return
        self.pool_counts, per_trial = status.get("counts", {}), status.get("trials", {})
        for name, counts in per_trial.items():
            if name in self.views:
                self.views[name].jobs = counts

    # --- the numbers --------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict(Counter(v.status for v in self.views.values()))

    def throughput(self) -> tuple[float, float | None]:
        """(trial-steps/s over the last RATE_WINDOW_SECONDS, or the running trials' speeds summed
        before a second has passed; trials ended per minute since the first trial started)."""
        now = self.clock()
        since, steps_then = self._history[0]
        if now - since >= 1.0:
            steps = (self._steps - steps_then) / (now - since)
        else:
            steps = sum(v.rate or 0.0 for v in self.views.values() if v.status in ("running", "restarted"))
        if self.first_start is None:
            return steps, None
        minutes = max(self.clock() - self.first_start, 1.0) / 60
        return steps, sum(v.status in ENDED for v in self.views.values()) / minutes

    def sweep_eta(self) -> float | None:
        """The steps left over the current throughput, but never before the slowest running
        trial's ETA; with no speed yet, the trials left over the rate trials end at."""
        left = [v for v in self.views.values() if v.status not in ENDED]
        if not left:
            return 0.0
        steps_per_s, per_minute = self.throughput()
        if steps_per_s > 0:
            slowest = max((v.eta_seconds or 0.0 for v in left if v.status in ACTIVE), default=0.0)
            return max(sum(v.total - v.step for v in left) / steps_per_s, slowest)
        if per_minute:
            return len(left) / per_minute * 60
        return None

    def pool_line(self) -> str:
        """The evaluators the pool replaced (dead with their node, or past a job's deadline):
        each a retried job, invisible in MLflow when the job's values were logged before."""
        c = self.pool_counts
        if not c.get("workers_replaced"):
            return ""
        return (f"evaluation pool: {c['workers_replaced']} evaluator(s) replaced "
                f"({c.get('deadlines_missed', 0)} past a deadline, the rest died), "
                f"{c.get('retried_jobs', 0)} job(s) retried and done, {c.get('failed_jobs', 0)} failed")

    def summary(self) -> list[str]:
        counts = self.counts()
        ended = sum(counts.get(s, 0) for s in ENDED)
        by_status = ", ".join(f"{counts[s]} {s}" for s in SUMMARY_ORDER if counts.get(s))
        steps_per_s, per_minute = self.throughput()
        rates = f"{steps_per_s:.1f} trial-steps/s" + (
            f", {per_minute:.1f} trials/min" if per_minute is not None else "")
        return [f"sweep: {ended}/{len(self.views)} trials ended ({by_status})",
                f"{rates}; {_duration(self.clock() - self.start)} elapsed, "
                f"ETA {_duration(self.sweep_eta())}"] + [line for line in [self.pool_line()] if line]

    # --- drawing ------------------------------------------------------------------------------
    def shown(self, rows: int) -> list[TrialView]:
        """At most `rows` trials: all of them if they fit, else those that changed status lately
        (failures first, then active trials, then the latest changes) and those running, shown
        in sweep order so that the rows do not jump about."""
        views = list(self.views.values())
        if len(views) <= rows:
            return views
        now = self.clock()
        rank = {"failed": 0, **{s: 1 for s in ACTIVE}}
        recent = sorted((v for v in views if now - v.changed < RECENT_SECONDS and v.status != "pending"),
                        key=lambda v: (rank.get(v.status, 2), -v.changed))
        order = {v.name: i for i, v in enumerate(views)}
        first = {v.name for v in recent}
        rest = [v for v in views if v.status in ACTIVE and v.name not in first]
        picked = (recent + rest)[:max(rows, 0)]
        return sorted(picked, key=lambda v: order[v.name])

    def render(self, height: int | None = None) -> Group:
        """The summary and the table, in at most `height` lines (the screen's by default)."""
        height = height or (self.console.size.height if self.console else 40)
        summary = self.summary()
        rows = height - len(summary) - TABLE_LINES
        shown = self.shown(rows)
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        width = self.console.size.width if self.console else 120
        for i, name in enumerate(HEADER):  # long trial names give way to the numbers
            table.add_column(name, no_wrap=True, overflow="ellipsis", justify="left" if i < 2 else "right",
                             max_width=max(12, width - OTHER_COLUMNS) if i == 0 else None)
        for view in shown:
            table.add_row(*view.cells())
        hidden = self.counts()
        for view in shown:
            hidden[view.status] -= 1
        if any(hidden.values()):
            table.caption = "not shown: " + ", ".join(f"{hidden[s]} {s}" for s in SUMMARY_ORDER if hidden.get(s))
            table.caption_justify = "left"
        lines = [Text(line, no_wrap=True, overflow="ellipsis") for line in summary]
        return Group(*lines, table)

    def _refresh(self, force: bool = False) -> None:
        if self.console is None:  # not set up yet
            return
        self._poll_pool()
        now = self.clock()
        if now - self._history[-1][0] >= 1.0:
            self._history.append((now, self._steps))
            while len(self._history) > 2 and now - self._history[1][0] >= RATE_WINDOW_SECONDS:
                self._history.popleft()
        if self.live:  # a burst of status changes is drawn once; on_step_end draws what is left
            if now - self._last_draw >= (MIN_REDRAW_SECONDS if force else REDRAW_SECONDS):
                self._last_draw = now
                self.live.update(self.render(), refresh=True)
            return
        # A log: a line per status change, the summary every log_seconds.
        for view in self.views.values():
            if self._printed.get(view.name, "pending") != view.status and self._counted(view, now):
                self._printed[view.name] = view.status
                self._print(now, _log_line(view))
        if (pool := self.pool_line()) != self._printed_pool:  # a replaced evaluator: say so at once
            self._printed_pool = pool
            self._print(now, pool)
        if now - self._last_log >= self.log_seconds:
            self._log_summary(now)

    def _counted(self, view: TrialView, now: float) -> bool:
        """Whether a log line of the view's new status can show its evaluation jobs: a line is
        printed once, so an `evaluating` line waits (LOG_HOLD_SECONDS at most) for a pool answer
        asked after the change that shows the final job, a `done` line for any answer asked
        after it. The trial queues its final job just before it reports its last step, so the
        driver can ask the pool before the job has reached it."""
        if self.pool is None or self._ending or view.status not in ("evaluating", "done"):
            return True
        if now - view.changed >= LOG_HOLD_SECONDS:
            return True
        if self._answered < view.changed:
            self._poll_pool(force=True)
            return False
        return view.status == "done" or bool(view.jobs.get("queued") or view.jobs.get("running"))

    def _log_summary(self, now: float) -> None:
        self._last_log = now
        self._print(now, "; ".join(self.summary()))

    def _print(self, now: float, line: str) -> None:
        self.console.print(f"[{_duration(now - self.start)}] {line}", highlight=False, soft_wrap=True)


class _Missing(dict):
    """A fused group's member absent from the group's last result (the group stopped)."""


MISSING = _Missing()


def _log_line(view: TrialView) -> str:
    name, status, step, loss, *_ = view.cells()
    return f"{name}: {status}, step {step}, loss {loss}, evals queued/running/done {view.evals(compact=False)}"


def _duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
