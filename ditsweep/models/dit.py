"""Diffusion Transformer (Peebles & Xie), unconditional, with a per-block attention layout.

Follows facebookresearch/DiT's models.py: patchify, fixed 2-D sin-cos positions, sinusoidal
timestep embedding + MLP, adaLN-Zero blocks, adaLN final layer, the same initialisation. The
differences: no label embedder, and each block's attention is global or a k x k neighborhood
(`layout`), which is the inductive bias studied by "On Inductive Biases That Enable
Generalization of Diffusion Transformers".
"""

import math

import torch
import torch.nn as nn

from ditsweep.models.attention import Attention
from ditsweep.models.pca_attention import PCAAttention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps (may be fractional) -> [B, dim] sinusoidal embedding, cosines first (GLIDE)."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> sinusoidal frequencies -> 2-layer MLP with SiLU."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class Mlp(nn.Module):
    """The transformer MLP (timm's Mlp without dropout)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning; attention global or over a k x k window."""

    def __init__(self, hidden_size: int, num_heads: int, window: int | None = None,
                 mlp_ratio: float = 4.0, attention_backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, window=window, qkv_bias=True, backend=attention_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int],
                return_attention: bool = False):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        attn_map = None
        if return_attention:
            h, attn_map = self.attn(h, grid, return_attention=True)
        else:
            h = self.attn(h, grid)
        x = x + gate_msa.unsqueeze(1) * h
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return (x, attn_map) if return_attention else x


class FinalLayer(nn.Module):
    """adaLN then a linear decoder from each token to its p x p x out_channels pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Unconditional DiT. forward(x [B,C,H,W], t [B]) -> [B, 2C, H, W]: noise eps, then the
    learned-range variance values (improved-diffusion's learned sigma)."""

    arch = "dit"

    def __init__(self, input_size: int = 32, patch_size: int = 1, in_channels: int = 3,
                 hidden_size: int = 252, depth: int = 12, num_heads: int = 4, mlp_ratio: float = 4.0,
                 layout: list[int | None] | None = None, weight_sharing: bool = False,
                 attention_backend: str = "auto", pca_attention: tuple[int, int] | None = None):
        super().__init__()
        assert input_size % patch_size == 0, f"image size {input_size} is not a multiple of {patch_size}"
        layout = [None] * depth if layout is None else list(layout)
        assert len(layout) == depth, f"layout has {len(layout)} entries for {depth} blocks"
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # learned sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.layout = layout
        self.weight_sharing = weight_sharing
        self.grid = (input_size // patch_size, input_size // patch_size)

        # Patchify: a p x p stride-p convolution, i.e. a Linear on each flattened patch.
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Fixed, not trained; a non-persistent buffer so checkpoints need not carry it.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, window, mlp_ratio, attention_backend) for window in layout
        ])
        if weight_sharing:
            self._share_weights()
        if pca_attention:  # Appendix C: (blocks, K) maps composed from PCs, see pca_attention.py
            blocks, k = pca_attention
            assert all(w is None for w in layout[:blocks]), "PCA attention replaces global blocks"
            for block in self.blocks[:blocks]:
                block.attn = PCAAttention(hidden_size, num_heads, self.grid[0] * self.grid[1], k)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def _share_weights(self) -> None:
        """Appendix C: blocks 2 and 4 reuse the parameters of blocks 1 and 3 (same FLOPs, fewer
        parameters). The modules are shared, not the Attention objects, so each block keeps the
        window of its own layout entry."""
        assert self.depth >= 4, "weight sharing needs at least 4 blocks"
        for dst, src in ((1, 0), (3, 2)):
            a, b = self.blocks[dst], self.blocks[src]
            a.attn.qkv, a.attn.proj = b.attn.qkv, b.attn.proj
            a.mlp, a.adaLN_modulation = b.mlp, b.adaLN_modulation

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(_basic_init)

        # Patch embedding initialised like a Linear (fan-in = C*p*p), not like a Conv2d.
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)

        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the output as exactly zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        p, c = self.patch_size, self.out_channels
        h, w = self.grid
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, return_attention: bool = False):
        """x: [B, C, H, W] in [-1, 1]; t: [B] timesteps 0..T-1. Returns [B, 2C, H, W], and with
        return_attention also one dense attention map [B, heads, N, N] per block."""
        expected = tuple(g * self.patch_size for g in self.grid)
        assert tuple(x.shape[-2:]) == expected, f"input {tuple(x.shape[-2:])} is not the model's {expected}"
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t)                                               # [B, D]
        maps = []
        for block in self.blocks:
            if return_attention:
                x, attn_map = block(x, c, self.grid, return_attention=True)
                maps.append(attn_map)
            else:
                x = block(x, c, self.grid)
        x = self.unpatchify(self.final_layer(x, c))
        return (x, maps) if return_attention else x


def sincos_pos_embed_2d(embed_dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """[H*W, D] fixed 2-D sin-cos position embedding as MAE/DiT: the first half of the channels
    encodes the column (x) coordinate, the second half the row (y) coordinate."""
    assert embed_dim % 4 == 0, f"embedding size {embed_dim} must be divisible by 4"
    height, width = grid
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                torch.arange(width, dtype=torch.float64), indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols.reshape(-1)),
                     _sincos_1d(embed_dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    out = pos[:, None] * omega[None]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
