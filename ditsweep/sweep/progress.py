"""What a researcher sees while a sweep runs: one compact view of its trials.

A Tune callback in the driver collects, for every trial, its status, step / total, loss, steps/s
and ETA, and its evaluation jobs (queued, running, done) from the evaluation pool. On a terminal
the view is a `rich` table redrawn in place; in a log (not a TTY: `ray job submit`, CI) it is a
line per trial when something changed, at most every `log_seconds`, so a whole smoke sweep
prints a few dozen lines. Tune's own reporter is only shown with `--verbose`.
"""

import math
import sys
import time
from dataclasses import dataclass, field

import ray
from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

POLL_SECONDS = 2.0  # how often the evaluation pool is asked for its job counts


@dataclass
class TrialView:
    name: str
    total: int
    status: str = "pending"
    step: int = 0
    loss: float | None = None
    rate: float | None = None   # steps/s, smoothed
    jobs: dict = field(default_factory=dict)  # queued / running / done / failed
    _last: tuple[float, int] | None = None    # (time, step) of the previous result

    def update(self, step: int, loss: float | None) -> None:
        now = time.monotonic()
        if self._last and step > self._last[1]:
            rate = (step - self._last[1]) / max(now - self._last[0], 1e-6)
            self.rate = rate if self.rate is None else 0.7 * self.rate + 0.3 * rate
        self._last = (now, step)
        self.step = step
        self.loss = loss if loss is not None else self.loss

    @property
    def eta_seconds(self) -> float | None:
        if self.status in ("done", "failed", "reused"):
            return 0.0
        if not self.rate:
            return None
        return (self.total - self.step) / self.rate

    def cells(self) -> list[str]:
        j = self.jobs
        evals = f"{j.get('queued', 0)}/{j.get('running', 0)}/{j.get('done', 0)}" if j else "-"
        if j.get("failed"):
            evals += f" ({j['failed']} failed)"
        return [self.name, self.status, f"{self.step}/{self.total}",
                "-" if self.loss is None else f"{self.loss:.4f}",
                "-" if not self.rate else f"{self.rate:.1f}", _duration(self.eta_seconds), evals]


HEADER = ["trial", "status", "step", "loss", "steps/s", "ETA", "evals q/r/d"]


class SweepProgress(Callback):
    """Tune callback drawing the sweep's progress (see the module docstring)."""

    def __init__(self, trials: dict[str, int], pool=None, log_seconds: float = 30.0,
                 console: Console | None = None):
        """`trials`: trial name -> total steps; `pool`: the evaluation pool's coordinator."""
        self.views = {name: TrialView(name, total) for name, total in trials.items()}
        self.pool = pool
        self.console = console
        self.live: Live | None = None
        self.log_seconds = log_seconds
        self._printed: dict[str, tuple] = {}  # trial -> what its last log line showed
        self._last_log = 0.0
        self._last_poll = 0.0
        self.start = time.monotonic()

    def __getstate__(self) -> dict:
        # Tune pickles its run config (callbacks included) into the experiment folder; the
        # console and the live view hold locks and are made again in setup().
        return {**self.__dict__, "console": None, "live": None}

    # --- Tune's hooks -------------------------------------------------------------------------
    def setup(self, **info) -> None:
        self.console = self.console or Console(file=sys.stdout)
        if self.console.is_terminal:
            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._set(trial, status="running")

    def on_trial_restore(self, iteration, trials, trial, **info) -> None:
        self._set(trial, status="restarted")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._set(trial, status="restarting")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        view = self._view(trial)
        if view is None:
            return
        view.update(int(result.get("step", view.step)), result.get("loss"))
        if view.step >= view.total and view.status == "running":
            view.status = "evaluating"  # the trial waits for its final evaluation jobs
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        failed = (trial.last_result or {}).get("ditsweep_failure")
        self._set(trial, status="failed" if failed else "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._set(trial, status="failed")

    def on_step_end(self, iteration, trials, **info) -> None:
        self._refresh()

    def on_experiment_end(self, trials, **info) -> None:
        if self.live:  # a log ends with the summary table that follows
            self._poll_pool(force=True)
            self._refresh(force=True)
            self.live.stop()

    # --- drawing ------------------------------------------------------------------------------
    def _view(self, trial) -> TrialView | None:
        name = trial.config.get("trial_config", {}).get("trial", str(trial))
        return self.views.get(name)

    def _set(self, trial, status: str) -> None:
        view = self._view(trial)
        if view is not None:
            view.status = status
            self._poll_pool(force=True)
            self._refresh(force=True)

    def _poll_pool(self, force: bool = False) -> None:
        if self.pool is None or (not force and time.monotonic() - self._last_poll < POLL_SECONDS):
            return
        self._last_poll = time.monotonic()
        try:
            per_trial = ray.get(self.pool.status.remote(), timeout=5).get("trials", {})
        except Exception:  # the pool is busy or gone: show the last counts
            return
        for name, counts in per_trial.items():
            if name in self.views:
                self.views[name].jobs = counts

    def sweep_eta(self) -> float | None:
        """The slowest trial's ETA among those that run; trials still pending are assumed to
        start when a running one ends and to run at the mean speed seen so far."""
        rates = [v.rate for v in self.views.values() if v.rate]
        etas = [v.eta_seconds for v in self.views.values() if v.status != "pending"]
        if not rates or any(e is None for e in etas):
            return None
        pending = [v for v in self.views.values() if v.status == "pending"]
        later = sum(v.total for v in pending) / (sum(rates) or 1)
        return max(etas, default=0.0) + later

    def table(self) -> Table:
        done = sum(v.status in ("done", "failed") for v in self.views.values())
        title = (f"sweep: {done}/{len(self.views)} trials ended, "
                 f"{_duration(time.monotonic() - self.start)} elapsed, ETA {_duration(self.sweep_eta())}")
        table = Table(*HEADER, title=title, title_justify="left")
        for view in self.views.values():
            table.add_row(*view.cells())
        return table

    def _refresh(self, force: bool = False) -> None:
        if self.console is None:  # not set up yet
            return
        self._poll_pool()
        if self.live:
            self.live.update(self.table(), refresh=True)
            return
        # A log: a line per trial whose status changed, and for the others at most every
        # log_seconds when their numbers moved.
        now = time.monotonic()
        periodic = force or now - self._last_log >= self.log_seconds
        lines = []
        for view in self.views.values():
            shown = (view.status, view.step, tuple(sorted(view.jobs.items())))
            before = self._printed.get(view.name)
            if before == shown or (not periodic and before and before[0] == view.status):
                continue
            if before is None and view.status == "pending":
                continue
            self._printed[view.name] = shown
            lines.append(_log_line(view))
        if lines:
            if periodic:
                self._last_log = now
            eta = self.sweep_eta()
            stamp = f"[{_duration(now - self.start)}{'' if eta is None else ', sweep ETA ' + _duration(eta)}]"
            for line in lines:
                self.console.print(f"{stamp} {line}", highlight=False, soft_wrap=True)


def _log_line(view: TrialView) -> str:
    name, status, step, loss, rate, eta, evals = view.cells()
    return (f"{name}: {status}, step {step}, loss {loss}, {rate} steps/s, ETA {eta}, "
            f"evals queued/running/done {evals}")


def _duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' chatter (MLflow's database migrations, Ray's start-up lines, Tune's
    hints, deprecation warnings) out of the console unless --verbose: it hides the few lines a
    researcher needs. Their errors still show."""
    import logging
    import os
    import warnings

    if verbose:
        return
    # MLflow sets its loggers' level when it is imported (later, and in every Ray worker).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Tune's newer console output prints an experiment header and a TensorBoard hint even at
    # verbose=0; its classic reporter at verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow", "ray.tune", "ray.train", "ray.air", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
