"""Images to pack: a built-in dataset or a folder of image files, in the shuffled order of a seed.

A folder may be flat (CelebA's img_align_celeba/, an exported LSUN category) or hold one
subfolder per class (ImageNet's train/n01440764/...); the class name is kept as metadata. Files
are listed in sorted order and then permuted with `numpy.random.default_rng(seed)`, the same rule
the built-in datasets use, so packing `builtin:photos` with seed S gives exactly the order of
`builtin:photos?seed=S`.
"""

import functools
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from ditsweep.data.builtin import BUILTIN_NAMES, load_builtin
from ditsweep.data.errors import DataError, describe


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """RGB uint8 [R, R, 3]: the centre square of the image, resized to R.

    The preprocessing of the reference DiT/ADM code (`center_crop_arr`): halve with a box filter
    while the image is at least twice the target, resize bicubically so the short side is R, then
    cut the centre square. The box steps avoid aliasing when a large photo becomes 32x32.
    """
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - resolution) // 2, (pixels.shape[1] - resolution) // 2
    return pixels[top: top + resolution, left: left + resolution]


@dataclass
class Source:
    """What to pack: `count` images, yielded by `images()` in the final (shuffled) order."""
    name: str         # recorded in the manifest, e.g. "photos" or "img_align_celeba"
    description: str  # where the images came from, e.g. "builtin:photos" or the folder path
    count: int
    images: Callable[[], Iterator[tuple[np.ndarray, dict]]]  # (uint8 [R,R,3], metadata)


def open_source(source: str, resolution: int, seed: int, workers: int = 1,
                limit: int | None = None) -> Source:
    """`builtin:NAME` or a folder path; `limit` keeps the first images of the shuffled order."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_NAMES:
            raise DataError(f"{source}: unknown built-in dataset; known: "
                            + ", ".join(f"builtin:{n}" for n in BUILTIN_NAMES))
        images = load_builtin(name, resolution, seed)[:limit]

        def builtin_images() -> Iterator[tuple[np.ndarray, dict]]:
            for image in images:
                yield center_crop(Image.fromarray(image), resolution), {"source": source}

        return Source(name, source, len(images), builtin_images)
    return _folder_source(Path(source), resolution, seed, workers, limit)


def image_files(root: Path) -> list[str]:
    """Every file under `root` that Pillow can open by its extension, as sorted relative paths."""
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        for f in files:
            if os.path.splitext(f)[1].lower() in extensions and not f.startswith("."):
                found.append(os.path.relpath(os.path.join(directory, f), root))
    return sorted(Path(p).as_posix() for p in found)


def _folder_source(root: Path, resolution: int, seed: int, workers: int, limit: int | None) -> Source:
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of images nor a builtin: dataset")
    files = image_files(root)
    if not files:
        raise DataError(f"{root}: no image files found (any format Pillow reads, flat or in "
                        "class subfolders)")
    order = np.random.default_rng(seed).permutation(len(files))
    ordered = [files[i] for i in order[:limit]]  # a random subset: LSUN bedroom has 3M images
    load = functools.partial(_load, root=str(root), resolution=resolution)

    def folder_images() -> Iterator[tuple[np.ndarray, dict]]:
        if workers <= 1:
            yield from map(load, ordered)
            return
        # Decoding and resizing dominate packing; imap keeps the shuffled order.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap(load, ordered, chunksize=32)

    return Source(root.resolve().name, str(root.resolve()), len(ordered), folder_images)


def _load(relative: str, root: str, resolution: int) -> tuple[np.ndarray, dict]:
    path = os.path.join(root, relative)
    try:
        with Image.open(path) as image:
            pixels = center_crop(image, resolution)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise DataError(f"{path}: cannot read image ({describe(e)})") from None
    meta = {"source": relative}
    if "/" in relative:  # class subfolders: the first folder is the class
        meta["class"] = relative.split("/", 1)[0]
    return pixels, meta
