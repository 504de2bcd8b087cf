"""Diffusion: linear schedule, learned-range variance, hybrid loss, respacing, sampling.

    diffusion = create_diffusion()                       # T = 1000, for training
    losses = diffusion.training_losses(model, x0, t)     # {"loss", "mse", "vb"}, each [B]
    samples = sample(ema_model, (16, 3, 32, 32))         # 250 respaced ancestral steps

Models are called `model(x, t)` with t the ORIGINAL timesteps (long, [B]) and return
[B, 2C, ...]: eps, then the variance interpolation value v.
"""

from functools import lru_cache

import torch

from ditsweep.diffusion.gaussian import GaussianDiffusion, Model, StepNoise, linear_beta_schedule
from ditsweep.diffusion.respace import OriginalTimesteps, SpacedDiffusion, space_timesteps

SAMPLING_STEPS = 250  # the paper samples with 250 respaced steps

__all__ = ["GaussianDiffusion", "SpacedDiffusion", "OriginalTimesteps", "SAMPLING_STEPS",
           "create_diffusion", "linear_beta_schedule", "predict_x0_one_step", "sample",
           "space_timesteps"]


def create_diffusion(timestep_respacing: str | int | None = None,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The linear-schedule diffusion of `diffusion_steps` steps, respaced if asked
    ("250", 250, "ddim50", "10,20,...": see `space_timesteps`). None or "" means no respacing."""
    betas = linear_beta_schedule(diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas)
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas)


@lru_cache(maxsize=8)
def _cached_diffusion(timestep_respacing: str | int | None, diffusion_steps: int) -> GaussianDiffusion:
    return create_diffusion(timestep_respacing, diffusion_steps)


def sample(model: Model, shape: tuple[int, ...], num_steps: int = SAMPLING_STEPS,
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
           device: torch.device | str | None = None, diffusion_steps: int = 1000,
           step_noise: StepNoise | None = None) -> torch.Tensor:
    """Ancestral sampling with `num_steps` respaced steps; see GaussianDiffusion.p_sample_loop."""
    diffusion = _cached_diffusion(num_steps, diffusion_steps)
    return diffusion.p_sample_loop(model, shape, noise=noise, generator=generator, device=device,
                                   step_noise=step_noise)


def predict_x0_one_step(model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                        diffusion_steps: int = 1000) -> torch.Tensor:
    """One-step denoising for the PSNR gap: noise x0 to x_t, then
    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), eps_hat = first C output channels.

    t holds original timesteps (long, [B]). No clipping: the PSNR gap measures the raw estimate.
    Gradients are kept (wrap in torch.no_grad() when not needed), e.g. for Jacobians.
    """
    diffusion = _cached_diffusion(None, diffusion_steps)
    x_t = diffusion.q_sample(x0, t, noise=noise)
    eps_hat = model(x_t, t)[:, : x0.shape[1]].float()
    return diffusion.predict_xstart_from_eps(x_t, t, eps_hat)
