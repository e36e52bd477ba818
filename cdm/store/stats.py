"""Cached reference statistics and evaluation results: computed once, keyed by what they depend on.

Reference statistics of a feature space over a set of images (mean, covariance and the features
themselves, which KID and the nearest-neighbour metrics need) live under
``<root>/stats/<feature_space>/<key>/`` where ``key`` (a ``StatsKey``) names the dataset, the
image set and the hash of its sample ids; the card lists those ids' hash and the feature network
it came from, so the forgetting ledger can tell which statistics saw which data. Evaluations of a
samples artifact live under ``<root>/experiments/<exp>/evals/<samples-name>/``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from cdm.store.artifact import save_artifact, verify_weights
from cdm.store.cards import CARD_FILENAME
from cdm.store.io import read_card
from cdm.store.layout import StatsKey, StoreLayout

STATS_FILE = "features.npz"
KID_NOTE = (
    "KID is the unbiased MMD^2 estimator (Binkowski et al. 2018): it can be slightly negative "
    "when the two sets are close; read values near 0 as 'no measurable difference'"
)


def save_reference_features(
    layout: StoreLayout,
    feature_space: str,
    key: str | StatsKey,
    features: np.ndarray,
    card: Mapping,
) -> dict[str, Any]:
    """Write the reference features [N, d] (npz, no pickle) and their card atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, features=np.asarray(features, dtype=np.float64))
    return save_artifact(
        layout.stats_dir(feature_space, key),
        {**card, "kind": "ref_stats"},
        lambda tmp: (tmp / STATS_FILE).write_bytes(buffer.getvalue()),
        weights=STATS_FILE,
    )


def load_reference_features(
    layout: StoreLayout, feature_space: str, key: str | StatsKey
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached features and card, or None when not computed yet. A corrupt file is refused."""
    directory = layout.stats_dir(feature_space, key)
    if not (directory / CARD_FILENAME).exists():
        return None
    card = read_card(directory)
    verify_weights(directory, card, f"delete {directory} and evaluate again to recompute them")
    with np.load(directory / STATS_FILE, allow_pickle=False) as data:
        return data["features"], card


def save_evaluation(
    layout: StoreLayout, experiment: str, samples_name: str, card: Mapping[str, Any]
) -> dict[str, Any]:
    """Write one samples artifact's evaluation card atomically."""
    final = layout.evals_dir(experiment, samples_name)
    notes = {"KID": KID_NOTE} if any(str(k).startswith("KID") for k in card.get("metrics") or {}) else {}  # fmt: skip
    card = {**card, **({"notes": notes} if notes else {})}
    return save_artifact(final, {**card, "kind": "evaluation", "path": str(final)}, weights=None)


def load_evaluation(layout: StoreLayout, experiment: str, samples_name: str) -> dict | None:
    """The evaluation card of ``samples_name``, or None."""
    directory = layout.evals_dir(experiment, samples_name)
    return read_card(directory) if (directory / CARD_FILENAME).exists() else None
