"""Diffusion: closed forms, respacing, losses, sampling and the one-step x0 estimate."""

import math

import numpy as np
import pytest
import torch

from ditsweep.diffusion import (GaussianDiffusion, create_diffusion, predict_x0_one_step, sample,
                                space_timesteps)
from ditsweep.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl

DIFF = create_diffusion()


def images(n=4, shape=(3, 4, 4), seed=0) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


class NoiseOracle:
    """Knows the noise of the current batch; returns it (or zeros) as eps and v for the variance."""

    def __init__(self, noise: torch.Tensor | None, v: float = 0.0):
        self.noise, self.v = noise, v

    def __call__(self, x, t):
        eps = self.noise if self.noise is not None else torch.zeros_like(x)
        return torch.cat([eps, torch.full_like(x, self.v)], dim=1)


class Recorder:
    """Records the timesteps it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])


class TinyNet(torch.nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels + 1, 2 * channels, 3, padding=1)

    def forward(self, x, t):
        tmap = (t.float() / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return torch.tanh(self.conv(torch.cat([x, tmap], dim=1)))


# ---- schedule and closed forms ----------------------------------------------------------

def test_linear_schedule():
    assert DIFF.num_timesteps == 1000 and DIFF.betas.dtype == np.float64
    assert DIFF.betas[0] == pytest.approx(1e-4) and DIFF.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(DIFF.alphas_cumprod, np.cumprod(1 - DIFF.betas))
    assert DIFF.timestep_map == list(range(1000))


@pytest.mark.parametrize("step", [0, 100, 500, 999])
def test_q_sample_mean_and_variance(step):
    x0 = images(1, (3, 2, 2)).expand(20000, -1, -1, -1)
    t = torch.full((len(x0),), step, dtype=torch.long)
    torch.manual_seed(step)
    xt = DIFF.q_sample(x0, t)
    abar = DIFF.alphas_cumprod[step]
    # standard errors: sqrt(var/n) < 0.0071 for the mean, ~0.01 relative for the variance
    torch.testing.assert_close(xt.mean(0), math.sqrt(abar) * x0[0], atol=0.03, rtol=0)
    torch.testing.assert_close(xt.var(0), torch.full_like(x0[0], 1 - abar), atol=0, rtol=0.06)


def test_posterior_against_the_formula():
    x0, xt = images(3, seed=1), images(3, seed=2)
    steps = [1, 400, 999]
    t = torch.tensor(steps)
    mean, var, log_var = DIFF.q_posterior_mean_variance(x0, xt, t)
    a, abar = 1 - DIFF.betas, DIFF.alphas_cumprod
    for i, s in enumerate(steps):
        post_var = DIFF.betas[s] * (1 - abar[s - 1]) / (1 - abar[s])
        c0 = math.sqrt(abar[s - 1]) * DIFF.betas[s] / (1 - abar[s])
        ct = math.sqrt(a[s]) * (1 - abar[s - 1]) / (1 - abar[s])
        torch.testing.assert_close(mean[i], (c0 * x0[i].double() + ct * xt[i].double()).float())
        torch.testing.assert_close(var[i], torch.full_like(x0[i], post_var))
        torch.testing.assert_close(log_var[i], torch.full_like(x0[i], math.log(post_var)))


def test_posterior_at_t0_is_x0_with_a_finite_log_variance():
    x0, xt = images(2, seed=1), images(2, seed=2)
    mean, var, log_var = DIFF.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()
    torch.testing.assert_close(log_var, torch.full_like(x0, math.log(DIFF.posterior_variance[1])))


def test_learned_range_variance_spans_posterior_to_beta():
    x = images(2)
    t = torch.tensor([10, 700])
    lo = DIFF.p_mean_variance(NoiseOracle(None, v=-1.0), x, t)["log_variance"]
    hi = DIFF.p_mean_variance(NoiseOracle(None, v=1.0), x, t)["log_variance"]
    for i, s in enumerate([10, 700]):
        assert torch.allclose(lo[i], torch.tensor(DIFF.posterior_log_variance_clipped[s]).float())
        assert torch.allclose(hi[i], torch.tensor(math.log(DIFF.betas[s])).float())


# ---- respacing ----------------------------------------------------------------------------

def test_space_timesteps_fifty_is_the_reference_set():
    steps = sorted(space_timesteps(1000, "50"))
    assert len(steps) == 50
    assert steps[:5] == [0, 20, 41, 61, 82] and steps[-3:] == [958, 979, 999]
    assert space_timesteps(1000, 50) == space_timesteps(1000, [50]) == set(steps)
    assert steps != list(range(0, 1000, 20))


def test_space_timesteps_sections_and_ddim():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    assert sum(s < 100 for s in steps) == 10 and sum(100 <= s < 200 for s in steps) == 15
    assert steps[0] == 0 and steps[-1] == 299
    assert len(space_timesteps(1000, "250")) == 250
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


@pytest.mark.parametrize("respacing", ["50", 250, "ddim25"])
def test_respaced_betas_reproduce_alphas_cumprod(respacing):
    spaced = create_diffusion(respacing)
    kept = sorted(space_timesteps(1000, respacing))
    assert spaced.timestep_map == kept and spaced.num_timesteps == len(kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, DIFF.alphas_cumprod[kept], rtol=1e-12)
    assert spaced.betas.dtype == np.float64


def test_full_respacing_is_the_original_process():
    spaced = create_diffusion("1000")
    np.testing.assert_allclose(spaced.betas, DIFF.betas, rtol=1e-10)


def test_respaced_model_gets_original_timesteps():
    spaced = create_diffusion(10)
    rec = Recorder()
    x = images(10)
    idx = torch.arange(10)
    spaced.p_mean_variance(rec, x, idx)
    spaced.training_losses(rec, x, idx.flip(0))
    assert rec.calls[0].tolist() == spaced.timestep_map
    assert rec.calls[1].tolist() == spaced.timestep_map[::-1]
    spaced.p_sample_loop(rec, (1, 3, 4, 4))
    assert [c.item() for c in rec.calls[2:]] == spaced.timestep_map[::-1]
    assert spaced.timestep_map[-1] == 999


# ---- losses -------------------------------------------------------------------------------

def test_normal_kl_and_discretized_likelihood():
    m, lv = torch.randn((2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(5), atol=1e-6)
    # KL(N(0,1) || N(1, e^2)) = log(e) + (1 + 1)/(2 e^2) - 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(2.0))
    assert kl.item() == pytest.approx(1 + 1 / math.exp(2) - 0.5, rel=1e-6)
    # the 256 pixel values of an 8-bit image form a probability distribution
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, -3.0), (0.9, -1.0), (-0.3, -5.0)]:
        logp = discretized_gaussian_log_likelihood(values, torch.full_like(values, mean),
                                                   torch.full_like(values, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-3)


def test_true_noise_beats_zero_output():
    x0 = images(8)
    t = torch.tensor([0, 1, 5, 50, 200, 500, 800, 999])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    good = DIFF.training_losses(NoiseOracle(noise), x0, t, noise=noise)
    bad = DIFF.training_losses(NoiseOracle(None), x0, t, noise=noise)
    for key in ("loss", "mse", "vb"):
        assert good[key].shape == (8,) and torch.isfinite(good[key]).all()
    assert torch.allclose(good["mse"], torch.zeros(8))
    assert (good["loss"] < bad["loss"]).all()
    assert good["loss"].mean() < bad["loss"].mean()
    # with the exact mean, the KL terms reduce to a variance mismatch only: small for t > 0
    assert (good["vb"][1:] < 0.1).all()


def test_vb_trains_only_the_variance():
    x0 = images(4)
    t = torch.tensor([0, 10, 300, 900])
    out = torch.zeros(4, 6, 4, 4, requires_grad=True)
    losses = DIFF.training_losses(lambda x, tt: out * 1.0 + 0.1, x0, t)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert (grad_vb[:, :3] == 0).all() and grad_vb[:, 3:].abs().sum() > 0
    assert (grad_mse[:, 3:] == 0).all() and grad_mse[:, :3].abs().sum() > 0


def test_respaced_vb_is_scaled_like_improved_diffusion():
    # improved-diffusion's RESCALED_MSE: one vb term times T/1000 (lambda = 1e-3 on T terms)
    spaced = create_diffusion("100")
    x0, model = images(2), NoiseOracle(None, v=0.3)
    t = torch.tensor([0, 60])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    vb = spaced.training_losses(model, x0, t, noise=noise)["vb"]
    x_t = spaced.q_sample(x0, t, noise)
    term = spaced._vb_terms_bpd(model(x_t, t), x0, x_t, t)
    torch.testing.assert_close(vb, term * 100 / 1000)
    assert (term > 0).all()


# ---- one-step estimate and sampling ---------------------------------------------------------

def test_predict_x0_one_step_with_true_noise_is_exact():
    x0 = images(5)
    t = torch.tensor([0, 1, 250, 700, 999])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    x0_hat = predict_x0_one_step(NoiseOracle(noise), x0, t, noise)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=0)
    # zero noise prediction: x0_hat = x_t / sqrt(abar_t)
    x0_zero = predict_x0_one_step(NoiseOracle(None), x0, t, noise)
    abar = torch.tensor(DIFF.alphas_cumprod[t.numpy()]).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x0_zero, x0 + ((1 - abar) / abar).sqrt() * noise, atol=1e-3, rtol=1e-4)


def test_p_sample_loop_is_reproducible():
    model = TinyNet().eval()
    spaced = create_diffusion(10)
    shape = (2, 3, 4, 4)
    a = spaced.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(0))
    b = spaced.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(0))
    c = spaced.p_sample_loop(model, shape, generator=torch.Generator().manual_seed(1))
    assert a.shape == shape and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = sample(model, shape, num_steps=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, d)


def test_p_sample_loop_from_given_noise_with_a_perfect_denoiser_reaches_the_image():
    # A model that knows the single training image predicts the exact eps at every step, so the
    # ancestral chain collapses onto that image (up to the final, tiny-variance step).
    target = images(1)
    spaced = create_diffusion(20)

    def oracle(x, t):
        abar = torch.tensor(DIFF.alphas_cumprod[t.numpy()]).float().view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * target) / (1 - abar).sqrt()
        return torch.cat([eps, -torch.ones_like(x)], dim=1)

    x_T = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    out = spaced.p_sample_loop(oracle, target.shape, noise=x_T, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=0.05, rtol=0)
