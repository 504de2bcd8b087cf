"""The paper's own numbers (FID of Tables 1-3 and 5), shipped with the package for `--reference paper`."""

import re
from importlib import resources

import pandas as pd

PAPER_TABLES = "paper_tables.csv"


def paper_table() -> pd.DataFrame:
    """Columns: table, model, run (main / alt), dataset, n_train, configuration, metric, value."""
    with resources.files(__name__).joinpath(PAPER_TABLES).open() as f:
        return pd.read_csv(f, comment="#")


def dataset_key(name: str) -> str:
    """A spelling-insensitive key, so that a sweep's `celeba32`, `CelebA` or `lsun-church` finds
    the paper's `CelebA` / `LSUN Church`: lower-case letters and digits only, without a trailing
    resolution (32, 32x32), a `-shuffleN` suffix and the `lsun` prefix."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = re.sub(r"shuffle\d*$", "", key)  # celeba32-shuffle1: the same set in another order
    key = re.sub(r"(\d+x\d+|\d+)$", "", key)
    return key.removeprefix("lsun") or key


def paper_dataset(sweep_dataset: str, paper_datasets: list[str]) -> str | None:
    """The paper's name for a sweep's dataset short name, or None when the paper has no such set."""
    by_key = {dataset_key(d): d for d in paper_datasets}
    return by_key.get(dataset_key(sweep_dataset))
