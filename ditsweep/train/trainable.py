"""The Ray Tune trainable: one trial = train one model, evaluate it, record it in MLflow.

Checkpoints (model, EMA, optimizer, step, RNG state) are reported through Tune, so a restarted
trial resumes where it stopped. The trial's MLflow run is found again by its tag on resume, and
metric steps already in MLflow are not logged twice.
"""

import logging
import tempfile
import time
from pathlib import Path

import torch
from ray import tune

from ditsweep.data import load_split
from ditsweep.eval.psnr_gap import plot_psnr_gap, psnr_gap
from ditsweep.spec import TrialConfig
from ditsweep.tracking import TrialRun
from ditsweep.train.loop import Trainer, TrainingDiverged, to_model_range

log = logging.getLogger(__name__)
FLUSH_SECONDS = 20.0
TRIAL_KEY = "trial_config"  # the one key of a Tune config: a TrialConfig dumped to a dict  # how often buffered loss values go to MLflow between checkpoints


def trial_params(cfg: TrialConfig) -> dict:
    """The resolved config as flat MLflow params (never the tracking URI: it may hold secrets)."""
    return {
        "model": cfg.model, "arch": cfg.arch, "layout": cfg.layout, "layout_name": cfg.layout_name,
        "variant": cfg.variant, "n_train": cfg.n_train, "seed": cfg.seed, "dataset": cfg.dataset,
        "resolution": cfg.data.resolution, "sweep": cfg.sweep,
        **{f"train.{k}": v for k, v in cfg.train.model_dump().items()},
        "eval.use_ema": cfg.eval.use_ema,
        **{f"eval.psnr_gap.{k}": v for k, v in cfg.eval.psnr_gap.model_dump().items()},
    }


def train_trial(config: dict) -> None:
    """Tune function trainable: config = {TRIAL_KEY: TrialConfig as a dict}."""
    cfg = TrialConfig.model_validate(config[TRIAL_KEY])
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    n_test = min(cfg.eval.psnr_gap.num_images, cfg.n_train) if cfg.eval.psnr_gap.enabled else 0
    train_u8, test_u8 = load_split(cfg.dataset, cfg.data.resolution, cfg.n_train, n_test)
    trainer = Trainer(cfg, to_model_range(train_u8))
    run = TrialRun(cfg.tracking_uri, cfg.experiment, cfg.parent_run_id, cfg.trial,
                   trial_params(cfg), tags={"ditsweep.sweep": cfg.sweep})

    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            trainer.load(Path(d))
        log.info("trial %s resumed at step %d", cfg.trial, trainer.step)
        run.set_tags({"ditsweep.resumed_from_step": str(trainer.step)})
    last_flush = time.monotonic()
    window: list[float] = []
    metrics: dict = {}
    try:
        while trainer.step < cfg.train.steps:
            window.append(trainer.train_step())
            step = trainer.step
            metrics = {"step": step}
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics["loss"] = sum(window) / len(window)
                run.log_metrics({"loss": metrics["loss"]}, step)
                window.clear()
            gap_every = cfg.eval.psnr_gap.every
            if cfg.eval.psnr_gap.enabled and gap_every and step % gap_every == 0 and step < cfg.train.steps:
                metrics["psnr_gap_mean"] = _evaluate(trainer, train_u8, test_u8, run, final=False).mean_gap
            if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                run.flush()
                _report(trainer, run, metrics)
            elif time.monotonic() - last_flush > FLUSH_SECONDS:
                run.flush()
                last_flush = time.monotonic()
    except TrainingDiverged as e:
        run.set_tags({"ditsweep.failure": str(e)})
        run.finish("FAILED")
        raise

    metrics = {"step": trainer.step, "loss": metrics.get("loss", float("nan"))}
    if cfg.eval.psnr_gap.enabled:
        metrics["psnr_gap_mean"] = _evaluate(trainer, train_u8, test_u8, run, final=True).mean_gap
    run.finish("FINISHED")
    _report(trainer, run, metrics)


def _evaluate(trainer: Trainer, train_u8, test_u8, run: TrialRun, final: bool):
    cfg = trainer.cfg
    k = len(test_u8)
    result = psnr_gap(trainer.eval_model(), to_model_range(train_u8[:k]), to_model_range(test_u8),
                      num_steps=cfg.eval.psnr_gap.steps, seed=cfg.seed,
                      batch_size=cfg.eval.psnr_gap.batch_size)
    run.log_metrics({"psnr_gap_mean": result.mean_gap}, trainer.step)
    if final:
        run.log_series("psnr_train_t", result.timesteps, result.psnr_train)
        run.log_series("psnr_test_t", result.timesteps, result.psnr_test)
        run.log_series("psnr_gap_t", result.timesteps, result.gap)
        with tempfile.TemporaryDirectory() as d:
            png = Path(d) / "psnr_gap.png"
            plot_psnr_gap(result, f"{cfg.trial}: {cfg.model} layout {cfg.layout} N={cfg.n_train}", str(png))
            run.log_artifact(str(png))
    return result


def _report(trainer: Trainer, run: TrialRun, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        trainer.save(Path(d), extra={"mlflow_run_id": run.run_id})
        tune.report({**metrics, "mlflow_run_id": run.run_id},
                    checkpoint=tune.Checkpoint.from_directory(d))
