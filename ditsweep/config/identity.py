"""Trial identity: a stable hash of everything that decides a trial's trained weights.

Two trials with the same identity train the same model on the same images in the same order, so
one training serves both (across sweeps, restarts and job retries). The identity covers:

    preset, architecture, resolved layout, variant      (the model)
    dataset URI (normalised) and its fingerprint        (the images: a packed dataset's manifest
                                                          checksum, a built-in dataset's pixels)
    N, seed, data.resolution, data.stream settings      (the split and the batches)
    train.steps, batch_size, lr, ema_decay, precision   (the optimisation)
    CODE_VERSION                                        (the model/diffusion code's math)

and leaves out what does not change the weights: eval settings (evaluations can be added to a
finished run later), resources, the tracking URI, logging and checkpoint cadence, and
attention_backend/compile (the same math through other kernels).

Bump CODE_VERSION whenever a change to models/, diffusion/ or train/loop.py changes the numbers
a given config trains to: every older run then stops being reused.
"""

import hashlib
import json
from functools import lru_cache

from ditsweep.config import TrialConfig

CODE_VERSION = 1
HASH_CHARS = 20  # 80 bits: no collision among any number of trials a lab will ever run

TRAIN_FIELDS = ("steps", "batch_size", "lr", "ema_decay", "precision")


@lru_cache(maxsize=64)
def dataset_fingerprint(uri: str, resolution: int) -> str:
    """A checksum of the dataset's content: the packed manifest's sha256 (it lists every shard's
    sha256), or for a built-in dataset the sha256 of its unshuffled pixels at `resolution`.
    Reads one small file (or the built-in images); raises ValueError/DataError when it cannot."""
    from ditsweep.data.split import open_packed, parse_dataset_uri

    ref = parse_dataset_uri(uri)
    if ref.scheme == "builtin":
        from ditsweep.data.builtin import _unshuffled
        pixels = _unshuffled(ref.name, resolution)
        return "builtin-sha256:" + hashlib.sha256(pixels.tobytes()).hexdigest()
    _, manifest = open_packed(uri, resolution)
    return "manifest-sha256:" + hashlib.sha256(manifest.to_json().encode()).hexdigest()


def normalised_dataset(uri: str) -> str:
    """One spelling per dataset: builtin:photos == builtin:photos?seed=0, s3://b/x/ == s3://b/x,
    a relative path == its absolute path."""
    from ditsweep.data.split import parse_dataset_uri

    ref = parse_dataset_uri(uri)
    if ref.scheme == "builtin":
        return f"builtin:{ref.name}?seed={ref.seed}"
    return ref.location


def identity_fields(cfg: TrialConfig, fingerprint: str | None) -> dict:
    """What the identity hashes, as a JSON-able dict (also shown by --dry-run on request)."""
    data = {"resolution": cfg.data.resolution, "stream": cfg.data.stream}
    if cfg.data.stream:  # the shuffle buffer and loader workers decide the batch order
        data.update(shuffle_buffer=cfg.data.shuffle_buffer, loader_workers=cfg.data.loader_workers)
    return {
        "code_version": CODE_VERSION,
        "model": cfg.model, "arch": cfg.arch, "layout": cfg.layout, "variant": cfg.variant,
        "dataset": normalised_dataset(cfg.dataset), "dataset_fingerprint": fingerprint,
        "n_train": cfg.n_train, "seed": cfg.seed, "data": data,
        "train": {k: getattr(cfg.train, k) for k in TRAIN_FIELDS},
        # pca-attention trials: which stage-1 artifact their PCs come from (others: absent)
        **({"inputs": {k: v.model_dump() for k, v in cfg.inputs.items()}} if cfg.inputs else {}),
    }


def trial_identity(cfg: TrialConfig, fingerprint: str | None = None) -> str:
    """The identity hash of a trial. `fingerprint` defaults to reading the dataset's; pass
    None explicitly through `recipe_key` when the dataset cannot be read (a dry run)."""
    if fingerprint is None:
        fingerprint = dataset_fingerprint(cfg.dataset, cfg.data.resolution)
    return _hash(identity_fields(cfg, fingerprint))


def recipe_key(cfg: TrialConfig) -> str:
    """The identity without the dataset fingerprint: equal for trials that name the same
    dataset URI. Used to count distinct trials when datasets are not opened (--dry-run)."""
    return _hash(identity_fields(cfg, None))


def _hash(fields: dict) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def try_identity(cfg: TrialConfig) -> tuple[str | None, str]:
    """(identity, "") or (None, why the dataset could not be fingerprinted)."""
    try:
        return trial_identity(cfg), ""
    except Exception as e:  # DataError, ValueError, S3 errors: the dataset is not readable here
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
