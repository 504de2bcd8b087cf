"""Pack a dataset once: shuffled, resized images into WebDataset tar shards plus a manifest.

Each sample is `{key}.png` (the image at the target resolution, lossless) and `{key}.json`
(index, original file, class), key = the sample's index in the shuffled order. Shards are built
in a local temporary directory and moved or uploaded one at a time, so packing ImageNet needs
disk for one shard, not for the dataset. The manifest goes last: it is the commit marker.
"""

import io
import json
import os
import tempfile
from typing import BinaryIO

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ditsweep.data.errors import DataError
from ditsweep.data.s3 import NotFound, S3Settings
from ditsweep.data.shards import MANIFEST, Manifest, Shard, open_shard, read_manifest, sha256_of
from ditsweep.data.sources import open_source
from ditsweep.data.split import packed_store
from ditsweep.data.store import Store


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def png_bytes(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def pack(source: str, dest: str, resolution: int = 32, shard_size: int = 5000, seed: int = 0,
         name: str | None = None, workers: int = 1, limit: int | None = None,
         overwrite: bool = False,
         settings: S3Settings | None = None, progress: bool = True) -> Manifest:
    """Pack `source` (builtin:NAME or a folder) into `dest` (a local directory or s3://bucket/prefix).

    `limit` packs only the first `limit` images of the shuffled order (a random subset).
    """
    if resolution < 1 or shard_size < 1 or (limit is not None and limit < 1):
        raise ValueError("resolution, shard size and limit must be positive")
    store = Store(dest, settings)
    if not overwrite and _has_manifest(store):
        raise DataError(f"{dest}: already holds a packed dataset ({MANIFEST}); pass --overwrite "
                        "to replace it")
    src = open_source(source, resolution, seed, workers, limit)
    shards: list[Shard] = []
    with tempfile.TemporaryDirectory(prefix="ditsweep-pack-") as tmp, \
            tqdm(total=src.count, unit="img", desc=f"pack {src.name}", disable=not progress) as bar:
        writer, path, stream = None, "", None
        for index, (pixels, meta) in enumerate(src.images()):
            if index % shard_size == 0:
                if writer is not None:
                    shards.append(_finish(writer, stream, path, store, len(shards), shard_size))
                path = os.path.join(tmp, shard_name(len(shards)))
                stream = open(path, "wb")
                # mtime 0: the same images always give byte-identical shards (and checksums).
                writer = wds.TarWriter(stream, encoder=False, mtime=0)
            sample = {"__key__": f"{index:08d}", "png": png_bytes(pixels),
                      "json": json.dumps({"index": index, **meta}, sort_keys=True).encode()}
            writer.write(sample)
            bar.update()
        if writer is not None:
            last = src.count - shard_size * len(shards)
            shards.append(_finish(writer, stream, path, store, len(shards), last))
    starts = [sum(s.count for s in shards[:i]) for i in range(len(shards))]
    manifest = Manifest(name or src.name, src.description, resolution, src.count, seed,
                        tuple(Shard(s.name, s.count, s.sha256, s.bytes, start)
                              for s, start in zip(shards, starts)))
    store.put_bytes(MANIFEST, manifest.to_json().encode())
    return manifest


def _finish(writer: wds.TarWriter, stream: BinaryIO, path: str, store: Store, i: int,
            count: int) -> Shard:
    writer.close()
    stream.close()
    with open(path, "rb") as f:
        digest = sha256_of(f)
    size = os.path.getsize(path)
    store.put_file(path, shard_name(i))
    return Shard(shard_name(i), count, digest, size)


def _has_manifest(store: Store) -> bool:
    try:
        store.read_bytes(MANIFEST)
    except NotFound:
        return False
    return True


def verify(uri: str, progress: bool = True) -> Manifest:
    """Check every shard of a packed dataset against its sha256 (raises DataError on the first bad one)."""
    store = packed_store(uri)
    manifest = read_manifest(store, uri)
    for shard in tqdm(manifest.shards, unit="shard", desc=f"verify {uri}", disable=not progress):
        open_shard(store, shard).close()
    return manifest
