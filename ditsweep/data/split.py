"""Dataset URIs and the paper's train/test split.

Every dataset has one fixed order (shuffled once with a seed). The training set of size N is the
LAST N images of that order and the test images are the FIRST ones, so they are never used for
training as long as N + n_test <= size. The split depends only on the dataset URI, never on the
model, so every trial of a sweep sees the same images.

URIs: `builtin:photos`, `builtin:digits`, with an optional shuffle seed `builtin:photos?seed=1`.
"""

from dataclasses import dataclass
from urllib.parse import parse_qs

import numpy as np

from ditsweep.data.builtin import BUILTIN_NAMES, builtin_size, load_builtin


@dataclass(frozen=True)
class DatasetRef:
    scheme: str  # "builtin"
    name: str
    seed: int = 0


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
    raise ValueError(f"unsupported dataset URI {uri!r}; use builtin:NAME")


def dataset_size(uri: str, resolution: int) -> int:
    """How many images the dataset holds (cheap enough to call while validating a sweep)."""
    ref = parse_dataset_uri(uri)
    return builtin_size(ref.name, resolution)


def load_split(uri: str, resolution: int, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 arrays [n, R, R, 3]: train = last n_train, test = first n_test."""
    ref = parse_dataset_uri(uri)
    images = load_builtin(ref.name, resolution, ref.seed)
    check_split(uri, len(images), n_train, n_test)
    return images[len(images) - n_train:], images[:n_test]


def check_split(uri: str, size: int, n_train: int, n_test: int) -> None:
    if n_train < 1 or n_train + n_test > size:
        raise ValueError(f"dataset {uri!r} holds {size} images: n_train={n_train} plus "
                         f"{n_test} test images does not fit")
