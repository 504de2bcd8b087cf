"""Datasets: built-in images, dataset URIs and the train/test split."""

from ditsweep.data.split import dataset_size, load_split, parse_dataset_uri

__all__ = ["dataset_size", "load_split", "parse_dataset_uri"]
