"""FID with torch-fidelity: generated samples vs a reference set of training images.

torch-fidelity's default extractor (`inception-v3-compat`, 2048-d pool features) is used with a
LOCAL weights file: nothing is downloaded at run time. The file is the one torch-fidelity would
fetch (weights-inception-2015-12-05-6726825d.pth); the Docker images carry it and point
$DITSWEEP_INCEPTION_WEIGHTS at it. `write_random_inception_weights` makes a randomly initialised
file of the same architecture for tests and offline trials: its FIDs are not comparable with
published numbers.

Images go to torch-fidelity as it expects them: a Dataset of bare uint8 tensors 3xHxW (grayscale
repeated to three channels); it resizes them to 299x299 itself.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from ditsweep.config.weights import weights_file

FEATURE_EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"


class _Uint8Images(torch.utils.data.Dataset):
    """What torch-fidelity wants from a Dataset: item i is a uint8 tensor [3, H, W]."""

    def __init__(self, images: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, images.shape
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Float images [N, C, H, W] in [-1, 1] -> uint8 [N, 3, H, W] (grayscale repeated)."""
    u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8.repeat(1, 3, 1, 1) if u8.shape[1] == 1 else u8


def fid(generated: torch.Tensor, reference: torch.Tensor, weights_path: str | None,
        batch_size: int = 64, cuda: bool = False, reference_key: str | None = None,
        cache_dir: str | None = None) -> float:
    """Frechet Inception distance between two image sets given as uint8 [N, 3, H, W].

    With `reference_key` (anything that identifies the reference images, e.g. dataset, resolution
    and N), the reference statistics are cached on disk under `cache_dir` and computed once per
    node, not at every evaluation: they depend on the data and the weights file, not the model.
    """
    import torch_fidelity  # heavy import; only evaluation actors need it

    path = weights_file(weights_path)
    cache = {"cache": False}
    if reference_key is not None:
        stat = path.stat()  # a different weights file must not reuse the statistics
        key = f"{reference_key}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        cache = {"cache": True,
                 "cache_root": cache_dir or os.path.join(tempfile.gettempdir(), "ditsweep-fid-cache"),
                 "input2_cache_name": "ditsweep-ref-" + hashlib.sha1(key.encode()).hexdigest()[:16]}
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(generated), input2=_Uint8Images(reference), fid=True,
        feature_extractor=FEATURE_EXTRACTOR, feature_layer_fid=FEATURE_LAYER,
        feature_extractor_weights_path=str(path), cuda=cuda, batch_size=batch_size,
        save_cpu_ram=True,  # no DataLoader worker processes inside an evaluation actor
        verbose=False, **cache)
    if cache["cache"]:
        # torch-fidelity also caches the raw features (400 MB for 50k images); the mean and
        # covariance are all that later evaluations need.
        for features in Path(cache["cache_root"]).glob(cache["input2_cache_name"] + "-*-features-*"):
            features.unlink(missing_ok=True)
    return float(metrics["frechet_inception_distance"])


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised state dict of torch-fidelity's InceptionV3 feature extractor.

    For tests and offline runs: the whole FID path (loading, resizing, features, statistics) runs,
    but the numbers mean nothing. The module is built by torch-fidelity's own class, so the keys
    and shapes are exactly those its loader expects.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "empty.pth"
        torch.save({}, empty)  # the constructor loads a file before it calls load_state_dict
        with torch.random.fork_rng():  # leave the caller's random state alone
            torch.manual_seed(seed)
            model = _Untrained(FEATURE_EXTRACTOR, [FEATURE_LAYER], feature_extractor_weights_path=str(empty))
            # He initialisation keeps the activations' scale through the 90-odd ReLU layers
            # (PyTorch's default init shrinks them to ~1e-7, which would make every FID ~0).
            for module in model.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path
