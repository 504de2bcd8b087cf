"""Eigenvectors of the denoiser's Jacobian (the paper's Fig. 3, after Kadkhodaie et al. 2024).

For one training image x0 noised to x_t at timestep t, the Jacobian of the one-step denoiser
x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t) with respect to x_t.
It is an affine function of the paper's d eps_theta / d x (Eq. 6), J = (I - sqrt(1-abar) d eps/dx)
/ sqrt(abar), so the eigenvectors are the same; the eigenvalues are on the denoiser's scale,
where Kadkhodaie et al. read them as shrinkage factors (about 1: kept, about 0: removed).

The Jacobian is not symmetric in general. We decompose its symmetric part (J + J^T) / 2 with
`torch.linalg.eigh`, which gives real eigenvalues and orthonormal eigenvectors that can be shown
as images, and report ||J - J^T|| / ||J|| so one can see how much that discards.

Limit: images of at most 16x16 pixels (8x8 and 16x16 are the intended sizes). A C x H x W image
needs D = C*H*W backward passes and a D x D matrix: 192 at 8x8, 768 at 16x16 RGB; at 32x32 it
would be 3072 passes per timestep, too slow for an evaluation job on a CPU.
"""

from collections.abc import Callable
from pathlib import Path

import torch

from ditsweep.diffusion import create_diffusion

MAX_RESOLUTION = 16


def check_resolution(height: int, width: int) -> None:
    if max(height, width) > MAX_RESOLUTION:
        raise ValueError(f"Jacobian eigenvectors are computed for images up to {MAX_RESOLUTION}x"
                         f"{MAX_RESOLUTION} only (8x8: 192 and 16x16: 768 RGB dimensions), not "
                         f"{height}x{width}; set eval.jacobian.enabled: false for this sweep")


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """[D_out, D_in] Jacobian of fn at one input x (any shape, no batch dimension).

    fn maps a batch [B, *x.shape] to a batch of outputs and must treat batch items independently
    (true for DiT and UNet: LayerNorm and GroupNorm are per image). Rows are computed `chunk` at
    a time: B copies of x go through fn once, and the gradient of output i_b of copy b is row
    i_b. That is one forward and one backward pass per chunk instead of per row.
    """
    x = x.detach()
    d_in = x.numel()
    d_out = fn(x[None]).numel()
    rows = []
    for start in range(0, d_out, chunk):
        index = torch.arange(start, min(start + chunk, d_out), device=x.device)
        xb = x.expand(len(index), *x.shape).clone().requires_grad_(True)
        out = fn(xb).reshape(len(index), d_out)
        (grad,) = torch.autograd.grad(out.gather(1, index[:, None]).sum(), xb)
        rows.append(grad.reshape(len(index), d_in).detach())
    return torch.cat(rows).float()


def denoiser_jacobian(model: torch.nn.Module, x0: torch.Tensor, timestep: int, seed: int = 0,
                      chunk: int = 64) -> torch.Tensor:
    """Jacobian [D, D] of x0_hat with respect to x_t, for one image x0 [C, H, W] in [-1, 1]
    noised to `timestep` with noise drawn from `seed`."""
    check_resolution(*x0.shape[-2:])
    device = next(model.parameters()).device
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
        return jacobian(x0_hat, x_t, chunk=chunk).cpu()
    finally:
        model.train(was_training)


def eigendecomposition(jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the symmetric part of `jac`."""
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
