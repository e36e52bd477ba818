"""Sample artifacts: a grid, the samples, the weight trace and a card, written atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdm.core.hashing import sha256_bytes
from cdm.store.store import ArtifactStore, _write_card, _write_dir_atomically, validate_name


def samples_dir(store: ArtifactStore, experiment: str, name: str) -> Path:
    """``<root>/experiments/<experiment>/samples/<name>``."""
    return store.experiment_dir(experiment) / "samples" / validate_name(name, "samples name")


def save_samples(
    store: ArtifactStore,
    experiment: str,
    name: str,
    files: Mapping[str, bytes],
    card: Mapping[str, Any],
) -> dict[str, Any]:
    """Write ``files`` and ``card.json`` (with each file's sha256) into one directory, atomically."""
    final = samples_dir(store, experiment, name)
    written = {
        **card,
        "files": {f: sha256_bytes(data) for f, data in files.items()},
        "path": str(final),
    }

    def write(tmp: Path) -> None:
        for filename, data in files.items():
            (tmp / validate_name(filename, "file name")).write_bytes(data)
        _write_card(tmp, written)

    _write_dir_atomically(final, write)
    return written
