"""Dataset URIs and the paper's train/test split.

Every dataset has one fixed order (shuffled once with a seed). The training set of size N is the
LAST N images of that order and the test images are the FIRST ones, so they are never used for
training as long as N + n_test <= size. The split depends only on the dataset URI, never on the
model, so every trial of a sweep sees the same images.

URIs:
- `builtin:photos`, `builtin:digits`, with an optional shuffle seed `builtin:photos?seed=1`;
- a packed dataset (see pack.py): a local directory `/data/celeba32` (relative paths are taken
  from where the sweep was started), `file:///data/celeba32`, or `s3://bucket/celeba32`.
  Its order is the manifest's (the pack seed's shuffle) and its resolution is the packed one.
"""

import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qs

import numpy as np
import torch
import webdataset as wds

from ditsweep.data.builtin import BUILTIN_NAMES, builtin_size, load_builtin
from ditsweep.data.errors import DataError
from ditsweep.data.shards import Manifest, ShardOpener, decode_image, read_manifest, shard_samples
from ditsweep.data.store import Store, local_path

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CACHE_ENV = "DITSWEEP_DATA_CACHE"  # default cache directory for shards read from S3


@dataclass(frozen=True)
class DatasetRef:
    scheme: str  # "builtin", "file" (a local directory) or "s3"
    name: str    # built-in name, or the last component of the packed dataset's location
    seed: int = 0  # built-in shuffle seed; a packed dataset's order was fixed when packing
    location: str = ""  # packed datasets: absolute local directory or s3://bucket/prefix


def parse_dataset_uri(uri: str) -> DatasetRef:
    """Parse a dataset URI; raise ValueError naming the URI when it is not understood."""
    scheme, sep, rest = uri.partition(":")
    if scheme == "builtin" and sep:
        name, _, query = rest.partition("?")
        if name not in BUILTIN_NAMES:
            raise ValueError(f"unknown built-in dataset {uri!r}; known: "
                             + ", ".join(f"builtin:{n}" for n in BUILTIN_NAMES))
        params = parse_qs(query)
        unknown = set(params) - {"seed"}
        if unknown:
            raise ValueError(f"dataset {uri!r}: unknown option(s) {sorted(unknown)}; only 'seed'")
        try:
            seed = int(params.get("seed", ["0"])[0])
        except ValueError:
            raise ValueError(f"dataset {uri!r}: seed must be an integer") from None
        return DatasetRef("builtin", name, seed)
    match = _SCHEME.match(uri)
    if match and match.group(1) == "s3":
        netloc = uri[len("s3://"):].split("/", 1)[0]
        if "@" in netloc:  # never echo it: the part before @ is a credential
            raise DataError(f"dataset {uri!r}: credentials do not belong in a dataset URI; use the "
                            "standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, IRSA)")
        if not netloc or "?" in uri or "#" in uri:
            raise ValueError(f"dataset {uri!r}: expected s3://BUCKET/PREFIX")
        location = uri.rstrip("/")
        return DatasetRef("s3", location.rsplit("/", 1)[-1], 0, location)
    if match and match.group(1) != "file":
        raise DataError(f"unsupported dataset URI {uri!r}; use builtin:NAME, a local path, "
                         "file:///PATH or s3://BUCKET/PREFIX")
    if not uri.strip():
        raise ValueError("empty dataset URI")
    path = local_path(uri)
    return DatasetRef("file", path.name, 0, str(path))


def packed_store(uri: str) -> Store:
    """The Store of a packed dataset URI (local path, file:// or s3://)."""
    ref = parse_dataset_uri(uri)
    if ref.scheme == "builtin":
        raise ValueError(f"dataset {uri!r} is built in, not packed")
    return Store(ref.location)


def open_packed(uri: str, resolution: int | None = None) -> tuple[Store, Manifest]:
    """Store and manifest of a packed dataset; ValueError when `resolution` is not the packed one."""
    store = packed_store(uri)
    manifest = read_manifest(store, uri)
    if resolution is not None and resolution != manifest.resolution:
        raise ValueError(f"dataset {uri!r} was packed at resolution {manifest.resolution}, but "
                         f"data.resolution is {resolution}; set data.resolution: "
                         f"{manifest.resolution} or pack again with --resolution {resolution}")
    return store, manifest


def dataset_size(uri: str, resolution: int) -> int:
    """How many images the dataset holds (cheap enough to call while validating a sweep)."""
    ref = parse_dataset_uri(uri)
    if ref.scheme == "builtin":
        return builtin_size(ref.name, resolution)
    return open_packed(uri, resolution)[1].count


def load_split(uri: str, resolution: int, n_train: int, n_test: int,
               cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 arrays [n, R, R, 3]: train = last n_train, test = first n_test.

    A packed dataset is read through webdataset, and only the shards that hold those images
    (N=10 reads one or two shards). Shards from S3 are cached in `cache_dir`, by default
    $DITSWEEP_DATA_CACHE when set.
    """
    ref = parse_dataset_uri(uri)
    if ref.scheme == "builtin":
        images = load_builtin(ref.name, resolution, ref.seed)
        check_split(uri, len(images), n_train, n_test)
        return images[len(images) - n_train:], images[:n_test]

    store, manifest = open_packed(uri, resolution)
    check_split(uri, manifest.count, n_train, n_test)
    first_train = manifest.count - n_train
    test, train = _read_ranges(store, manifest, [(0, n_test), (first_train, manifest.count)],
                               cache_dir)
    return train, test


def load_range(uri: str, resolution: int, start: int, stop: int,
               cache_dir: str | None = None) -> np.ndarray:
    """Images start..stop-1 of the dataset order, uint8 [stop-start, R, R, 3].

    For a streamed trial that needs a few images without loading its whole training set: the
    first K training images of size N are `load_range(uri, R, size - N, size - N + K)`.
    """
    ref = parse_dataset_uri(uri)
    if ref.scheme == "builtin":
        images = load_builtin(ref.name, resolution, ref.seed)
        size = len(images)
    else:
        store, manifest = open_packed(uri, resolution)
        size = manifest.count
    if not 0 <= start <= stop <= size:
        raise ValueError(f"dataset {uri!r} holds {size} images: no range {start}..{stop}")
    if ref.scheme == "builtin":
        return images[start:stop]
    return _read_ranges(store, manifest, [(start, stop)], cache_dir)[0]


def _read_ranges(store: Store, manifest: Manifest, ranges: list[tuple[int, int]],
                 cache_dir: str | None) -> list[np.ndarray]:
    """The images of each [lo, hi) range, reading each needed shard once through webdataset."""
    r = manifest.resolution
    shards = {s.name: s for lo, hi in ranges for s in manifest.shards_for(lo, hi)}
    out = [np.empty((hi - lo, r, r, 3), np.uint8) for lo, hi in ranges]
    if not shards:
        return out
    wanted = lambda sample: any(lo <= sample["index"] < hi for lo, hi in ranges)  # noqa: E731
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([store.url(name) for name in shards]),
        ShardOpener(store, manifest, cache_dir or os.environ.get(CACHE_ENV)),
        shard_samples,
        wds.select(wanted),
        wds.map(lambda sample: (sample["index"], decode_image(sample, r))),
    )
    for index, image in pipeline:
        for (lo, hi), images in zip(ranges, out):
            if lo <= index < hi:
                images[index - lo] = image
    return out


def check_split(uri: str, size: int, n_train: int, n_test: int) -> None:
    if n_train < 1 or n_train + n_test > size:
        raise ValueError(f"dataset {uri!r} holds {size} images: n_train={n_train} plus "
                         f"{n_test} test images does not fit")


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [-1, 1], the range the models work in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
