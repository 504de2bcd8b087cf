"""Timing of one attention layer on CPU: neighborhood windows vs global attention."""

import time

import torch

from ditsweep.models.attention import Attention


def time_attention_layer(window: int | None, grid: int = 32, dim: int = 252, heads: int = 4, batch: int = 4,
                         repeats: int = 3) -> float:
    """Seconds for one forward+backward of one Attention layer (torch backend, CPU), the best of
    `repeats` runs after one warm-up. window=None is global attention."""
    layer = Attention(dim, heads, window=window, backend="torch")
    x = torch.randn(batch, grid * grid, dim, requires_grad=True)
    best = float("inf")
    for i in range(repeats + 1):  # the first run warms up caches and allocators
        layer.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        layer(x, (grid, grid)).square().mean().backward()
        elapsed = time.perf_counter() - start
        if i > 0:
            best = min(best, elapsed)
    return best
