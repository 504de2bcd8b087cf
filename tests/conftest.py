import os
import sys
from pathlib import Path

import pytest
import yaml

# Keep tests to the two cores CI has, and keep Ray quiet and local.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def tiny_sweep(**overrides) -> dict:
    """A sweep dict small enough to train in seconds on a CPU."""
    sweep = {
        "name": "tiny",
        "grid": {"model": ["DiT-T/1"], "layout": ["global"], "n_train": [10], "seed": [0],
                 "dataset": ["builtin:photos"]},
        "data": {"resolution": 8},
        "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9, "log_every": 2,
                  "checkpoint_every": 3},
        # a 4-image sample grid at 10 steps: the default 16 x 250 steps was a third of the CPU
        # time of every end-to-end test's final evaluation
        "eval": {"psnr_gap": {"num_images": 8, "steps": 5}, "samples": {"num_images": 4, "sampling_steps": 10}},
        "resources": {"cpus_per_trial": 1},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            sweep[section] = {**sweep.get(section, {}), field: value}
        else:
            sweep[section] = value
    return sweep


def write_sweep(tmp_path: Path, sweep: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.fixture
def sweep_file(tmp_path):
    return lambda **overrides: write_sweep(tmp_path, tiny_sweep(**overrides))


def trial(**overrides):
    """The first trial of a tiny sweep (see tiny_sweep), fully resolved."""
    from ditsweep.config import Sweep, expand
    return expand(Sweep.model_validate(tiny_sweep(**overrides)))[0]


def images(n: int = 10):
    """The last n built-in photos at 8x8 in the models' range [-1, 1]."""
    from ditsweep.data import load_split, to_model_range
    train, _ = load_split("builtin:photos", 8, n, 0)
    return to_model_range(train)
