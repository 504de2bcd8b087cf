"""Datasets: built-in images, packed WebDataset shards (local or S3), URIs and the train/test split."""

from ditsweep.data.errors import DataError
from ditsweep.data.split import dataset_size, load_range, load_split, parse_dataset_uri, to_model_range

__all__ = ["DataError", "dataset_size", "load_range", "load_split", "parse_dataset_uri",
           "to_model_range"]
