"""PSNR gap on hand-built denoisers whose errors are known exactly."""

import math

import numpy as np
import torch

from ditsweep.diffusion import create_diffusion, space_timesteps
from ditsweep.eval.psnr_gap import MIN_MSE, psnr_from_mse, psnr_gap

ABAR = torch.tensor(create_diffusion().alphas_cumprod, dtype=torch.float64)


class Memoriser(torch.nn.Module):
    """Knows its training images: finds the nearest one to x_t and returns the noise that leads
    there, plus an optional constant offset. A perfect memoriser on train, wrong on test."""

    def __init__(self, images: torch.Tensor, offset: float = 0.0):
        super().__init__()
        self.images = images
        self.offset = offset
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        a = ABAR[t].float().view(-1, 1, 1, 1)
        scaled = a.sqrt().unsqueeze(1) * self.images.unsqueeze(0)         # [B, K, C, H, W]
        nearest = ((x.unsqueeze(1) - scaled) ** 2).flatten(2).sum(-1).argmin(1)
        eps = (x - a.sqrt() * self.images[nearest]) / (1 - a).sqrt()
        return torch.cat([eps + self.offset, torch.zeros_like(x)], dim=1)


def test_psnr_of_a_known_mse():
    assert psnr_from_mse(0.04) == 20.0           # 10 log10(2^2 / 0.04)
    assert math.isclose(psnr_from_mse(4.0), 0.0)
    assert psnr_from_mse(0.0) == psnr_from_mse(MIN_MSE) > 100  # clipped, not infinite


def test_timesteps_are_the_respaced_fifty():
    result_steps = sorted(space_timesteps(1000, "50"))
    assert result_steps[:5] == [0, 20, 41, 61, 82] and result_steps[-2:] == [979, 999]


def test_memoriser_has_perfect_train_psnr_and_a_large_gap():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand((6, 3, 4, 4), generator=gen) * 2 - 1
    test = torch.rand((6, 3, 4, 4), generator=gen) * 2 - 1
    result = psnr_gap(Memoriser(train), train, test, num_steps=10, seed=0)
    assert len(result.timesteps) == 10
    # low noise: the memoriser finds the right image, so the error is 0 and PSNR is clipped;
    # at high noise it picks wrong images, on train and test alike
    assert result.psnr_train[:4] == [psnr_from_mse(0.0)] * 4
    assert result.psnr_test[0] < result.psnr_train[0] - 20
    assert result.mean_gap > 10
    assert all(g >= 0 for g in result.gap)


def test_known_offset_gives_the_known_psnr():
    # eps_hat = eps + d  =>  x0_hat - x0 = -sqrt((1 - abar)/abar) d  =>  MSE = (1 - abar)/abar d^2
    gen = torch.Generator().manual_seed(1)
    train = torch.rand((5, 3, 4, 4), generator=gen) * 2 - 1
    d = 0.1
    result = psnr_gap(Memoriser(train, offset=d), train, train, num_steps=5, seed=3)
    for t, p in zip(result.timesteps[:2], result.psnr_train[:2]):  # low t: nearest is right
        a = float(ABAR[t])
        expected = 10 * np.log10(4.0 / ((1 - a) / a * d * d))
        assert abs(p - expected) < 1e-3, (t, p, expected)
    assert result.gap == [0.0] * 5  # same images on both sides: no gap


def test_same_seed_same_noise():
    gen = torch.Generator().manual_seed(2)
    images = torch.rand((4, 3, 4, 4), generator=gen) * 2 - 1
    model = Memoriser(images[:2], offset=0.05)
    a = psnr_gap(model, images[:2], images[2:], num_steps=4, seed=7)
    b = psnr_gap(model, images[:2], images[2:], num_steps=4, seed=7)
    assert a == b


def test_bf16_autocast_gap_is_within_a_hundredth_of_a_db_of_fp32():
    """The CUDA evaluators' bf16 path, checked with CPU autocast: a tiny DiT trained to memorise
    4 images (a real gap of ~0.5 dB) gives the same mean gap to 0.01 dB, while the network really
    ran in bf16 (the PSNRs are not bit-equal)."""
    from conftest import trial

    from ditsweep.data import load_split, to_model_range
    from ditsweep.train.loop import Trainer

    train_u8, test_u8 = load_split("builtin:photos", 8, 4, 4)
    train, test = to_model_range(train_u8), to_model_range(test_u8)
    trainer = Trainer(trial(train__lr=3e-3, train__ema_decay=0.0, train__steps=60), train)
    for _ in range(60):
        trainer.train_step()
    model = trainer.ema.eval()
    fp32 = psnr_gap(model, train, test, num_steps=10)
    bf16 = psnr_gap(model, train, test, num_steps=10, bf16=True)
    assert fp32.mean_gap > 0.1  # something to compare
    assert abs(bf16.mean_gap - fp32.mean_gap) < 0.01
    both = zip(fp32.psnr_train + fp32.psnr_test, bf16.psnr_train + bf16.psnr_test)
    diffs = [abs(a - b) for a, b in both]
    assert max(diffs) < 0.1 and max(diffs) > 0  # bf16 rounding is visible, and small
