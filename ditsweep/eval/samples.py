"""Generated samples: the respaced ancestral sampler on the (EMA) weights, and an image grid.

`generate` samples one model; `generate_fused` samples k models of one architecture at once
through models.fused.fuse (one batched network call per step for all members, as FID of a fused
group needs), each member drawing from its own seeded generator exactly the noise `generate`
would draw for it alone. `bf16=True` runs the network under bfloat16 autocast (CUDA evaluators
with eval.precision: bf16); the sampler's arithmetic stays float32.
"""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditsweep.diffusion import sample
from ditsweep.models.fused import fuse


@torch.no_grad()
def generate(model: torch.nn.Module, num_images: int, image_shape: tuple[int, int, int],
             sampling_steps: int, seed: int = 0, batch_size: int = 256, bf16: bool = False) -> torch.Tensor:
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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(sample(model, (n, *image_shape), num_steps=sampling_steps, noise=noise.to(device),
                              generator=gen, device=device).cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def generate_fused(models: list[torch.nn.Module], num_images: int, image_shape: tuple[int, int, int],
                   sampling_steps: int, seeds: list[int], batch_size: int = 256, bf16: bool = False,
                   fused: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """`generate` for k models of one architecture at once: member i's samples [n, C, H, W] are
    those `generate(models[i], ..., seed=seeds[i], batch_size=batch_size)` returns, to float
    rounding. Each member keeps its own CPU generator and draws the same noise in the same order
    (a batch's starting noise, then one draw per step), so only the batched network differs.

    `batch_size` is per member: the network sees k * batch_size images per call. `fused`: an
    already fused model of `models` (e.g. a FusedTrainer's EMA), else they are fused here.
    """
    k = len(models)
    if len(seeds) != k:
        raise ValueError(f"{k} models but {len(seeds)} seeds")
    net = fused if fused is not None else fuse(models)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)

        def draw() -> torch.Tensor:  # [k*n, C, H, W]: each member's noise from its own generator
            return torch.cat([torch.randn((n, *image_shape), generator=g) for g in gens]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = sample(net, (k * n, *image_shape), num_steps=sampling_steps, noise=draw(),
                       device=device, step_noise=draw)
        for m, chunk in enumerate(x.cpu().split(n)):
            out[m].append(chunk)
    net.train(was_training)
    return [torch.cat(chunks) for chunks in out]


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
