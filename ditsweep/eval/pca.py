"""Stage 1 of the paper's PCA attention (Appendix C): principal components of attention maps.

The attention maps of a trained DiT's first `blocks` blocks, for test images noised to respaced
steps (10, 25, 40 of 50 in the paper) and every head, are the rows of one matrix per block:
2048 images x 3 steps x 4 heads = 24,576 rows of N^2 = 1,048,576 values at 32x32. The top K = 50
principal components of each come from torch.pca_lowrank when the matrix fits `memory_budget`.
At the paper's size it does not (100 GB per block in float32), so `streaming_pca` runs the same
randomized algorithm (Halko et al., which pca_lowrank implements) with the maps regenerated on
every pass instead of stored: 3 + 2 * niter passes of forward calls, each cheap on a GPU.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ditsweep.diffusion.respace import space_timesteps
from ditsweep.eval.attention import noisy_images

MEMORY_BUDGET = 2 * 2**30  # bytes of maps held at once for torch.pca_lowrank


@dataclass
class Components:
    components: torch.Tensor   # [blocks, K, N, N], the principal components (unit norm)
    singular: torch.Tensor     # [blocks, K] singular values of the centred maps
    explained: torch.Tensor    # [blocks] fraction of the maps' variance the K components hold
    timesteps: list[int]       # the original diffusion timesteps of the respaced steps


def respaced_timesteps(steps: list[int], respaced: int, num_timesteps: int = 1000) -> list[int]:
    """Original timesteps of steps of a `respaced`-step schedule (step 0 = t 0)."""
    kept = sorted(space_timesteps(num_timesteps, respaced))
    bad = [s for s in steps if not 0 <= s < len(kept)]
    if bad:
        raise ValueError(f"respaced steps {bad} are outside 0..{len(kept) - 1}")
    return [kept[s] for s in steps]


def attention_rows(model: torch.nn.Module, images: torch.Tensor, timesteps: list[int], blocks: int,
                   seed: int = 0, batch_size: int = 16) -> Callable[[], Iterator[list[torch.Tensor]]]:
    """A function that yields, pass after pass in the same order, per block the maps of a batch
    as rows [batch * heads, N^2] on the model's device."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def rows() -> Iterator[list[torch.Tensor]]:
        for t in timesteps:
            x_t = noisy_images(images.cpu(), t, seed)  # fixed noise per (seed, t)
            for start in range(0, len(images), batch_size):
                x = x_t[start:start + batch_size].to(device)
                _, maps = model(x, torch.full((len(x),), t, dtype=torch.long, device=device),
                                return_attention=True)
                yield [m.float().reshape(-1, m.shape[-1] ** 2) for m in maps[:blocks]]
    return rows


def streaming_pca(rows: Callable[[], Iterator[list[torch.Tensor]]], q: int, niter: int = 2,
                  oversample: int = 10, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Per block (V [dim, q], S [q], total variance) of the centred row matrix A, by the
    randomized range finder with `niter` power iterations, never holding A."""
    def each(fn):  # one pass: fn(block, rows, row offset) for every batch
        offset = 0
        for batch in rows():
            for b, a in enumerate(batch):
                fn(b, a, offset)
            offset += len(batch[0])

    n_rows, sums = [0], []

    def mean_pass(b, a, offset):
        if b == len(sums):
            sums.append(torch.zeros(a.shape[1], dtype=torch.float64, device=a.device))
        sums[b] += a.sum(0, dtype=torch.float64)
        if b == 0:
            n_rows[0] += len(a)
    each(mean_pass)
    m = n_rows[0]
    mean = [(s / m).float() for s in sums]
    gen = torch.Generator().manual_seed(seed)
    k = q + oversample
    omega = [torch.randn(len(mu), k, generator=gen).to(mu.device) for mu in mean]

    def times(mats):  # Y_b = (A_b - 1 mu^T) M  for M [dim, k], stacked over rows
        ys = [[] for _ in mats]
        each(lambda b, a, _: ys[b].append(a @ mats[b] - mean[b] @ mats[b]))
        return [torch.linalg.qr(torch.cat(y)).Q for y in ys]

    def transposed_times(qs):  # (A - 1 mu^T)^T Q  [dim, k]
        zs = [torch.zeros(len(mu), k, device=mu.device) for mu in mean]

        def add(b, a, offset):
            zs[b] += a.T @ qs[b][offset:offset + len(a)]
        each(add)
        return [z - mu[:, None] * qb.sum(0)[None] for z, mu, qb in zip(zs, mean, qs)]

    qs = times(omega)
    for _ in range(niter):
        qs = times([torch.linalg.qr(z).Q for z in transposed_times(qs)])
    bt = transposed_times(qs)  # B^T = (A - 1 mu^T)^T Q: [dim, k]
    totals = [0.0] * len(mean)

    def total(b, a, _):
        totals[b] += float(((a - mean[b]) ** 2).sum())
    each(total)
    out = []
    for b, mat in enumerate(bt):
        v, s, _ = torch.linalg.svd(mat, full_matrices=False)  # B^T = V S W^T
        out.append((v[:, :q], s[:q], totals[b]))
    return out


def attention_components(model: torch.nn.Module, images: torch.Tensor, steps: list[int],
                         respaced: int, blocks: int, k: int, seed: int = 0, batch_size: int = 16,
                         memory_budget: int = MEMORY_BUDGET) -> Components:
    """The top `k` principal components of each of the first `blocks` blocks' attention maps
    over `images` [B, C, H, W] in [-1, 1] at the respaced `steps`."""
    timesteps = respaced_timesteps(steps, respaced)
    rows = attention_rows(model, images, timesteps, blocks, seed, batch_size)
    heads, n = model.num_heads, model.grid[0] * model.grid[1]
    m = len(images) * len(timesteps) * heads
    if min(m, n * n) < k:
        raise ValueError(f"{k} principal components need at least {k} maps, not {m}")
    if m * n * n * 4 * blocks <= memory_budget:
        per_block = [torch.cat(parts) for parts in zip(*rows())]
        found = []
        for a in per_block:
            torch.manual_seed(seed)  # pca_lowrank draws its random projection from the global RNG
            _, s, v = torch.pca_lowrank(a, q=min(k + 10, *a.shape), center=True, niter=2)
            found.append((v[:, :k], s[:k], float(((a - a.mean(0)) ** 2).sum())))
    else:
        found = streaming_pca(rows, k, seed=seed)
    comps = torch.stack([v.T.reshape(k, n, n) for v, _, _ in found]).cpu()
    singular = torch.stack([s for _, s, _ in found]).cpu()
    explained = torch.tensor([float((s ** 2).sum()) / max(t, 1e-30) for _, s, t in found])
    return Components(comps, singular, explained, timesteps)


def save(found: Components, path: str | Path, source: str = "") -> None:
    torch.save({"components": found.components, "singular": found.singular,
                "explained": found.explained, "timesteps": found.timesteps, "source": source}, path)


def load(path: str | Path) -> torch.Tensor:
    """The [blocks, K, N, N] components of a stage-1 artifact."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["components"]


def plot_components(found: Components, title: str, path: str | Path, count: int = 8) -> None:
    """Fig. 13: the leading components of each block, log-normalised magnitude."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks, k = found.components.shape[:2]
    count = min(count, k)
    fig, axes = plt.subplots(blocks, count, figsize=(1.6 * count, 1.7 * blocks + 0.5), squeeze=False)
    for b in range(blocks):
        for i in range(count):
            ax = axes[b, i]
            ax.imshow(torch.log1p(found.components[b, i].abs() * 1e3).numpy(), cmap="viridis")
            ax.set_title(f"block {b + 1} PC {i + 1}\nσ={found.singular[b, i]:.3g}", fontsize=6)
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
