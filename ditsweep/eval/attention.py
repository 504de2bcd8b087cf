"""Attention maps of a DiT and how local they are (the paper's Sec. 3, Fig. 4).

For a batch of training images noised to chosen timesteps, every block's attention probabilities
softmax(QK^T / sqrt(d)) are taken as dense [B, heads, N, N] maps, for global and neighborhood
blocks alike. Per block, three locality numbers, averaged over queries, heads, images and
timesteps:

- mean attention distance: sum over keys of p * (euclidean distance on the token grid), in tokens;
- attention mass inside the 3x3 and the 7x7 neighbourhood of the query. The window follows
  NATTEN's definition (clamped inward at the borders, so every query has exactly k*k keys), the
  same windows a local block of size k uses: a k-local block has mass_k = 1 exactly, and
  uniform attention has mass_k = k*k / N at every query.

UNets have no token-grid attention of this kind and are skipped.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ditsweep.diffusion import create_diffusion
from ditsweep.models.attention import window_starts

MASS_WINDOWS = (3, 7)


@dataclass
class AttentionResult:
    locality: list[dict[str, float]]         # per block: distance, mass3, mass7
    examples: dict[int, list[torch.Tensor]]  # timestep -> per block, maps [1, heads, N, N] of image 0


@torch.no_grad()
def measure(model: torch.nn.Module, images: torch.Tensor, timesteps: list[int], seed: int = 0,
            chunk: int = 2) -> AttentionResult:
    """Locality of every block over `images` [B, C, H, W] in [-1, 1] noised to each timestep
    (fixed noise per seed), and the maps of the first image for the figures.

    Images go through the model `chunk` at a time: dense maps of every block for a 32x32 grid
    take 4 MB per head and image, so a whole batch at once would not fit comfortably.
    """
    sums: list[dict[str, float]] = []
    examples = {}
    for t in timesteps:
        x_t = noisy_images(images, t, seed)
        for start in range(0, len(images), chunk):
            maps = attention_maps(model, x_t[start:start + chunk], t)
            if start == 0:
                examples[t] = [m[:1] for m in maps]
            for layer, m in enumerate(maps):
                if len(sums) <= layer:
                    sums.append(dict.fromkeys(("distance",) + tuple(f"mass{k}" for k in MASS_WINDOWS), 0.0))
                for key, value in locality(m, model.grid).items():
                    sums[layer][key] += value * len(m)  # weighted by images in the chunk
    total = len(images) * len(timesteps)
    return AttentionResult([{k: v / total for k, v in layer.items()} for layer in sums], examples)


def noisy_images(images: torch.Tensor, timestep: int, seed: int = 0) -> torch.Tensor:
    """x_t = q_sample(images, t) with noise that depends only on (seed, timestep)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + timestep)
    noise = torch.randn(images.shape, generator=gen)
    t = torch.full((len(images),), timestep, dtype=torch.long)
    return create_diffusion().q_sample(images, t, noise=noise)


@torch.no_grad()
def attention_maps(model: torch.nn.Module, x_t: torch.Tensor, timestep: int) -> list[torch.Tensor]:
    """Per block, the attention map [B, heads, N, N] of the noisy inputs x_t at `timestep`."""
    device = next(model.parameters()).device
    t = torch.full((len(x_t),), timestep, dtype=torch.long, device=device)
    _, maps = model(x_t.to(device), t, return_attention=True)
    return [m.float().cpu() for m in maps]


@functools.lru_cache(maxsize=16)
def token_distances(grid: tuple[int, int]) -> torch.Tensor:
    """[N, N] euclidean distances between the positions of the tokens of a row-major grid."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).float()
    return torch.cdist(pos, pos)


@functools.lru_cache(maxsize=32)
def window_mask(grid: tuple[int, int], kernel_size: int) -> torch.Tensor:
    """[N, N] bool: key j lies in query i's clamped k x k window (the whole axis if k exceeds it)."""
    def axis(length: int) -> torch.Tensor:
        k = min(kernel_size, length)
        start = window_starts(length, k)[:, None]
        keys = torch.arange(length)[None, :]
        return (keys >= start) & (keys < start + k)  # [L queries, L keys]
    rows, cols = axis(grid[0]), axis(grid[1])
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(grid[0] * grid[1], -1)


def locality(attn: torch.Tensor, grid: tuple[int, int]) -> dict[str, float]:
    """Locality of one block's maps [..., N, N]: {"distance", "mass3", "mass7"}, each averaged
    over queries and every leading dimension (images, heads)."""
    attn = attn.float()
    result = {"distance": (attn * token_distances(grid)).sum(-1).mean().item()}
    for k in MASS_WINDOWS:
        result[f"mass{k}"] = (attn * window_mask(grid, k)).sum(-1).mean().item()
    return result


def plot_attention_maps(maps: list[torch.Tensor], layout: list, title: str, path: str | Path) -> None:
    """Fig. 4 style: one column per block, one row per head, the N x N map of the first image.

    As in the paper, each map is normalised linearly to [0, 1] and the colormap covers [0, 0.1]
    (larger values are clipped), so that the weak off-diagonal structure stays visible.
    """
    plt = _pyplot()
    heads = maps[0].shape[1]
    fig, axes = plt.subplots(heads, len(maps), figsize=(1.7 * len(maps), 1.7 * heads + 0.5),
                             squeeze=False)
    for layer, m in enumerate(maps):
        for h in range(heads):
            a = m[0, h]
            a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
            ax = axes[h, layer]
            ax.imshow(a.numpy(), cmap="viridis", vmin=0.0, vmax=0.1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_title(f"layer {layer + 1} ({_window_name(layout, layer)})", fontsize=8)
            if layer == 0:
                ax.set_ylabel(f"head {h + 1}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_query_attention(maps: list[torch.Tensor], grid: tuple[int, int], layout: list, title: str,
                         path: str | Path, query: tuple[int, int] | None = None) -> None:
    """One query token's attention (a row of each map, averaged over heads) reshaped to the
    H x W grid, one panel per block; the query is outlined (the paper's pink/blue boxes)."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    qr, qc = query if query is not None else (grid[0] // 2, grid[1] // 2)
    q = qr * grid[1] + qc
    fig, axes = plt.subplots(1, len(maps), figsize=(1.8 * len(maps), 2.3), squeeze=False)
    for layer, m in enumerate(maps):
        row = m[0, :, q, :].mean(0).reshape(grid)
        ax = axes[0, layer]
        ax.imshow(row.numpy(), cmap="viridis", interpolation="nearest")
        ax.add_patch(Rectangle((qc - 0.5, qr - 0.5), 1, 1, fill=False, edgecolor="magenta", lw=1.5))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"layer {layer + 1} ({_window_name(layout, layer)})", fontsize=8)
    fig.suptitle(f"{title}: attention of token ({qr}, {qc})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _window_name(layout: list, layer: int) -> str:
    window = layout[layer] if layout is not None and layer < len(layout) else None
    return "global" if window is None else f"{window}x{window}"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: evaluation actors have no display
    import matplotlib.pyplot as plt
    return plt
