"""Datasets with stable ids and content hashes; safe/shard/slice manifests."""

from cdm.data.datasets import (
    ArrayDataset,
    FileDataset,
    SampleDataset,
    build_dataset,
    dataset_from_config,
    load_digits_dataset,
)
from cdm.data.sharding import (
    STRATEGIES,
    Manifest,
    Split,
    held_out,
    indices_of,
    make_split,
    slice_indices,
)

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
