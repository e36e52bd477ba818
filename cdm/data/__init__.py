"""Datasets with stable ids and content hashes; safe/shard/slice manifests."""

from cdm.data.datasets import (
    ArrayDataset,
    FileDataset,
    SampleDataset,
    build_dataset,
    dataset_from_config,
)
from cdm.data.loaders import load_digits_dataset
from cdm.data.manifest import Manifest, Split, held_out, indices_of, slice_indices
from cdm.data.sharding import STRATEGIES, make_split

__all__ = [
    "STRATEGIES",
    "ArrayDataset",
    "FileDataset",
    "Manifest",
    "SampleDataset",
    "Split",
    "build_dataset",
    "dataset_from_config",
    "held_out",
    "indices_of",
    "load_digits_dataset",
    "make_split",
    "slice_indices",
]
