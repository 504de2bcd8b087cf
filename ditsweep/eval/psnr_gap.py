"""PSNR gap (Kadkhodaie et al. 2024), as in the paper's Eq. 4.

For K train and K test images and each of S respaced timesteps t: noise x0 to x_t with fixed
noise, predict eps, denoise in one step, and compare with x0. The MSE is averaged over the K
images FIRST, then PSNR(t) = 10 log10(M^2 / mean MSE) with M = 2 for images in [-1, 1].
Gap(t) = max(PSNR_train(t) - PSNR_test(t), 0); a large gap means the model memorised.

`bf16=True` runs the denoiser under bfloat16 autocast (CUDA evaluators with eval.precision: bf16);
the noise, x_t, x0_hat and the MSE stay float32, so only the network's matmuls round to bf16.
On a tiny DiT the gap then stays within 0.01 dB of float32 (tests/test_psnr_gap.py).
"""

from dataclasses import dataclass

import numpy as np
import torch

from ditsweep.diffusion import predict_x0_one_step, space_timesteps

PIXEL_RANGE = 2.0   # M: images live in [-1, 1]
MIN_MSE = 1e-10     # a perfect denoiser gives MSE 0; clip PSNR at 10 log10(4 / 1e-10) ~ 106 dB


@dataclass
class PsnrGap:
    timesteps: list[int]       # original diffusion timesteps, ascending
    psnr_train: list[float]
    psnr_test: list[float]
    gap: list[float]

    @property
    def mean_gap(self) -> float:
        return float(np.mean(self.gap))


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error on images in [-1, 1]."""
    return float(10.0 * np.log10(PIXEL_RANGE**2 / max(mse, MIN_MSE)))


@torch.no_grad()
def mean_denoising_mse(model: torch.nn.Module, images: torch.Tensor, timesteps: list[int],
                       seed: int, batch_size: int = 256, bf16: bool = False) -> list[float]:
    """Per timestep, the MSE between x0 and its one-step estimate, averaged over all images.

    The noise depends only on (seed, timestep, image index), so train and test sets, and every
    model of a sweep, are measured with the same noise. The sums stay on the device and are read
    once at the end (one host sync per call, not per batch).
    """
    device = next(model.parameters()).device
    totals = torch.zeros(len(timesteps), dtype=torch.float64, device=device)
    images = images.float()
    for j, t in enumerate(timesteps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
        noise = torch.randn(images.shape, generator=gen)
        for i in range(0, len(images), batch_size):
            x0 = images[i:i + batch_size].to(device)                       # [b, C, H, W]
            tt = torch.full((len(x0),), t, dtype=torch.long, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                x0_hat = predict_x0_one_step(model, x0, tt, noise[i:i + batch_size].to(device))
            totals[j] += ((x0_hat.float() - x0) ** 2).flatten(1).mean(1).double().sum()
    return (totals / len(images)).tolist()


def psnr_gap(model: torch.nn.Module, train_images: torch.Tensor, test_images: torch.Tensor,
             num_steps: int = 50, seed: int = 0, batch_size: int = 256, bf16: bool = False) -> PsnrGap:
    """PSNR of one-step denoising on train vs test images at `num_steps` respaced timesteps.

    Images are float tensors [K, C, H, W] in [-1, 1]. `bf16`: the denoiser under bf16 autocast.
    """
    was_training = model.training
    model.eval()
    timesteps = sorted(space_timesteps(1000, str(num_steps)))
    train = [psnr_from_mse(m) for m in mean_denoising_mse(model, train_images, timesteps, seed, batch_size, bf16)]
    test = [psnr_from_mse(m) for m in mean_denoising_mse(model, test_images, timesteps, seed, batch_size, bf16)]
    model.train(was_training)
    gap = [max(a - b, 0.0) for a, b in zip(train, test)]
    return PsnrGap(timesteps, train, test, gap)


def plot_psnr_gap(result: PsnrGap, title: str, path: str) -> None:
    """Two panels in the manner of the paper's Fig. 2: PSNR train/test, and the gap, against t."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(result.timesteps, result.psnr_train, label="train")
    left.plot(result.timesteps, result.psnr_test, label="test")
    left.set(xlabel="timestep t", ylabel="PSNR (dB)", title="one-step denoising")
    left.legend()
    right.plot(result.timesteps, result.gap, color="tab:red")
    right.set(xlabel="timestep t", ylabel="gap (dB)", title=f"PSNR gap, mean {result.mean_gap:.2f} dB")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
