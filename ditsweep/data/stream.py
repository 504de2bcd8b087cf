"""Endless training batches streamed from shards, for training sets too large to hold in memory.

The pipeline is webdataset's: a shard list -> split by node -> split by worker -> open (verified,
optionally cached) -> tar samples -> keep the training samples (the LAST n_train of the manifest
order) -> shuffle buffer -> decode -> batches. Only the shards holding the training set are read.

The shard list is endless (every epoch in a new order, the same order on every node and worker)
and is split after that, so a consumer takes every k-th shard of the endless sequence: no worker
ever runs dry, even when there are fewer training shards than nodes x workers (N=10 lives in one
shard: every worker then reads that shard, in turn).

Unlike the in-memory path (`load_split` + the trainer's generator) a stream cannot be resumed
at the exact sample after a restart: the shuffle buffer's state is not checkpointed.
"""

import functools
import itertools
import random
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from ditsweep.data.shards import ShardOpener, decode_image, shard_samples
from ditsweep.data.split import check_split, load_split, open_packed, parse_dataset_uri


def stream_train_batches(uri: str, n_train: int, batch_size: int, seed: int,
                         shuffle_buffer: int = 1000, num_workers: int = 0,
                         cache_dir: str | None = None,
                         resolution: int | None = None) -> Iterator[torch.Tensor]:
    """Endless float batches [B, 3, R, R] in [-1, 1] of the last `n_train` images of `uri`.

    `resolution` is the packed one when omitted (it must match when given) and is required for
    `builtin:` datasets, which are served from memory. `cache_dir` keeps verified S3 shards on
    local disk, so later epochs and other trials on the node do not download them again.
    """
    ref = parse_dataset_uri(uri)
    if ref.scheme == "builtin":
        if resolution is None:
            raise ValueError(f"dataset {uri!r}: a built-in dataset needs an explicit resolution")
        train, _ = load_split(uri, resolution, n_train, 0)
        return _batches_from_memory(train, batch_size, seed)

    store, manifest = open_packed(uri, resolution)
    check_split(uri, manifest.count, n_train, 0)
    first = manifest.count - n_train
    urls = [store.url(s.name) for s in manifest.shards_for(first, manifest.count)]
    pipeline = wds.DataPipeline(
        EndlessShardList(urls, seed),
        wds.split_by_node,
        wds.split_by_worker,
        ShardOpener(store, manifest, cache_dir),
        shard_samples,
        wds.select(functools.partial(_is_training, first=first)),
        WorkerShuffle(shuffle_buffer, seed),
        wds.map(functools.partial(_to_tensor, resolution=manifest.resolution)),
        wds.batched(batch_size, collation_fn=torch.stack, partial=False),
    )
    if num_workers == 0:
        return iter(pipeline)
    # Batches are made inside the workers; the loader only passes them through.
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers))


class EndlessShardList(torch.utils.data.IterableDataset):
    """{"url": ...} for every shard, epoch after epoch, each epoch shuffled by (seed, epoch)."""

    def __init__(self, urls: list[str], seed: int):
        super().__init__()
        self.urls, self.seed = list(urls), seed

    def __iter__(self) -> Iterator[dict]:
        for epoch in itertools.count():
            order = list(self.urls)
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            for url in order:
                yield {"url": url}


class WorkerShuffle:
    """webdataset's shuffle buffer, seeded per (seed, node, worker) so every consumer differs."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize, self.seed = bufsize, seed

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{rank}-{worker}")
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(samples)


def _is_training(sample: dict, first: int) -> bool:
    return sample["index"] >= first


def _to_tensor(sample: dict, resolution: int) -> torch.Tensor:
    image = decode_image(sample, resolution)
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _batches_from_memory(images: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(len(data), (batch_size,), generator=gen)]
