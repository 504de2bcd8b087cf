"""Multi-head self-attention over a 2-D token grid: global, or neighborhood (NATTEN's definition).

Neighborhood attention lets the query at grid position (i, j) attend to a k x k window of keys.
At the borders the window is shifted inward (clamped), never zero-padded, so every query sees
exactly k*k keys; a window as large as the grid is plain global attention. Two implementations:

- `natten_na2d`: NATTEN's kernels (CUDA; NATTEN's CPU build runs the forward only).
- `neighborhood_attention`: plain PyTorch on tiles of queries, so its cost grows with N*k*k, not
  N*N. Used on CPU, for training without NATTEN, and to return attention maps.
- `flex_neighborhood_attention`: FlexAttention with the clamped-window block mask; compiled on
  CUDA, the fastest exact path in bf16 when NATTEN's CUDA library is missing.

Global attention on CUDA pads the head size to a multiple of 8 (63 -> 64 for DiT-XS/1), the size
the fused SDPA kernels take: an unpadded 63 falls back to a kernel 2.1-2.4x slower.
"""

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "natten", "flex")
log = logging.getLogger(__name__)

# The local kernel on CUDA when NATTEN's CUDA library is missing, per precision: the faster of the
# two exact paths in ../shared/gpu/results-h100-2026-11-26.txt (DiT-XS/1, local, batch 64, H100):
# bf16: compiled Flex 11.17 steps/s vs torch tiled 8.90; fp32: torch tiled 4.40 vs Flex 2.41.
# tf32 was not measured; it keeps fp32 tensors, so it follows fp32. Never NATTEN without
# libnatten: that runs an uncompiled Flex that builds the dense N x N scores (3x slower).
LOCAL_FALLBACK = {"bf16": "flex", "fp32": "torch", "tf32": "torch"}


@functools.lru_cache(maxsize=1)
def has_libnatten() -> bool:
    """Whether NATTEN is importable with its compiled CUDA/C++ library."""
    try:
        import natten
    except ImportError:
        return False
    return bool(getattr(natten, "HAS_LIBNATTEN", False))


def choose_local_kernel(backend: str, device_type: str, precision: str,
                        libnatten: bool) -> tuple[str, str | None]:
    """The kernel of the neighborhood blocks: ("natten" | "flex" | "torch", note or None).

    The note says why a requested or automatic NATTEN was replaced (for the log and MLflow).
    On CPU nothing changes: "auto" runs the torch tiled path, "natten" NATTEN's CPU forward.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}")
    if device_type != "cuda":
        return ("torch" if backend == "auto" else backend), None
    if backend in ("auto", "natten"):
        if libnatten:
            return "natten", None
        kernel = LOCAL_FALLBACK[precision]
        return kernel, (f"natten's CUDA library (libnatten) is not available: local attention runs "
                        f"the {'compiled FlexAttention' if kernel == 'flex' else 'torch tiled'} path "
                        f"(fastest exact fallback for {precision})")
    return backend, None


def window_starts(length: int, kernel_size: int) -> torch.Tensor:
    """First key index of the window of every position along one axis (NATTEN's clamping)."""
    left = kernel_size // 2
    right = kernel_size // 2 + (kernel_size % 2 - 1)  # = left for odd windows
    centre = torch.arange(length).clamp(left, length - 1 - right)
    return centre - left


def neighborhood_index(height: int, width: int, kernel_size: int) -> torch.Tensor:
    """[H*W, k*k] flat indices of the keys in each query's clamped k x k window (for checks and
    analysis; the attention itself works on tiles)."""
    offsets = torch.arange(kernel_size)
    rows = window_starts(height, kernel_size)[:, None] + offsets  # [H, k]
    cols = window_starts(width, kernel_size)[:, None] + offsets   # [W, k]
    index = rows[:, None, :, None] * width + cols[None, :, None, :]  # [H, W, k, k]
    return index.reshape(height * width, kernel_size * kernel_size)


TILE = 8  # query tile side; 8 was fastest on CPU for k = 3..13 at 32x32 (fewer, larger matmuls)


@functools.lru_cache(maxsize=128)
def _axis_tiles(length: int, kernel_size: int, tile: int):
    """Tiling of one axis: query positions [n, t], key positions [n, S], window mask [n, t, S].

    Window starts never decrease and grow by at most 1 per position, so the windows of t
    consecutive queries lie in a span of S = t + k - 1 keys (whole axis if shorter). The last tile
    repeats the last position when t does not divide the axis; those rows are dropped later.
    """
    tile = min(tile, length)
    n = -(-length // tile)
    span = min(tile + kernel_size - 1, length)
    starts = window_starts(length, kernel_size)
    qpos = (torch.arange(n)[:, None] * tile + torch.arange(tile)).clamp(max=length - 1)
    kpos = starts[qpos[:, 0]].clamp(max=length - span)[:, None] + torch.arange(span)
    qstart = starts[qpos][:, :, None]
    mask = (kpos[:, None, :] >= qstart) & (kpos[:, None, :] < qstart + kernel_size)
    return qpos, kpos, mask


@functools.lru_cache(maxsize=64)
def _grid_tiles(height: int, width: int, kernel_size: int, tile: int, device: str):
    """2-D tiles: flat query index [T*t*t], flat key index [T, S*S], mask [T, t*t, S*S]."""
    if not 1 <= kernel_size <= min(height, width):
        raise ValueError(f"window {kernel_size} does not fit the {height}x{width} token grid")
    qr, kr, mr = _axis_tiles(height, kernel_size, tile)
    qc, kc, mc = _axis_tiles(width, kernel_size, tile)
    n_tiles = qr.shape[0] * qc.shape[0]
    q_index = (qr[:, None, :, None] * width + qc[None, :, None, :]).reshape(-1)
    k_index = (kr[:, None, :, None] * width + kc[None, :, None, :]).reshape(n_tiles, -1)
    mask = mr[:, None, :, None, :, None] & mc[None, :, None, :, None, :]  # [nh, nw, th, tw, Sh, Sw]
    mask = mask.reshape(n_tiles, qr.shape[1] * qc.shape[1], -1)
    shape = (qr.shape[0], qc.shape[0], qr.shape[1], qc.shape[1])  # tiles per axis, tile sides
    return q_index.to(device), k_index.to(device), mask.to(device), shape


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                           kernel_size: int, scale: float | None = None, return_map: bool = False):
    """Neighborhood attention in plain PyTorch (differentiable, any device, any head size).

    q, k, v: [B, heads, N, D] with N = H*W tokens in row-major order. Returns [B, heads, N, D],
    and with return_map also the dense attention map [B, heads, N, N] (zeros outside windows).
    The grid is cut into TILE x TILE query tiles; each tile attends to the (TILE+k-1)^2 keys that
    contain its queries' windows, masked to each query's own window. Cost and memory are
    O(N * (TILE+k-1)^2), and no N x N tensor is built unless return_map asks for one.
    """
    height, width = grid
    B, heads, N, D = q.shape
    assert N == height * width, f"{N} tokens do not form a {height}x{width} grid"
    scale = D ** -0.5 if scale is None else scale
    q_index, k_index, mask, (nh, nw, th, tw) = _grid_tiles(height, width, kernel_size, TILE, str(q.device))
    T, S2 = k_index.shape
    q_t = q.index_select(2, q_index).view(B, heads, T, th * tw, D)
    k_t = k.index_select(2, k_index.reshape(-1)).view(B, heads, T, S2, D)
    v_t = v.index_select(2, k_index.reshape(-1)).view(B, heads, T, S2, D)
    logits = (q_t * scale) @ k_t.transpose(-1, -2)  # [B, heads, T, t*t, S*S]
    weights = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = _untile(weights @ v_t, grid, nh, nw, th, tw)
    if not return_map:
        return out
    dense = weights.new_zeros(B, heads, T, th * tw, N)
    dense.scatter_(-1, k_index[:, None, :].expand_as(weights), weights)
    return out, _untile(dense, grid, nh, nw, th, tw)


def _untile(x: torch.Tensor, grid: tuple[int, int], nh: int, nw: int, th: int, tw: int) -> torch.Tensor:
    """[B, heads, nh*nw, th*tw, C] per-tile query rows -> [B, heads, H*W, C] in grid order."""
    B, heads, _, _, C = x.shape
    height, width = grid
    x = x.view(B, heads, nh, nw, th, tw, C).permute(0, 1, 2, 4, 3, 5, 6)
    x = x.reshape(B, heads, nh * th, nw * tw, C)
    return x[:, :, :height, :width].reshape(B, heads, height * width, C)


@functools.lru_cache(maxsize=64)
def flex_block_mask(height: int, width: int, kernel_size: int, device: str):
    """FlexAttention BlockMask of NATTEN's clamped k x k window on a row-major height x width grid
    (the mask measured as "flexc" in ../shared/gpu)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows = window_starts(height, kernel_size).to(device)
    cols = window_starts(width, kernel_size).to(device)

    def natten_window(b, h, q_idx, kv_idx):
        r0, c0 = rows[q_idx // width], cols[q_idx % width]
        kr, kc = kv_idx // width, kv_idx % width
        return (kr >= r0) & (kr < r0 + kernel_size) & (kc >= c0) & (kc < c0 + kernel_size)

    n = height * width
    return create_block_mask(natten_window, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask,
                                scale: float | None = None) -> torch.Tensor:
    """Neighborhood attention through FlexAttention; q, k, v, output [B, heads, N, D].

    `block_mask` from flex_block_mask. Compiled on CUDA (uncompiled Flex materialises the dense
    scores); on CPU the eager Flex runs, which is enough to check the mask.
    """
    from torch.nn.attention.flex_attention import flex_attention

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    flex = _compiled_flex() if q.is_cuda else flex_attention
    return flex(q, k, v, block_mask=block_mask, scale=scale)


def padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Global SDPA with the head size zero-padded to a multiple of `multiple`; q, k, v [B, heads, N, D].

    Zero channels add nothing to q.k or to the weighted sum of v, and the scale stays that of the
    true head size, so the result is the same attention (up to float summation order).
    """
    head_dim = q.shape[-1]
    padded = -(-head_dim // multiple) * multiple
    if padded == head_dim:
        return F.scaled_dot_product_attention(q, k, v)
    pad = (0, padded - head_dim)
    out = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad),
                                         scale=head_dim ** -0.5)
    return out[..., :head_dim]


def _supported_head_dim(head_dim: int) -> int:
    """Smallest head size >= head_dim that every NATTEN backend accepts (a power of two >= 8)."""
    # flex needs a power of two in [8, 512], CUTLASS a multiple of 8, Hopper 32/64/128/256;
    # a power of two satisfies all that can run a given head size.
    return max(8, 1 << (head_dim - 1).bit_length())


def natten_na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """`natten.functional.na2d` for any head size. q, k, v, output: [B, H, W, heads, D].

    NATTEN rejects head sizes such as 63 (DiT-XS/1: 252 / 4) on every backend. Zero channels
    change neither q.k nor the weighted sum of v, so we pad to a supported size, keep the scale
    of the true head size, and slice the output back.
    """
    from natten.functional import na2d  # imported lazily: importing NATTEN takes ~1 s

    if kernel_size == 1:  # NATTEN wants windows >= 2; a 1x1 window attends to itself only
        return v
    head_dim = q.shape[-1]
    padded = _supported_head_dim(head_dim)
    if padded != head_dim:
        pad = (0, padded - head_dim)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    out = na2d(q, k, v, kernel_size, scale=head_dim ** -0.5)
    return out[..., :head_dim]


class Attention(nn.Module):
    """Multi-head self-attention on a token grid, global (window=None) or neighborhood (odd k).

    Same parameters as timm's Attention (qkv and proj Linears), but it can return its attention
    probabilities, which the locality metrics need.
    """

    def __init__(self, dim: int, num_heads: int, window: int | None = None, qkv_bias: bool = True,
                 backend: str = "auto"):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by {num_heads} heads"
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = window
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.block_mask = None  # FlexAttention mask, set by prepare_flex before torch.compile

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, window={self.window or 'global'}, backend={self.backend}"

    def forward(self, x: torch.Tensor, grid: tuple[int, int], return_attention: bool = False):
        """x: [B, N, C] tokens of an H x W grid (row-major). Returns [B, N, C] (and the dense
        attention map [B, heads, N, N] when return_attention)."""
        B, N, C = x.shape
        height, width = grid
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        attn_map = None

        if self.window is not None and not return_attention and self._use_natten(x):
            q, k, v = qkv.reshape(B, height, width, 3, self.num_heads, self.head_dim).unbind(3)
            out = natten_na2d(q, k, v, self.window).reshape(B, N, C)
            return self.proj(out)

        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, D]
        if self.window is not None and self.backend == "flex" and not return_attention:
            mask = self.block_mask
            if mask is None:  # eager use without prepare_flex
                mask = flex_block_mask(height, width, self.window, str(x.device))
            out = flex_neighborhood_attention(q, k, v, mask)
        elif self.window is not None:
            out = neighborhood_attention(q, k, v, grid, self.window, return_map=return_attention)
            if return_attention:
                out, attn_map = out
        elif return_attention:
            attn_map = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5).softmax(dim=-1)
            out = attn_map @ v
        elif x.is_cuda:
            out = padded_sdpa(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, attn_map) if return_attention else out

    def _use_natten(self, x: torch.Tensor) -> bool:
        # NATTEN's CPU build has no backward, so "auto" only picks it for CUDA tensors, and only
        # with libnatten (else NATTEN would run its dense Flex path; the tiled path is exact).
        return self.backend == "natten" or (self.backend == "auto" and x.is_cuda and has_libnatten())


def prepare_flex(model: nn.Module, grid: tuple[int, int], device: torch.device | str) -> int:
    """Build the FlexAttention masks of a model's "flex" neighborhood layers ahead of
    torch.compile, so the compiled graph takes them as inputs instead of tracing their
    construction. Returns how many layers got one."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and module.backend == "flex" and module.window is not None:
            module.block_mask = flex_block_mask(grid[0], grid[1], module.window, str(device))
            count += 1
    return count
