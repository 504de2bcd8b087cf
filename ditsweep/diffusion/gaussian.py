"""Gaussian diffusion with a learned-range variance, in the manner of improved-diffusion and DiT.

Only what ditsweep needs: the network predicts the noise eps (first C output channels) and a
value v in [-1, 1] per pixel (last C channels) that interpolates the log variance between the
posterior variance (v = -1) and beta_t (v = +1). Training uses the hybrid loss
L_simple + L_vlb; sampling is ancestral.

Schedule constants are numpy float64 (as in the reference code: float32 cumulative products
lose precision near t = T); they are gathered at t and cast to float32 on the tensor's device.
"""

import weakref
from collections.abc import Callable

import numpy as np
import torch

from ditsweep.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepNoise = Callable[[], torch.Tensor]  # one sampler step's noise


def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """Ho et al.'s linear betas 1e-4 .. 0.02, rescaled so that any T gives a similar process."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


_ON_DEVICE: dict = {}  # (id(arr), device) -> (weakref to arr, its copy on that device)


def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[t] as a float32 tensor shaped [B, 1, ..., 1] for broadcasting against ndim dims."""
    return _device_copy(arr, t.device)[t].float().view(-1, *([1] * (ndim - 1)))


def _device_copy(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """arr as a tensor on `device`, copied once: a host-to-device copy waits for the GPU stream,
    and the training step gathers schedule constants several times per step."""
    if device.type == "cpu":
        return torch.from_numpy(arr)  # shares memory; no copy to save
    key = (id(arr), str(device))
    hit = _ON_DEVICE.get(key)
    if hit is None or hit[0]() is not arr:
        hit = _ON_DEVICE[key] = (weakref.ref(arr), torch.from_numpy(arr).to(device))
    return hit[1]


class GaussianDiffusion:
    """A diffusion process with the given betas; `t` arguments index these betas."""

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = len(betas)
        # Respaced diffusions override this: index -> timestep of the original process.
        self.timestep_map = list(range(self.num_timesteps))

        self.log_betas = np.log(betas)  # upper bound of the learned log variance
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # x_0 from x_t and eps
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: reuse the value at t = 1 so its log stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1 else self.betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def wrap_model(self, model: Model) -> Model:
        """The model as this process must call it (respaced processes map t to original steps)."""
        return model

    # ---- forward process -------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (_extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor,
                                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and (clipped) log variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = _extract(self.posterior_mean_coef1, t, n) * x_start + _extract(self.posterior_mean_coef2, t, n) * x_t
        variance = _extract(self.posterior_variance, t, n).expand_as(x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, n).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    # ---- reverse process -------------------------------------------------------------------

    def p_mean_variance(self, model: Model, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True) -> dict:
        """Apply the model to get p(x_{t-1} | x_t): "mean", "variance", "log_variance", "pred_xstart"."""
        model_output = self.wrap_model(model)(x, t)
        return self._p_from_output(model_output, x, t, clip_denoised)

    def _p_from_output(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                       clip_denoised: bool) -> dict:
        """p(x_{t-1} | x_t) from a model output [B, 2C, ...] that has already been computed."""
        B, C = x.shape[:2]
        assert model_output.shape == (B, 2 * C, *x.shape[2:]), \
            f"expected model output {(B, 2 * C, *x.shape[2:])}, got {tuple(model_output.shape)}"
        eps, v = torch.split(model_output.float(), C, dim=1)

        # Learned range: interpolate in log space between the two bounds of the true variance.
        min_log = _extract(self.posterior_log_variance_clipped, t, x.ndim)
        max_log = _extract(self.log_betas, t, x.ndim)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log

        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 generator: torch.Generator | None = None, step_noise: StepNoise | None = None) -> torch.Tensor:
        """One ancestral step: x_{t-1} ~ p(x_{t-1} | x_t)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
        noise = step_noise() if step_noise else _randn(x.shape, generator, x.device)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise at the last step
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    @torch.no_grad()
    def p_sample_loop(self, model: Model, shape: tuple[int, ...], noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, device: torch.device | str | None = None,
                      clip_denoised: bool = True, progress: bool = False,
                      step_noise: StepNoise | None = None) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I) (or `noise`) through every step of this process.

        All randomness comes from `generator` when given, so a seeded generator gives the same
        samples; `step_noise()` instead draws each step's noise (shaped like x, on its device),
        e.g. several models sampled as one batch, each part from its own generator. Images live
        in [-1, 1], so x_0 predictions are clipped to it by default.
        """
        if device is None:
            device = noise.device if noise is not None else torch.device("cpu")
        x = noise.to(device) if noise is not None else _randn(shape, generator, device)
        assert tuple(x.shape) == tuple(shape)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            x = self.p_sample(model, x, t, clip_denoised=clip_denoised, generator=generator,
                              step_noise=step_noise)
        return x

    # ---- training --------------------------------------------------------------------------

    def _vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
        """One term of the variational bound in bits per dim, [B]: KL(q || p) for t > 0,
        the decoder negative log-likelihood at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_from_output(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / np.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: Model, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict:
        """Hybrid loss L_simple + L_vlb, per sample: {"loss", "mse", "vb"}, each [B]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self.wrap_model(model)(x_t, t).float()  # float32 even under autocast
        C = x_start.shape[1]
        eps, v = torch.split(model_output, C, dim=1)

        # The vb term trains only the variance: stop its gradient into the mean (eps) so the
        # mean is learned by the MSE alone, as improved-diffusion does.
        frozen = torch.cat([eps.detach(), v], dim=1)
        vb = self._vb_terms_bpd(frozen, x_start, x_t, t)
        # L_vlb = T * E_t[L_t], weighted by lambda = 1/1000 in improved-diffusion: one sampled
        # term times T/1000 (their RESCALED_MSE). A factor of 1 at T = 1000; without it a
        # respaced training would let the vb term swamp the MSE.
        vb = vb * (self.num_timesteps / 1000.0)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved: a CPU generator keeps
    giving the same numbers whatever device the model runs on."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)
