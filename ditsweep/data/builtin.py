"""Built-in datasets: real images shipped inside PyPI packages, so a laptop needs no download.

`photos` cuts scikit-image's colour photographs into non-overlapping square tiles. Each tile
always covers a 32x32 patch of the original photo (photos are box-downsampled by 32/R first), so
8, 16 and 32 pixel tiles show the same content at different resolutions and the tile count does
not depend on R. `digits` is scikit-learn's 1797 handwritten digits (8x8 grey, repeated to RGB).

Tiles never overlap in pixels, so any split of the tile list keeps train and test disjoint.
Flat tiles (the black backgrounds of `retina` and `hubble_deep_field`) are dropped: identical
images on both sides of the split would make the PSNR gap meaningless. The choice is made on the
32-pixel tiles and applied at every resolution, so the same tiles are kept at 8, 16 and 32.
"""

from functools import lru_cache

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field",
          "immunohistochemistry")
TILE_SOURCE_PIXELS = 32  # side of the original-photo patch that one tile covers
MIN_TILE_STD = 2.0       # grey levels; below this a tile is a flat background
BUILTIN_NAMES = ("photos", "digits")


def _photo_tiles(resolution: int) -> np.ndarray:
    """Every tile of every photo at `resolution`, flat or not, in photo/row/column order."""
    from skimage import data

    tiles = []
    for name in PHOTOS:
        photo = getattr(data, name)()
        # Crop to whole 32-pixel patches first, so the downsampling factor is exact and a tile
        # covers the same patch of the photo at every resolution.
        rows, cols = photo.shape[0] // TILE_SOURCE_PIXELS, photo.shape[1] // TILE_SOURCE_PIXELS
        crop = Image.fromarray(photo[: rows * TILE_SOURCE_PIXELS, : cols * TILE_SOURCE_PIXELS])
        small = np.asarray(crop.resize((cols * resolution, rows * resolution), Image.Resampling.BOX))
        grid = small.reshape(rows, resolution, cols, resolution, 3).swapaxes(1, 2)
        tiles.append(grid.reshape(-1, resolution, resolution, 3))
    return np.concatenate(tiles)


def _digits(resolution: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    grey = (load_digits().images * (255.0 / 16.0)).round().astype(np.uint8)
    if resolution != 8:
        grey = np.stack([np.asarray(Image.fromarray(g).resize((resolution, resolution),
                                                              Image.Resampling.BICUBIC))
                         for g in grey])
    return np.repeat(grey[..., None], 3, axis=-1)


@lru_cache(maxsize=1)
def _textured_tiles() -> np.ndarray:
    """Indices of the tiles that are not flat, decided at full resolution (32 pixels)."""
    tiles = _photo_tiles(TILE_SOURCE_PIXELS)
    return np.flatnonzero(tiles.reshape(len(tiles), -1).std(axis=1) >= MIN_TILE_STD)


@lru_cache(maxsize=8)
def _unshuffled(name: str, resolution: int) -> np.ndarray:
    if name == "photos":
        return _photo_tiles(resolution)[_textured_tiles()]
    if name == "digits":
        return _digits(resolution)
    raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_NAMES)}")


def load_builtin(name: str, resolution: int, seed: int = 0) -> np.ndarray:
    """All images of a built-in dataset, uint8 [M, R, R, 3], in the order shuffled by `seed`."""
    images = _unshuffled(name, resolution)
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order]


def builtin_size(name: str, resolution: int) -> int:
    """Number of images, without shuffling (for validating N before a sweep starts)."""
    return len(_unshuffled(name, resolution))
