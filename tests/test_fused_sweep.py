"""A fused sweep end to end: `python -m ditsweep.run` with `resources.fuse: 3` trains three
trials as one Tune trial; its worker is killed after a checkpoint, the group resumes every member
from its own checkpoint, and each member is still a trial everywhere a user looks: its own
FINISHED MLflow run with a clean loss history, its evaluations (FID sampled batched over the
members by one pool job), its line in the summary table."""

import os
import signal

import pytest
from conftest import tiny_sweep, write_sweep
from procs import descendants, wait_for
from test_fault_tolerance import assert_clean_history, start, trial_runs

from ditsweep.eval.fid import write_random_inception_weights

pytestmark = pytest.mark.slow


def test_a_fused_group_resumes_after_its_worker_is_killed_and_each_member_keeps_its_run(tmp_path):
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    sweep = tiny_sweep(name="fusedkill",
                       grid={"model": ["DiT-T/1"], "layout": ["local"], "n_train": [10],
                             "seed": [0, 1, 2], "dataset": ["builtin:photos"]},
                       eval={"psnr_gap": {"num_images": 8, "steps": 3},
                             "samples": {"enabled": False}, "attention": {"enabled": False},
                             "fid": {"enabled": True, "num_samples": 4, "sampling_steps": 3,
                                     "reference_images": 10, "batch_size": 4,
                                     "feature_extractor_weights_path": str(weights)}})
    sweep["train"].update(steps=160, log_every=10, checkpoint_every=40)
    sweep["resources"]["fuse"] = 3
    path = write_sweep(tmp_path, sweep)
    driver = start(path, tmp_path)
    group_dir = tmp_path / "ray_results" / "fusedkill"
    try:
        wait_for(lambda: sorted(group_dir.glob("*+2*/checkpoint_*")), 240, "the group's first checkpoint")
        workers = [pid for pid, cmd in descendants(driver.pid) if "ImplicitFunc" in cmd]
        assert len(workers) == 1, descendants(driver.pid)  # three trials, one training process
        os.kill(workers[0], signal.SIGKILL)
        assert driver.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        from procs import stop
        stop(driver)
    log = (tmp_path / "driver.log").read_text()
    assert "3 trials fused into 1 groups (3 members)" in log, log[-3000:]
    assert "3/3 trials finished" in log, log[-3000:]
    client, runs, parents = trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "fusedkill")
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2"]  # one run per member
    losses = []
    for run in runs:
        assert run.info.status == "FINISHED"
        resumed = int(run.data.tags["ditsweep.resumed_from_step"])
        assert 0 < resumed < 160 and resumed % 40 == 0
        assert run.data.tags["ditsweep.attempts"] == "2"  # the killed worker: retried once
        assert_clean_history(client, run.info.run_id, "loss", list(range(10, 161, 10)))
        assert {"psnr_gap_mean", "fid"} <= set(run.data.metrics), run.data.tags.get("ditsweep.eval_failure")
        losses.append(run.data.metrics["loss"])
    assert len(set(losses)) == 3  # three different models, not one logged three times
    assert parents[0].info.status == "FINISHED"
