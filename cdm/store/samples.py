"""Sample artifacts: a grid, the samples, the weight trace and a card, written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cdm.store.artifact import checked_card, save_artifact, verify_file
from cdm.store.layout import SAMPLES_FILE, StoreLayout


def save_samples(
    layout: StoreLayout,
    experiment: str,
    name: str,
    files: Mapping[str, bytes],
    card: Mapping[str, Any],
) -> dict[str, Any]:
    """Write ``files`` and ``card.json`` (with each file's sha256) into one directory, atomically."""
    final = layout.samples_dir(experiment, name)
    return save_artifact(final, {**card, "path": str(final)}, weights=None, files=files)


def read_samples_file(
    layout: StoreLayout, experiment: str, name: str, filename: str = SAMPLES_FILE
) -> tuple[bytes, dict[str, Any]]:
    """``(bytes, card)`` of one file of a samples artifact, checked against its card's sha256."""
    directory = layout.samples_dir(experiment, name)
    card = checked_card(
        directory,
        f"no samples {name!r} in experiment {experiment!r} ({directory}): draw them first with "
        f"cdm-sample experiment={experiment} composition=... name={name}",
    )
    return verify_file(directory, card, filename, "draw the samples again"), card
