"""k-NN router artifacts: one centroid file per shard, so a shard's centroids come and go with it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cdm.store.store import (
    ArtifactStore,
    CorruptArtifactError,
    MissingArtifactError,
    _write_card,
    _write_dir_atomically,
    read_card,
    sha256_file,
    validate_name,
)

CENTROIDS_FILE = "centroids.safetensors"


def centroids_dir(store: ArtifactStore, experiment: str, embedder: str, job: str) -> Path:
    """``<root>/experiments/<experiment>/knn/<embedder>/<job>``."""
    return (
        store.experiment_dir(experiment)
        / "knn"
        / validate_name(embedder, "embedder name")
        / validate_name(job)
    )


def save_centroids(
    store: ArtifactStore,
    experiment: str,
    embedder: str,
    job: str,
    centroids: torch.Tensor,
    card: Mapping[str, Any],
) -> dict[str, Any]:
    """Write one shard's centroids [k, d] (safetensors) and card atomically."""
    final = centroids_dir(store, experiment, embedder, job)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        save_file({"centroids": centroids.detach().cpu().contiguous()}, str(tmp / CENTROIDS_FILE))
        written.update(
            card,
            kind="knn_centroids",
            weights_file=CENTROIDS_FILE,
            weights_sha256=sha256_file(tmp / CENTROIDS_FILE),
        )
        _write_card(tmp, written)

    _write_dir_atomically(final, write)
    return written


def load_centroids(
    store: ArtifactStore, experiment: str, embedder: str, job: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One shard's centroids, checked against the sha256 in its card."""
    directory = centroids_dir(store, experiment, embedder, job)
    if not (directory / "card.json").is_file():
        raise MissingArtifactError(
            f"no k-NN centroids for {experiment}/{job} ({embedder}) at {directory}: "
            f"make them with cdm-train experiment={experiment} stage=knn"
        )
    card = read_card(directory)
    if sha256_file(directory / CENTROIDS_FILE) != card.get("weights_sha256"):
        raise CorruptArtifactError(
            f"{directory / CENTROIDS_FILE} is corrupt (sha256 differs from its card): "
            f"recompute with cdm-train experiment={experiment} stage=knn retrain=true"
        )
    return load_file(str(directory / CENTROIDS_FILE))["centroids"], card
