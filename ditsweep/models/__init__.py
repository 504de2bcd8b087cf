"""Backbones: DiT with per-block global / neighborhood attention, and the improved-diffusion UNet."""

from ditsweep.models.attention import Attention, natten_na2d, neighborhood_attention
from ditsweep.models.dit import DiT
from ditsweep.models.pca_attention import PCAAttention, set_pca_components
from ditsweep.models.presets import (LAYOUTS, PRESETS, LayoutError, build_model, count_flops, layout_to_str,
                                     resolve_layout)
from ditsweep.models.unet import UNet

__all__ = ["Attention", "DiT", "PCAAttention", "set_pca_components", "UNet", "LAYOUTS", "PRESETS", "LayoutError", "build_model", "count_flops",
           "layout_to_str", "natten_na2d", "neighborhood_attention", "resolve_layout"]
