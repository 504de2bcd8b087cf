"""A trial across attempts: its identity tags, checkpoints under its identity, twins elsewhere.

The trainable calls these few hooks (see trainable.py):

    tags = identity_tags(cfg)                  # on the trial's run
    original = twin_to_link(cfg, run)          # before training: did another sweep train it?
    restore_from_storage(cfg, trainer, run)    # no Tune checkpoint: the identity store's latest
    store_checkpoint(cfg, run, file, step)     # every checkpoint, and the final one
    beat(cfg, run)                             # while training: "this identity is being trained"
"""

import logging
import tempfile
import time
from pathlib import Path

from ditsweep.config import TrialConfig
from ditsweep.config.identity import CODE_VERSION
from ditsweep.tracking.mlflow_runs import IDENTITY_TAG
from ditsweep.tracking.reuse import (
    CHECKPOINT_TAG,
    CODE_VERSION_TAG,
    RECIPE_TAG,
    become_link,
    heartbeat,
    wait_for_twin,
)
from ditsweep.train.checkpoints import TrialCheckpoints

log = logging.getLogger(__name__)
BEAT_SECONDS = 60.0
_last_beat: dict[str, float] = {}


def identity_tags(cfg: TrialConfig) -> dict[str, str]:
    if not cfg.identity:
        return {}
    from ditsweep.config.identity import recipe_key
    return {IDENTITY_TAG: cfg.identity, RECIPE_TAG: recipe_key(cfg), CODE_VERSION_TAG: str(CODE_VERSION)}


def _store(cfg: TrialConfig) -> TrialCheckpoints | None:
    return TrialCheckpoints(cfg.storage, cfg.identity) if cfg.identity and cfg.storage else None


def twin_to_link(cfg: TrialConfig, run, has_checkpoint: bool) -> dict | None:
    """When another sweep has trained this identity, or trains it and started first, wait for it
    and make this trial's run a link to it; returns the final metrics for Tune, else None (train).
    A trial that has a checkpoint of its own already trains it: it never waits."""
    if not cfg.identity or not cfg.reuse or has_checkpoint or _own_latest(cfg, run):
        return None
    beat(cfg, run, force=True)
    original = wait_for_twin(run.client, run.run_id, cfg.identity)
    if original is None:
        return None
    log.info("trial %s: identity %s was trained by run %s; linking to it", cfg.trial, cfg.identity,
             original.info.run_id)
    become_link(run.client, run.run_id, original)
    metrics = original.data.metrics
    return {"step": cfg.train.steps, "loss": metrics.get("loss", float("nan")),
            **{k: v for k, v in metrics.items() if k in ("psnr_gap_mean", "fid")},
            "reused_from": original.info.run_id}


def _own_latest(cfg: TrialConfig, run) -> dict | None:
    """The identity store's newest checkpoint if this run wrote it (an earlier attempt of this
    very run). Another run's checkpoints are not continued: a --no-reuse training must not pick
    up a finished original's final weights, and a run's loss history must start at step 1."""
    store = _store(cfg)
    latest = store.latest() if store else None
    return latest if latest and latest.get("run_id") == run.run_id else None


def restore_from_storage(cfg: TrialConfig, trainer, run) -> bool:
    """Load the newest checkpoint stored under the identity by an earlier attempt of this run
    (under any driver or Ray cluster, with or without --resume). True when it did."""
    if _own_latest(cfg, run) is None:
        return False
    store = _store(cfg)
    with tempfile.TemporaryDirectory() as d:
        if store.fetch(Path(d)) is None:
            return False
        trainer.load(Path(d))
    log.info("trial %s continues from step %d (%s)", cfg.trial, trainer.step, store.location)
    run.set_tags({"ditsweep.resumed_from_step": str(trainer.step)})
    return True


def store_checkpoint(cfg: TrialConfig, run, checkpoint_file: Path, step: int,
                     final: bool = False) -> None:
    """Keep the checkpoint under the identity (skipped when this step is stored already)."""
    store = _store(cfg)
    if store is None:
        return
    latest = store.latest()
    if latest and latest["step"] == step and latest.get("final") == final:
        return
    url = store.save(checkpoint_file, step, final=final, keep=cfg.train.checkpoints_to_keep,
                     run_id=run.run_id)
    tags = {CHECKPOINT_TAG: store.location} if final else {}
    run.set_tags(tags)
    beat(cfg, run, force=True)
    log.info("checkpoint of %s at step %d: %s", cfg.trial, step, url)


def beat(cfg: TrialConfig, run, force: bool = False) -> None:
    """Tell sweeps started meanwhile that this identity is being trained (at most once a minute)."""
    if not cfg.identity:
        return
    now = time.monotonic()
    if force or now - _last_beat.get(run.run_id, -BEAT_SECONDS) >= BEAT_SECONDS:
        try:
            heartbeat(run.client, run.run_id)
            _last_beat[run.run_id] = now
        except Exception as e:  # a missed heartbeat must not stop training
            log.warning("heartbeat of %s failed: %s", cfg.trial, e)
