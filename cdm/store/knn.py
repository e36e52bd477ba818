"""k-NN router artifacts: one centroid file per shard, so a shard's centroids come and go with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cdm.store.artifact import checked_card, load_tensors, save_artifact, verify_weights
from cdm.store.layout import StoreLayout

CENTROIDS_FILE = "centroids.safetensors"


def save_centroids(
    layout: StoreLayout,
    experiment: str,
    embedder: str,
    job: str,
    centroids: torch.Tensor,
    card: Mapping[str, Any],
) -> dict[str, Any]:
    """Write one shard's centroids [k, d] (safetensors) and card atomically."""
    return save_artifact(
        layout.centroids_dir(experiment, embedder, job),
        {**card, "kind": "knn_centroids"},
        tensors={"centroids": centroids.detach().cpu().contiguous()},
        weights_file=CENTROIDS_FILE,
    )


def load_centroids(
    layout: StoreLayout, experiment: str, embedder: str, job: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One shard's centroids, checked against the sha256 in its card."""
    directory = layout.centroids_dir(experiment, embedder, job)
    remake = f"cdm-train experiment={experiment} stage=knn"
    card = checked_card(
        directory,
        f"no k-NN centroids for {experiment}/{job} ({embedder}) at {directory}: make them with "
        + remake,
    )
    verify_weights(directory, card, f"recompute with {remake} retrain=true")
    return load_tensors(directory, card)["centroids"], card
