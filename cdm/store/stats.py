"""Cached reference statistics and evaluation results: computed once, keyed by what they depend on.

Reference statistics of a feature space over a set of images (mean, covariance and the features
themselves, which KID and the nearest-neighbour metrics need) live under
``<root>/stats/<feature_space>/<key>/`` where ``key`` names the dataset, the image set and the
hash of its sample ids; the card lists those ids' hash and the feature network it came from, so
the forgetting ledger can tell which statistics saw which data. Evaluations of a samples artifact
live under ``<root>/experiments/<exp>/evals/<samples-name>/``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cdm.store.store import (
    ArtifactStore,
    CorruptArtifactError,
    _write_card,
    _write_dir_atomically,
    read_card,
    sha256_file,
    validate_name,
)

STATS_FILE = "features.npz"


def stats_dir(store: ArtifactStore, feature_space: str, key: str) -> Path:
    """``<root>/stats/<feature_space>/<key>``."""
    return store.root / "stats" / validate_name(feature_space, "feature space") / validate_name(key)


def save_reference_features(
    store: ArtifactStore, feature_space: str, key: str, features: np.ndarray, card: Mapping
) -> dict[str, Any]:
    """Write the reference features [N, d] (npz, no pickle) and their card atomically."""
    final = stats_dir(store, feature_space, key)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, features=np.asarray(features, dtype=np.float64))
        (tmp / STATS_FILE).write_bytes(buffer.getvalue())
        written.update(
            card,
            kind="ref_stats",
            weights_file=STATS_FILE,
            weights_sha256=sha256_file(tmp / STATS_FILE),
        )
        _write_card(tmp, written)

    _write_dir_atomically(final, write)
    return written


def load_reference_features(
    store: ArtifactStore, feature_space: str, key: str
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached features and card, or None when not computed yet. A corrupt file is refused."""
    directory = stats_dir(store, feature_space, key)
    if not (directory / "card.json").exists():
        return None
    card = read_card(directory)
    path = directory / STATS_FILE
    if not path.is_file() or sha256_file(path) != card.get("weights_sha256"):
        raise CorruptArtifactError(
            f"reference statistics {path} are missing or do not match their card's sha256; "
            f"delete {directory} and evaluate again to recompute them"
        )
    with np.load(path, allow_pickle=False) as data:
        return data["features"], card


def evals_dir(store: ArtifactStore, experiment: str, samples_name: str) -> Path:
    """``<root>/experiments/<experiment>/evals/<samples_name>``."""
    return store.experiment_dir(experiment) / "evals" / validate_name(samples_name, "samples name")


def save_evaluation(
    store: ArtifactStore, experiment: str, samples_name: str, card: Mapping[str, Any]
) -> dict[str, Any]:
    """Write one samples artifact's evaluation card atomically."""
    final = evals_dir(store, experiment, samples_name)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        written.update(_write_card(tmp, {**card, "kind": "evaluation", "path": str(final)}))

    _write_dir_atomically(final, write)
    return written


def load_evaluation(store: ArtifactStore, experiment: str, samples_name: str) -> dict | None:
    """The evaluation card of ``samples_name``, or None."""
    directory = evals_dir(store, experiment, samples_name)
    return read_card(directory) if (directory / "card.json").exists() else None
