"""Packed datasets: the manifest, and reading shards back as checked samples.

A packed dataset is a directory (local or S3) of WebDataset tar shards plus `manifest.json`:

    {"format": "ditsweep-shards/1", "name": "photos", "source": "builtin:photos",
     "resolution": 32, "count": 1344, "seed": 0,
     "shards": [{"name": "shard-000000.tar", "count": 1000, "sha256": "...", "bytes": 3276800}, ...]}

Samples are stored in manifest order, the pack seed's shuffle: sample i has key `%08d % i` and
lives in the shard whose range holds i, so the split (train = last N) maps to known shards
without listing or opening anything else. The manifest is written last: a dataset without one
was never finished.

Every shard is checked against its sha256 before a byte of it is decoded, and every failure
(missing manifest or shard, checksum, truncated tar, undecodable image) is a DataError that
names the shard.
"""

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from ditsweep.data.errors import DataError, describe
from ditsweep.data.s3 import NotFound
from ditsweep.data.store import Store

MANIFEST = "manifest.json"
FORMAT = "ditsweep-shards/1"
SPOOL_BYTES = 64 * 1024 * 1024  # shards up to this size stay in memory while being read


@dataclass(frozen=True)
class Shard:
    name: str
    count: int
    sha256: str
    bytes: int
    start: int = 0  # manifest index of the shard's first sample (derived, not stored)


@dataclass(frozen=True)
class Manifest:
    name: str
    source: str
    resolution: int
    count: int
    seed: int
    shards: tuple[Shard, ...]

    def to_json(self) -> str:
        shards = [{k: v for k, v in asdict(s).items() if k != "start"} for s in self.shards]
        return json.dumps({"format": FORMAT, "name": self.name, "source": self.source,
                           "resolution": self.resolution, "count": self.count, "seed": self.seed,
                           "shards": shards}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "Manifest":
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
            shards, start = [], 0
            for s in raw["shards"]:
                shards.append(Shard(str(s["name"]), int(s["count"]), str(s["sha256"]),
                                    int(s["bytes"]), start))
                start += shards[-1].count
            manifest = cls(str(raw["name"]), str(raw.get("source", "")), int(raw["resolution"]),
                           int(raw["count"]), int(raw["seed"]), tuple(shards))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: not a valid manifest ({describe(e)})") from None
        if start != manifest.count:
            raise DataError(f"{where}: shard counts add up to {start}, manifest says {manifest.count}")
        return manifest

    def shards_for(self, lo: int, hi: int) -> list[Shard]:
        """The shards holding samples lo..hi-1 (in manifest order)."""
        return [s for s in self.shards if s.start < hi and s.start + s.count > lo]


def read_manifest(store: Store, uri: str) -> Manifest:
    """The manifest of the packed dataset at `store`; `uri` is how the user named it."""
    try:
        text = store.read_bytes(MANIFEST)
    except NotFound:
        raise DataError(f"{uri}: no {MANIFEST} at {store.url(MANIFEST)}: not a packed dataset "
                        "(or packing did not finish); pack one with `python -m ditsweep.data pack`") from None
    return Manifest.from_json(text, store.url(MANIFEST))


def sha256_of(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _check(f: BinaryIO, shard: Shard, url: str) -> BinaryIO:
    f.seek(0)
    actual = sha256_of(f)
    if actual != shard.sha256:
        f.close()
        raise DataError(f"{url}: sha256 mismatch (manifest {shard.sha256[:16]}..., got {actual[:16]}...)")
    f.seek(0)
    return f


def open_shard(store: Store, shard: Shard, cache_dir: str | None = None) -> BinaryIO:
    """The shard's bytes as a file at position 0, verified against the manifest's sha256.

    Local shards are read in place. Remote ones are downloaded whole (retried as a whole, so an
    endpoint that goes away mid-read is survived) into memory or, with `cache_dir`, into a
    content-addressed file that later reads (other trials on the node) reuse.
    """
    url = store.url(shard.name)
    local = store.local_file(shard.name)
    if local is not None:
        try:
            return _check(open(local, "rb"), shard, url)
        except FileNotFoundError:
            raise DataError(f"{url}: shard listed in the manifest is missing") from None
    if cache_dir is None:
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        _download(store, shard, url, spool)
        return _check(spool, shard, url)

    # Named by content: a repacked dataset under the same prefix can never hit a stale file.
    cached = Path(cache_dir) / f"{shard.sha256[:20]}-{shard.name}"
    if cached.exists():
        try:
            return _check(open(cached, "rb"), shard, url)
        except DataError:
            cached.unlink(missing_ok=True)  # damaged on disk: fetch it again
    cached.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name, then an atomic rename: trials sharing the cache never see half a file.
    fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=cached.name + ".")
    try:
        with os.fdopen(fd, "w+b") as f:
            _download(store, shard, url, f)
            _check(f, shard, url)
        os.replace(tmp, cached)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return open(cached, "rb")


def _download(store: Store, shard: Shard, url: str, dest: BinaryIO) -> None:
    try:
        store.download(shard.name, dest)
    except NotFound:
        raise DataError(f"{url}: shard listed in the manifest is missing") from None


class ShardOpener:
    """WebDataset stage: {"url"} -> {"url", "stream", "shard"} with the stream verified."""

    def __init__(self, store: Store, manifest: Manifest, cache_dir: str | None = None):
        self.store, self.cache_dir = store, cache_dir
        self.by_url = {store.url(s.name): s for s in manifest.shards}

    def __call__(self, sources: Iterable[dict]) -> Iterator[dict]:
        for source in sources:
            shard = self.by_url[source["url"]]
            yield {**source, "shard": shard, "stream": open_shard(self.store, shard, self.cache_dir)}


def shard_samples(opened: Iterable[dict]) -> Iterator[dict]:
    """WebDataset stage: opened shards -> samples {"__key__", "__url__", "png", "json", "index"}.

    webdataset does the tar parsing and grouping; this wraps it one shard at a time so that a
    truncated tar, or a shard whose samples are not the ones the manifest promises, is reported
    with the shard's URL.
    """
    for source in opened:
        url, shard = source["url"], source["shard"]
        position = 0
        try:
            for sample in group_by_keys(tar_file_expander([source])):
                expected = f"{shard.start + position:08d}"
                if sample["__key__"] != expected:
                    raise DataError(f"{url}: sample {position} has key {sample['__key__']!r}, "
                                    f"expected {expected!r} (shard does not match the manifest)")
                sample["index"] = shard.start + position
                position += 1
                yield sample
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tarfile, EOF and OS errors all mean a bad shard
            reason = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__
            raise DataError(f"{url}: not a readable tar shard, truncated or corrupt "
                            f"({type(e).__name__}: {reason})") from None
        finally:
            source["stream"].close()
        if position != shard.count:
            raise DataError(f"{url}: holds {position} samples, the manifest says {shard.count} "
                            "(truncated or not the packed shard)")


def decode_image(sample: dict, resolution: int) -> np.ndarray:
    """A sample's PNG as uint8 [R, R, 3]; a DataError naming shard and key if it does not decode."""
    where = f"{sample['__url__']}: sample {sample['__key__']}"
    if "png" not in sample:
        raise DataError(f"{where} has no .png (has {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        with Image.open(io.BytesIO(sample["png"])) as img:
            image = np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy wants one)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise DataError(f"{where}.png does not decode ({describe(e)})") from None
    if image.shape != (resolution, resolution, 3):
        raise DataError(f"{where}.png is {image.shape[1]}x{image.shape[0]}, the manifest says "
                        f"{resolution}x{resolution}")
    return image

