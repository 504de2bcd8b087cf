"""Neighborhood attention: NATTEN's definition, gradients, dense maps, and cost."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ditsweep.models.attention import (TILE, Attention, natten_na2d, neighborhood_attention,
                                       neighborhood_index, window_starts)

# NATTEN's CPU forward runs FlexAttention unfused and warns about it.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def qkv(batch, heads, height, width, dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, height * width, dim, generator=g, dtype=dtype) for _ in range(3)]


def to_natten(x, height, width):
    """[B, heads, N, D] -> NATTEN's [B, H, W, heads, D]."""
    B, heads, _, D = x.shape
    return x.transpose(1, 2).reshape(B, height, width, heads, D)


def test_window_starts_are_clamped_not_padded():
    # L=6, k=3: the first and last positions share the window of their inner neighbour.
    assert window_starts(6, 3).tolist() == [0, 0, 1, 2, 3, 3]
    assert window_starts(7, 5).tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert window_starts(5, 5).tolist() == [0] * 5  # as large as the axis: everything


@pytest.mark.parametrize("height,width,k", [(8, 8, 3), (8, 8, 5), (8, 8, 7), (6, 10, 3), (6, 10, 5),
                                            (9, 20, 3), (9, 20, 7)])
def test_matches_natten_forward(height, width, k):
    from natten.functional import na2d
    q, k_, v = qkv(2, 3, height, width, 16)
    ours = neighborhood_attention(q, k_, v, (height, width), k)
    ref = na2d(to_natten(q, height, width), to_natten(k_, height, width), to_natten(v, height, width), k)
    assert (to_natten(ours, height, width) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [5, 7, 9])
def test_window_as_large_as_grid_is_global_attention(size):
    q, k, v = qkv(2, 2, size, size, 8)
    out = neighborhood_attention(q, k, v, (size, size), size)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("grid", [(5, 5), (10, 9)])  # one tile; several tiles with a partial last one
def test_gradcheck(grid):
    height, width = grid
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, height, width, 4 if grid == (5, 5) else 2, torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: neighborhood_attention(q, k, v, grid, 3), (q, k, v))


def test_natten_padded_head_63_matches_cpu_path():
    # DiT-XS/1's head size: NATTEN rejects 63, natten_na2d pads to 64 and keeps 63**-0.5.
    height, width = 8, 8
    q, k, v = qkv(2, 4, height, width, 63)
    ref = neighborhood_attention(q, k, v, (height, width), 5)
    out = natten_na2d(to_natten(q, height, width), to_natten(k, height, width), to_natten(v, height, width), 5)
    assert out.shape == (2, height, width, 4, 63)
    assert (out - to_natten(ref, height, width)).abs().max() <= 1e-5


def test_attention_module_natten_backend_matches_torch_backend():
    torch.manual_seed(0)
    torch_layer = Attention(126, 2, window=3, backend="torch")  # head size 63
    natten_layer = Attention(126, 2, window=3, backend="natten")
    natten_layer.load_state_dict(torch_layer.state_dict())
    x = torch.randn(2, 6 * 10, 126)
    with torch.no_grad():
        assert (natten_layer(x, (6, 10)) - torch_layer(x, (6, 10))).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [None, 3, 5])
def test_attention_maps(window):
    torch.manual_seed(0)
    height, width = 7, 9
    layer = Attention(32, 4, window=window, backend="torch")
    x = torch.randn(2, height * width, 32)
    with torch.no_grad():
        out, attn = layer(x, (height, width), return_attention=True)
        plain = layer(x, (height, width))
    N = height * width
    assert attn.shape == (2, 4, N, N)
    assert (out - plain).abs().max() <= 1e-5  # the map path computes the same attention
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, N), atol=1e-5)
    if window is not None:
        inside = torch.zeros(N, N, dtype=torch.bool)
        inside.scatter_(1, neighborhood_index(height, width, window), True)
        assert attn[..., ~inside].abs().max() == 0
        assert (attn[..., inside] > 0).all()  # exactly k*k keys per query, all of them used
        assert inside.sum(1).eq(window * window).all()


class MaxTensorSize(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_neighborhood_attention_never_builds_n_by_n():
    # 64x64 grid: N*N = 16.8M scores per head; the tiles need N*(TILE+k-1)^2 = 0.4M.
    height = width = 64
    N, k = height * width, 3
    q, k_, v = (t.requires_grad_() for t in qkv(1, 1, height, width, 8))
    with MaxTensorSize() as probe:
        neighborhood_attention(q, k_, v, (height, width), k).sum().backward()
    assert probe.max_numel <= N * (TILE + k - 1) ** 2
    assert probe.max_numel * 40 < N * N


def test_window_must_fit_the_grid():
    q, k, v = qkv(1, 1, 4, 6, 8)
    with pytest.raises(ValueError, match="window 5"):
        neighborhood_attention(q, k, v, (4, 6), 5)


# ---- the GPU paths, checked on CPU (issue 10) ------------------------------------------------

def test_padded_sdpa_equals_unpadded_attention():
    """Head size 63 (DiT-XS/1) padded to 64 with zeros, scale kept at 63**-0.5: the same
    attention. Zero channels add exact zeros to every dot product, so only the summation order
    of the matmul kernels can differ; on this CPU the result is bit-identical, and the bound
    allows a few float32 ulps (values ~1) for kernels that block 64 differently from 63."""
    from ditsweep.models.attention import padded_sdpa
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 8, 8, 63))
    ref = F.scaled_dot_product_attention(q, k, v)
    out = padded_sdpa(q, k, v)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-6
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(grads, ref_grads))
    q64 = q.detach().double()  # float64: differences at the 1e-16 level only
    assert (padded_sdpa(q64, q64, q64) - F.scaled_dot_product_attention(q64, q64, q64)).abs().max() <= 1e-12
    x = torch.randn(2, 4, 16, 64)  # already a multiple of 8: plain SDPA, untouched
    assert torch.equal(padded_sdpa(x, x, x), F.scaled_dot_product_attention(x, x, x))


@pytest.mark.parametrize("height,width,k", [(8, 8, 3), (8, 8, 5), (6, 10, 3), (9, 20, 7)])
def test_flex_block_mask_path_matches_tiled_path(height, width, k):
    from ditsweep.models.attention import flex_block_mask, flex_neighborhood_attention
    q, k_, v = qkv(2, 3, height, width, 63)
    out = flex_neighborhood_attention(q, k_, v, flex_block_mask(height, width, k, "cpu"))
    assert (out - neighborhood_attention(q, k_, v, (height, width), k)).abs().max() <= 1e-5


def test_flex_backend_module_matches_torch_backend_and_compiles_in_one_graph():
    from ditsweep.models import build_model
    from ditsweep.models.attention import prepare_flex
    torch.manual_seed(0)
    flex = build_model("DiT-T/1", 8, 3, layout="local", attention_backend="flex")
    tiled = build_model("DiT-T/1", 8, 3, layout="local", attention_backend="torch")
    tiled.load_state_dict(flex.state_dict())
    assert prepare_flex(flex, flex.grid, "cpu") == 3  # DiT-T/1 "local": 3,5,7,G,G,G
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 500])
    with torch.no_grad():  # FlexAttention has no CPU backward
        assert (flex(x, t) - tiled(x, t)).abs().max() <= 1e-5
        explained = torch._dynamo.explain(flex)(x, t)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch._dynamo.reset()


def test_local_kernel_choice():
    from ditsweep.models.attention import LOCAL_FALLBACK, choose_local_kernel
    # CPU: unchanged ("auto" -> tiled torch path; an explicit backend is kept)
    assert choose_local_kernel("auto", "cpu", "bf16", False) == ("torch", None)
    assert choose_local_kernel("natten", "cpu", "fp32", False) == ("natten", None)
    # CUDA with libnatten: NATTEN's fused kernels, whatever the precision
    for precision in ("tf32", "fp32", "bf16"):
        assert choose_local_kernel("auto", "cuda", precision, True) == ("natten", None)
    # CUDA without libnatten: the measured fastest exact path, with a note; never NATTEN's dense Flex
    assert LOCAL_FALLBACK == {"bf16": "flex", "fp32": "torch", "tf32": "torch"}
    for backend in ("auto", "natten"):
        kernel, note = choose_local_kernel(backend, "cuda", "bf16", False)
        assert kernel == "flex" and "libnatten" in note and "FlexAttention" in note
        kernel, note = choose_local_kernel(backend, "cuda", "tf32", False)
        assert kernel == "torch" and "tiled" in note
    assert choose_local_kernel("torch", "cuda", "bf16", False) == ("torch", None)
    with pytest.raises(ValueError, match="unknown attention backend 'dense'"):
        choose_local_kernel("dense", "cuda", "bf16", True)
