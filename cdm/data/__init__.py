"""Datasets with stable ids and content hashes; safe/shard/slice manifests."""

from cdm.data.datasets import DATASETS, ArrayDataset, FileDataset, SampleDataset, build_dataset
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
    "DATASETS",
    "STRATEGIES",
    "ArrayDataset",
    "FileDataset",
    "Manifest",
    "SampleDataset",
    "Split",
    "build_dataset",
    "held_out",
    "indices_of",
    "make_split",
    "slice_indices",
]
