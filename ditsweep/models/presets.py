"""Model presets, attention layouts (the paper's Table 4), the factory `build_model`, and the
FLOP count used to size the UNets against the DiTs."""

import re

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ditsweep.models.attention import BACKENDS
from ditsweep.models.dit import DiT
from ditsweep.models.unet import UNet

G = "G"  # a global-attention block in a layout

PRESETS: dict[str, dict] = {
    # The paper's models (Table 4): pixel space, patch 1, 12 blocks.
    "DiT-XS/1": dict(arch="dit", hidden_size=252, depth=12, num_heads=4, patch_size=1),  # head size 63
    "DiT-S/1": dict(arch="dit", hidden_size=384, depth=12, num_heads=6, patch_size=1),
    # Tiny models for CPU runs on 8x8 images.
    "DiT-T/1": dict(arch="dit", hidden_size=64, depth=6, num_heads=4, patch_size=1),
    "DiT-T/2": dict(arch="dit", hidden_size=64, depth=6, num_heads=4, patch_size=2),
    # improved-diffusion UNets, attention in the last stage and the middle. UNet-XS: the paper's
    # stages, FLOPs within 5% of DiT-XS/1 (global) at 32x32 counting the attention matmuls
    # (29.9 vs 31.4 GFLOPs per image).
    "UNet-XS": dict(arch="unet", model_channels=160, channel_mult=(1, 2, 3, 4), num_res_blocks=3, num_heads=4),
    # The UNet the paper appears to have used (~110M parameters): its FLOPs match DiT-XS/1 only
    # when the DiT's attention matmuls are not counted (19.2 vs 18.7 GFLOPs per image, the
    # paper's 303.17G vs 300.49G divided by 16), as FlopCounterMode does for SDPA on CPU.
    "UNet-XS-paper": dict(arch="unet", model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                          num_heads=4),
    # UNet-T: three stages (8, 4, 2 px at 8x8) of 2 ResBlocks; FLOPs within 3% of DiT-T/1 at 8x8
    # (45.7 vs 44.5 MFLOPs per image).
    "UNet-T": dict(arch="unet", model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, num_heads=4),
}

LAYOUTS: dict[int, dict[str, list]] = {
    12: {
        "global": [G] * 12,
        "local": [3, 5, 7, 9, 11, 13] + [G] * 6,
        "local-mix": [3, G, 5, G, 7, G, 9, G, 11, G, 13, G],
        "local-tail": [G] * 6 + [3, 5, 7, 9, 11, 13],
        "local-smaller": [3, 5, 7, 9, 11, 13, 15, 17, 19, G, G, G],
        "local9": [3, 3, 3, 5, 5, 5, 7, 7, 7, G, G, G],
        "local9-mix": [3, 3, 3, G, 5, 5, 5, G, 7, 7, 7, G],
        "local9-tail": [G, G, G, 3, 3, 3, 5, 5, 5, 7, 7, 7],
        "local9-larger": [5, 5, 5, 7, 7, 7, 9, 9, 9, G, G, G],
        "uniform5": [5] * 6 + [G] * 6,
        "pairs357": [3, 3, 5, 5, 7, 7] + [G] * 6,
    },
    # Tiny presets run on 8x8 token grids, so windows stay <= 7.
    6: {
        "global": [G] * 6,
        "local": [3, 5, 7, G, G, G],
        "local-mix": [3, G, 5, G, 7, G],
        "local-tail": [G, G, G, 3, 5, 7],
    },
}


class LayoutError(ValueError):
    """An attention layout is invalid; the message names the offending value."""


def layout_names(depth: int) -> list[str]:
    """Layout names known for a model of this depth (`global` works at any depth)."""
    return sorted(set(LAYOUTS.get(depth, {})) | {"global"})


def resolve_layout(layout: str | list | None, depth: int, grid: int) -> list[int | None]:
    """A layout name, list (ints / "G") or comma string ("3,5,G") -> one entry per block,
    an odd window size k or None for global attention. Raises LayoutError."""
    if layout is None or layout == "global":
        return [None] * depth
    if isinstance(layout, str):
        if layout in LAYOUTS.get(depth, {}):
            entries = LAYOUTS[depth][layout]
        elif "," in layout or re.fullmatch(r"\s*(\d+|[Gg])\s*", layout):
            entries = [e.strip() for e in layout.split(",")]
        else:
            raise LayoutError(f"unknown layout {layout!r} for a {depth}-block model; known: "
                              + ", ".join(layout_names(depth)))
    elif isinstance(layout, (list, tuple)):
        entries = list(layout)
    else:
        raise LayoutError(f"a layout must be a name, a list or a comma string, not {layout!r}")

    if len(entries) != depth:
        raise LayoutError(f"layout {_show(entries)} has {len(entries)} entries but the model has "
                          f"{depth} blocks")
    return [_parse_entry(e, grid) for e in entries]


def _parse_entry(entry, grid: int) -> int | None:
    if isinstance(entry, str):
        entry = entry.strip()
    if entry is None or (isinstance(entry, str) and entry.upper() == G):
        return None
    if isinstance(entry, str) and re.fullmatch(r"[+-]?\d+", entry):
        entry = int(entry)
    if not isinstance(entry, int) or isinstance(entry, bool):
        raise LayoutError(f"layout entry {entry!r} is neither an odd window size nor 'G'")
    if entry < 1:
        raise LayoutError(f"window {entry} is smaller than 1")
    if entry % 2 == 0:
        raise LayoutError(f"window {entry} is even; neighborhood windows must be odd")
    if entry > grid:
        raise LayoutError(f"window {entry} is larger than the {grid}x{grid} token grid")
    return entry


def _show(entries: list) -> str:
    return ",".join(G if e is None else str(e) for e in entries)


def layout_to_str(layout: list[int | None]) -> str:
    """[3, 5, None] -> "3,5,G"."""
    return _show(layout)


def has_local_blocks(layout: str) -> bool:
    """Whether a layout string ("3,5,G"; "-" for a UNet) has a neighborhood-attention block."""
    return any(part.strip().isdigit() for part in layout.split(","))


def build_model(preset: str, image_size: int, in_channels: int = 3, layout: str | list | None = None,
                weight_sharing: bool = False, attention_backend: str = "auto",
                pca_attention: tuple[int, int] | None = None) -> nn.Module:
    """The model of a preset for image_size x image_size images with in_channels channels.

    DiT presets take a layout (see resolve_layout) and optionally Appendix C's weight sharing or
    PCA attention (`pca_attention` = (blocks, K): zero PCs, load them with set_pca_components).
    Outputs have 2*in_channels channels: predicted noise, then learned-range variance values.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    if attention_backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {attention_backend!r}; known: {', '.join(BACKENDS)}")
    cfg = dict(PRESETS[preset])
    arch = cfg.pop("arch")
    if arch == "unet":
        if layout not in (None, "global", "-", "unet"):
            raise LayoutError(f"UNet preset {preset} takes no attention layout (got {layout!r})")
        if weight_sharing or pca_attention:
            raise ValueError(f"weight sharing and PCA attention are defined for DiT presets only, not {preset}")
        return UNet(image_size=image_size, in_channels=in_channels, attention_backend=attention_backend, **cfg)
    if image_size % cfg["patch_size"]:
        raise ValueError(f"image size {image_size} is not a multiple of {preset}'s patch size {cfg['patch_size']}")
    resolved = resolve_layout(layout, cfg["depth"], image_size // cfg["patch_size"])
    return DiT(input_size=image_size, in_channels=in_channels, layout=resolved, weight_sharing=weight_sharing,
               attention_backend=attention_backend, pca_attention=pca_attention, **cfg)


def count_flops(model: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Forward FLOPs for one image, counted with torch's FlopCounterMode (a multiply-add = 2).

    FlopCounterMode has no formula for the CPU kernel of scaled_dot_product_attention and would
    count global attention as free; we give it the same formula it uses for the CUDA kernels.
    """
    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flop,
    })
    device = next(model.parameters()).device
    x = torch.zeros(1, in_channels, image_size, image_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), counter:
        model(x, t)
    return counter.get_total_flops()


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                        **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
