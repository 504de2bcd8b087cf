"""Generated samples: the respaced ancestral sampler on the (EMA) weights, and an image grid."""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditsweep.diffusion import sample


@torch.no_grad()
def generate(model: torch.nn.Module, num_images: int, image_shape: tuple[int, int, int],
             sampling_steps: int, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """`num_images` samples [n, C, H, W] in [-1, 1], from `sampling_steps` respaced steps.

    One seeded generator draws all the noise, so every evaluation of a trial (and every trial of
    a seed) starts from the same noise: successive sample grids are directly comparable.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        noise = torch.randn((n, *image_shape), generator=gen)
        out.append(sample(model, (n, *image_shape), num_steps=sampling_steps, noise=noise.to(device),
                          generator=gen, device=device).cpu())
    model.train(was_training)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, min_width: int = 512) -> None:
    """A near-square grid of images [n, C, H, W] in [-1, 1] with a 1-pixel border between tiles,
    upscaled by a whole factor (nearest) to at least `min_width` pixels, so that 8x8 samples
    are visible at a glance in the MLflow artifact view."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if c == 1:
        u8 = u8.repeat(1, 3, 1, 1)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for i, img in enumerate(u8.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, cols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = img
    image = Image.fromarray(grid)
    scale = max(1, math.ceil(min_width / image.width))
    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST).save(path)
