"""Eigenvectors of the denoiser's Jacobian (the paper's Fig. 3, after Kadkhodaie et al. 2024).

For one training image x0 noised to x_t at timestep t, the Jacobian of the one-step denoiser
x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t) with respect to x_t.
It is an affine function of the paper's d eps_theta / d x (Eq. 6), J = (I - sqrt(1-abar) d eps/dx)
/ sqrt(abar), so the eigenvectors are the same; the eigenvalues are on the denoiser's scale,
where Kadkhodaie et al. read them as shrinkage factors (about 1: kept, about 0: removed).

The Jacobian is not symmetric in general. We decompose its symmetric part (J + J^T) / 2 with
`torch.linalg.eigh`, which gives real eigenvalues and orthonormal eigenvectors that can be shown
as images, and report ||J - J^T|| / ||J|| so one can see how much that discards.

Size: a C x H x W image needs D = C*H*W rows and a D x D matrix: 192 at 8x8, 768 at 16x16 and
3072 at 32x32 RGB. On a CPU, 32x32 is too slow for an evaluation job; the sweep schema refuses
it there (spec.JACOBIAN_CPU_MAX_RESOLUTION, checked when the sweep is loaded). On a GPU the rows
go `chunk` copies of the image per backward pass, with the chunk chosen from the free memory
(`auto_chunk`, halved again on an out-of-memory error), and `eigh` runs on the GPU.
"""

from collections.abc import Callable
from pathlib import Path

import torch

from ditsweep.diffusion import create_diffusion

MAX_CPU_RESOLUTION = 16
CPU_CHUNK = 64
MEMORY_FRACTION = 0.6  # of the free GPU memory one chunk may take (activations of B copies)


def check_resolution(height: int, width: int, device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cpu" and max(height, width) > MAX_CPU_RESOLUTION:
        raise ValueError(f"Jacobian eigenvectors on a CPU are computed for images up to "
                         f"{MAX_CPU_RESOLUTION}x{MAX_CPU_RESOLUTION} only (8x8: 192 and 16x16: 768 "
                         f"RGB dimensions), not {height}x{width}; use GPU evaluators "
                         "(eval.actors.gpus) or set eval.jacobian.enabled: false")


def chunk_for_memory(bytes_per_row: float, free_bytes: float, rows: int,
                     fraction: float = MEMORY_FRACTION) -> int:
    """Rows per backward pass that fit `fraction` of the free memory, between 1 and `rows`."""
    return int(max(1, min(rows, fraction * free_bytes // max(bytes_per_row, 1.0))))


def auto_chunk(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, probe: int = 8) -> int:
    """The chunk size for `jacobian(fn, x)`: on CUDA from the peak memory of one probe pass of
    `probe` rows and the free memory; on a CPU a fixed 64."""
    rows = fn(x[None].detach()).numel()
    if x.device.type != "cuda":
        return min(CPU_CHUNK, rows)
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    base = torch.cuda.memory_allocated(x.device)
    _rows(fn, x, torch.arange(min(probe, rows), device=x.device), rows)
    per_row = (torch.cuda.max_memory_allocated(x.device) - base) / min(probe, rows)
    free, _ = torch.cuda.mem_get_info(x.device)
    return chunk_for_memory(per_row, free, rows)


def _rows(fn, x: torch.Tensor, index: torch.Tensor, d_out: int) -> torch.Tensor:
    """Rows `index` of the Jacobian: len(index) copies of x in one forward and backward pass."""
    xb = x.expand(len(index), *x.shape).clone().requires_grad_(True)
    out = fn(xb).reshape(len(index), d_out)
    (grad,) = torch.autograd.grad(out.gather(1, index[:, None]).sum(), xb)
    return grad.reshape(len(index), -1).detach()


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             chunk: int | None = CPU_CHUNK) -> torch.Tensor:
    """[D_out, D_in] Jacobian of fn at one input x (any shape, no batch dimension).

    fn maps a batch [B, *x.shape] to a batch of outputs and must treat batch items independently
    (true for DiT and UNet: LayerNorm and GroupNorm are per image). Rows are computed `chunk` at
    a time: B copies of x go through fn once, and the gradient of output i_b of copy b is row
    i_b. That is one forward and one backward pass per chunk instead of per row.

    chunk=None picks it from the free memory (`auto_chunk`). A chunk that runs out of GPU memory
    is halved and retried, so a first guess that was too large costs one pass, not the job.
    """
    x = x.detach()
    d_out = fn(x[None]).numel()
    chunk = chunk or auto_chunk(fn, x)
    rows, start = [], 0
    while start < d_out:
        index = torch.arange(start, min(start + chunk, d_out), device=x.device)
        try:
            rows.append(_rows(fn, x, index, d_out))
        except torch.cuda.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            torch.cuda.empty_cache()
            continue
        start += len(index)
    return torch.cat(rows).float()


def denoiser_jacobian(model: torch.nn.Module, x0: torch.Tensor, timestep: int, seed: int = 0,
                      chunk: int | None = CPU_CHUNK) -> torch.Tensor:
    """Jacobian [D, D] of x0_hat with respect to x_t, for one image x0 [C, H, W] in [-1, 1]
    noised to `timestep` with noise drawn from `seed`; on the model's device (None: chunk from
    the free memory)."""
    device = next(model.parameters()).device
    check_resolution(*x0.shape[-2:], device)
    diffusion = create_diffusion()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + timestep))
    t1 = torch.tensor([timestep])
    x_t = diffusion.q_sample(x0[None], t1, noise=noise[None])[0].to(device)

    def x0_hat(x: torch.Tensor) -> torch.Tensor:
        t = torch.full((len(x),), timestep, dtype=torch.long, device=x.device)
        eps = model(x, t)[:, : x.shape[1]].float()
        return diffusion.predict_xstart_from_eps(x, t, eps)

    was_training = model.training
    model.eval()
    try:
        return jacobian(x0_hat, x_t, chunk=chunk)
    finally:
        model.train(was_training)


def eigendecomposition(jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the symmetric part of `jac`, on
    the device of `jac` (float64: a 3072 x 3072 eigh takes about a second on a GPU)."""
    sym = 0.5 * (jac + jac.T).double()
    values, vectors = torch.linalg.eigh(sym)  # ascending
    return values.flip(0).float(), vectors.flip(1).float()


def asymmetry(jac: torch.Tensor) -> float:
    """||J - J^T||_F / ||J||_F: 0 for a symmetric Jacobian."""
    return ((jac - jac.T).norm() / jac.norm().clamp_min(1e-12)).item()


def plot_eigenvectors(values: torch.Tensor, vectors: torch.Tensor, shape: tuple[int, int, int],
                      count: int, title: str, path: str | Path) -> None:
    """The leading `count` eigenvectors as split-channel images (R, G, B side by side, as in the
    paper's Figs. 1 and 3), each on a symmetric colour scale, titled with its eigenvalue."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, vectors.shape[1])
    cols = min(count, 4)
    rows = -(-count // cols)
    channels, height, width = shape
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.1 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(count):
        v = vectors[:, k].reshape(shape)
        gap = torch.full((height, 1), float("nan"))
        panel = torch.cat([torch.cat([v[c], gap], dim=1) for c in range(channels)], dim=1)[:, :-1]
        limit = v.abs().max().item() or 1.0
        ax = axes.flat[k]
        ax.imshow(panel.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"$\\lambda_{{{k + 1}}}$ = {values[k].item():.3f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
