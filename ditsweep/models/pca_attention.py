"""Attention maps composed from principal components (the paper's Appendix C, Eq. 7).

    Attention Map = Coefficients (.) PCs + delta

Stage 1 (ditsweep.eval.pca) takes the top K principal components of a trained DiT's attention
maps, per block: K maps of N x N (N tokens). Here, in the first blocks of a new DiT, the query
and key projections (2 D x D weights) are replaced by one smaller Linear D -> heads * K that
gives each query token K coefficients per head; row i of the map is sum_k c_ik PC_k[i, :] + delta.

Reading of the details the paper leaves open (the one that reduces parameters as it claims):
- the coefficients come from each query token (a per-token Linear, like the query projection it
  replaces), per head; the values and the output projection are kept;
- the mean map is NOT added back. The PCs are of centred maps (torch.pca_lowrank's default), so
  each of their rows sums to 0, and delta = 1/N (1/1024 at 32x32, the paper's value) makes every
  row of the composed map sum to exactly 1, which is what the paper says delta is for. The rows
  are re-centred when the components are loaded, so this holds exactly, not only up to PCA error.
- no softmax: the composed weights may be negative, as Eq. 7 has none.

Per block this saves 2 D^2 + 2 D - (D K H + K H) parameters: 76,912 for DiT-XS/1 (D=252, H=4,
K=50), 230,736 over its first three blocks.
"""

import torch
import torch.nn as nn

COMPONENTS_KEY = "attn.components"


class PCAAttention(nn.Module):
    """Multi-head attention whose map is composed from fixed PCs (a buffer, loaded from stage 1)."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, num_components: int):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} is not divisible by {num_heads} heads"
        self.num_heads, self.head_dim, self.num_components = num_heads, dim // num_heads, num_components
        self.window = None  # for code that reads a block's window (figures, locality)
        self.coef = nn.Linear(dim, num_heads * num_components)  # replaces q and k
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        # Persistent: checkpoints and the EMA weights the evaluators get carry the PCs.
        self.register_buffer("components", torch.zeros(num_components, num_tokens, num_tokens))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, pca components={self.num_components}"

    @torch.no_grad()
    def set_components(self, components: torch.Tensor) -> None:
        """[K, N, N] principal components; rows re-centred so that composed rows sum to 1."""
        if components.shape != self.components.shape:
            raise ValueError(f"PCA components of shape {tuple(components.shape)} do not fit this "
                             f"block ({tuple(self.components.shape)}: K components of N x N maps)")
        self.components.copy_(components - components.mean(dim=-1, keepdim=True))

    def forward(self, x: torch.Tensor, grid: tuple[int, int], return_attention: bool = False):
        B, N, C = x.shape
        coef = self.coef(x).reshape(B, N, self.num_heads, self.num_components).transpose(1, 2)
        # [B, H, N, K] x [K, N, N] -> [B, H, N, N]: row i = sum_k c_ik PC_k[i, :] + 1/N
        attn = torch.einsum("bhik,kij->bhij", coef, self.components.to(coef.dtype)) + 1.0 / N
        v = self.v(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return (out, attn) if return_attention else out


def set_pca_components(model: nn.Module, components: torch.Tensor) -> None:
    """Load stage 1's [blocks, K, N, N] components into the model's PCA blocks."""
    blocks = [b for b in model.blocks if isinstance(b.attn, PCAAttention)]
    if len(blocks) != len(components):
        raise ValueError(f"{len(components)} blocks of PCA components for a model with "
                         f"{len(blocks)} PCA-attention blocks")
    for block, comp in zip(blocks, components):
        block.attn.set_components(comp)


def pca_shape(state_dict: dict) -> tuple[int, int] | None:
    """(blocks, K) of a PCA-attention DiT's state dict; None for any other model."""
    keys = [k for k in state_dict if k.endswith(COMPONENTS_KEY)]
    return (len(keys), state_dict[keys[0]].shape[0]) if keys else None
