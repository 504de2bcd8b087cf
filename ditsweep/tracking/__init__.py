"""MLflow: a parent run per sweep, a child run per trial, retried logging."""

from ditsweep.tracking.mlflow_runs import TrialRun, end_run, find_sweep_run, log_planned_trials, start_sweep_run

__all__ = ["TrialRun", "end_run", "find_sweep_run", "log_planned_trials", "start_sweep_run"]
