"""The improved-diffusion UNet (Nichol & Dhariwal 2021), unconditional, learned sigma.

Follows openai/improved-diffusion's unet.py with the options the paper uses: channel multipliers
(1, 2, 3, 4), several ResBlocks per stage with scale-shift norm on the timestep embedding, a
strided-conv downsample between stages, self-attention in the last stage and in the middle
(ResBlock, attention, ResBlock), a decoder that mirrors the encoder with skip connections, and
zero-initialised residual branches and output so the initial output is exactly zero.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditsweep.models.attention import Attention
from ditsweep.models.dit import timestep_embedding


def normalization(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)  # 32 groups, as improved-diffusion: channels must divide by 32


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep scale/shift on the second norm, GroupNorm-SiLU-conv(zero)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = normalization(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Global self-attention over all pixels, residual, output projection zero-initialised."""

    def __init__(self, channels: int, num_heads: int, attention_backend: str = "auto"):
        super().__init__()
        self.norm = normalization(channels)
        self.attn = Attention(channels, num_heads, window=None, backend=attention_backend)
        zero_module(self.attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        h = self.attn(tokens, (H, W)).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """nn.Sequential that hands the timestep embedding to the ResBlocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """forward(x [B,C,H,W], t [B]) -> [B, 2C, H, W]: noise eps, then learned-range variance values.

    attention_ds: downsample factors (not pixel sizes) of the stages with self-attention; by
    default only the last stage, e.g. factor 8 (4x4 pixels) at 32x32 with four stages.
    """

    arch = "unet"

    def __init__(self, image_size: int = 32, in_channels: int = 3, model_channels: int = 96,
                 channel_mult: tuple[int, ...] = (1, 2, 3, 4), num_res_blocks: int = 3, num_heads: int = 4,
                 attention_ds: tuple[int, ...] | None = None, dropout: float = 0.0,
                 attention_backend: str = "auto"):
        super().__init__()
        last_ds = 2 ** (len(channel_mult) - 1)
        assert image_size % last_ds == 0, f"image size {image_size} cannot be halved {len(channel_mult) - 1} times"
        attention_ds = (last_ds,) if attention_ds is None else tuple(attention_ds)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels  # learned sigma
        self.model_channels = model_channels
        self.image_size = image_size

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, dropout=dropout)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, attention_backend)

        # Encoder; remember every block's output channels for the skip connections.
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))

        # Decoder: one more block per stage than the encoder, each eats one skip connection.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, self.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [-1, 1]; t: [B] timesteps 0..T-1."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
