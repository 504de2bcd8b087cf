"""The built-in dataset and the paper's split: train = last N, test never overlaps train."""

import numpy as np
import pytest

from ditsweep.data import dataset_size, load_split
from ditsweep.data.builtin import load_builtin


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_photo_tiles_at_each_resolution(resolution):
    images = load_builtin("photos", resolution)
    assert images.dtype == np.uint8 and images.shape[1:] == (resolution, resolution, 3)
    assert len(images) == dataset_size("builtin:photos", resolution) > 1300
    assert images.std() > 20  # real photographs, not a constant


def test_order_is_fixed_by_the_seed():
    a, b = load_builtin("photos", 8, seed=0), load_builtin("photos", 8, seed=0)
    c = load_builtin("photos", 8, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.sort(a.reshape(len(a), -1), axis=0), np.sort(c.reshape(len(c), -1), axis=0))


def test_split_is_last_n_and_test_is_disjoint():
    all_images = load_builtin("photos", 8)
    train, test = load_split("builtin:photos", 8, 100, 300)
    assert np.array_equal(train, all_images[-100:]) and np.array_equal(test, all_images[:300])
    train_set = {t.tobytes() for t in train}
    assert not any(t.tobytes() in train_set for t in test)
    # a larger N extends the same order: the N=10 set is inside the N=100 set
    small, _ = load_split("builtin:photos", 8, 10, 10)
    assert np.array_equal(small, train[-10:])


def test_tiles_do_not_overlap_in_pixels():
    # Tiles are cut on a grid: the first photo's tiles put back together give its downsampled
    # image exactly, so every pixel belongs to exactly one tile.
    from PIL import Image
    from skimage import data

    from ditsweep.data.builtin import _photo_tiles
    small = np.asarray(Image.fromarray(data.astronaut()).resize((128, 128), Image.Resampling.BOX))
    tiles = _photo_tiles(8)[:256]  # astronaut has no flat tile: all 256 are kept
    rebuilt = tiles.reshape(16, 16, 8, 8, 3).swapaxes(1, 2).reshape(128, 128, 3)
    assert np.array_equal(rebuilt, small)


def test_no_duplicate_or_flat_tiles_and_same_tiles_at_every_resolution():
    for r in (8, 32):
        tiles = load_builtin("photos", r)
        assert len({t.tobytes() for t in tiles}) == len(tiles)
    small = load_builtin("photos", 8).reshape(-1, 8, 8, 3).astype(float)
    large = load_builtin("photos", 32).reshape(-1, 8, 4, 8, 4, 3).astype(float).mean((2, 4))
    assert np.abs(small - large).max() <= 1.0  # 8-pixel tiles are the 32-pixel ones box-averaged


def test_split_too_large_is_an_error():
    with pytest.raises(ValueError, match="builtin:photos"):
        load_split("builtin:photos", 8, 5000, 300)


def test_digits():
    images = load_builtin("digits", 8)
    assert images.shape == (1797, 8, 8, 3) and np.array_equal(images[..., 0], images[..., 2])
