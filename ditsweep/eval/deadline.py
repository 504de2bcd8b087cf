"""How long an evaluation job may run before its actor is presumed hung.

A job's deadline is scaled from its size: how many images go through the denoiser (and through
InceptionV3 for FID) for each metric, times the FLOPs of one image through the trial's model,
at a pessimistic rate for the evaluator's device:

    deadline = max(eval.actors.deadline_min_s, eval.actors.deadline_scale * estimate)

The rates are below what was measured, so the estimate itself is generous (DiT-T/1 at 8x8: the
PSNR gap at N=1000 is estimated at 270 s and takes 38 s on one CPU thread; on an H100, DiT-XS/1
fp32 ran 1.3 ms per image-pass against the 2.1 ms assumed here).
"""

import functools
import logging

from ditsweep.config import EvalActorSettings, TrialConfig

log = logging.getLogger(__name__)
CPU_FLOPS_PER_THREAD = 5e9   # FLOP/s one CPU thread sustains for the denoiser, pessimistic
GPU_FLOPS = 1e13             # FLOP/s of one GPU in fp32 at evaluation batch sizes, pessimistic
INCEPTION_FLOPS = 5.7e9      # InceptionV3 at 299x299, per image
BACKWARD = 3.0               # a forward and backward pass cost ~3 forward passes


def image_passes(cfg: TrialConfig, metrics: list[str]) -> tuple[float, float]:
    """(denoiser image-passes, InceptionV3 images) a job with these metrics needs."""
    e, r = cfg.eval, cfg.data.resolution
    passes = inception = 0.0
    for name in metrics:
        if name == "psnr_gap":
            passes += 2 * min(e.psnr_gap.num_images, cfg.n_train) * e.psnr_gap.steps
        elif name == "fid":
            passes += e.fid.num_samples * e.fid.sampling_steps
            inception += e.fid.num_samples + min(cfg.n_train, e.fid.reference_images)
        elif name == "samples":
            passes += e.samples.num_images * e.samples.sampling_steps
        elif name == "attention":
            passes += 2 * e.attention.num_images * len(e.attention.timesteps)
        elif name == "jacobian":  # one backward pass per output pixel and channel
            passes += BACKWARD * 3 * r * r * len(e.jacobian.timesteps)
    return passes, inception


@functools.lru_cache(maxsize=64)
def flops_per_image(model: str, resolution: int, layout: str) -> float:
    """FLOPs of one image through the model (counted once per model and size)."""
    from ditsweep.models import build_model
    from ditsweep.models.presets import count_flops
    net = build_model(model, image_size=resolution, in_channels=3,
                      layout=None if layout == "-" else layout, attention_backend="torch")
    return float(count_flops(net, resolution))


def estimate_seconds(cfg: TrialConfig, metrics: list[str], settings: EvalActorSettings) -> float:
    passes, inception = image_passes(cfg, metrics)
    rate = GPU_FLOPS if settings.gpus > 0 else CPU_FLOPS_PER_THREAD * max(1, int(settings.cpus))
    flops = passes * flops_per_image(cfg.model, cfg.data.resolution, cfg.layout) + inception * INCEPTION_FLOPS
    return flops / rate


def job_deadline(trial: dict, metrics: list[str], settings: EvalActorSettings) -> float | None:
    """Seconds a job may take on its actor; None when deadlines are off (deadline_scale: 0)."""
    if settings.deadline_scale <= 0:
        return None
    cfg = TrialConfig.model_validate(trial)
    try:
        estimate = estimate_seconds(cfg, metrics, settings)
    except Exception as e:  # noqa: BLE001 - a model the FLOP counter cannot trace keeps the floor
        log.warning("no size estimate for %s (%s: %s); deadline %.0f s", cfg.trial, type(e).__name__, e,
                    settings.deadline_min_s)
        return settings.deadline_min_s
    return max(settings.deadline_min_s, settings.deadline_scale * estimate)
