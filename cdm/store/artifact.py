"""One generic artifact: files + optional JSON config + ``card.json`` recording their sha256.

Every kind (backbone, adapter, router, k-NN centroids, feature net, statistics, samples,
evaluations, tables) is written by ``save_artifact`` into a hidden temp dir and moved into place
atomically, and read back by ``checked_card`` + ``verify_weights`` + ``load_config``, which
refuse a missing artifact, a file whose sha256 differs from its card, or unparsable weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from cdm.core.hashing import sha256_bytes
from cdm.store.cards import CARD_FILENAME
from cdm.store.errors import CorruptArtifactError, MissingArtifactError, StoreError
from cdm.store.io import (
    atomic_write_json,
    read_card,
    read_json,
    recover,
    sha256_file,
    write_card,
    write_dir_atomically,
)
from cdm.store.layout import validate_name

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_GLOB = "*.safetensors"


def cpu_tensors(state: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a state dict; ``StoreError`` if it is empty."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if not tensors:
        raise StoreError(f"{what}: the state dict is empty")
    return tensors


def weights_record(directory: Path, pattern: str = WEIGHTS_GLOB) -> dict[str, Any]:
    """``weights_file`` + ``weights_sha256`` of the file(s) matching ``pattern`` in ``directory``.

    One file: the sha256 is a hex string. Several (a sharded save): a dict ``{file: sha256}``.
    """
    files = sorted(p.name for p in directory.glob(pattern))
    if not files:
        raise StoreError(f"no {pattern} file was written into {directory}")
    if len(files) == 1:
        return {"weights_file": files[0], "weights_sha256": sha256_file(directory / files[0])}
    return {
        "weights_file": None,
        "weights_sha256": {name: sha256_file(directory / name) for name in files},
    }


def save_artifact(
    final: Path,
    card: Mapping[str, Any],
    write: Callable[[Path], None] | None = None,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    weights_file: str | None = None,
    weights: str | None = WEIGHTS_GLOB,
    config: Mapping[str, Any] | None = None,
    config_file: str | None = None,
    config_key: str = "config_sha256",
    files: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """Write one artifact directory ``final`` atomically; returns its card as read back.

    In a fresh temp dir: ``write(tmp)`` (e.g. ``save_pretrained``), ``tensors`` as safetensors
    ``weights_file``, ``files`` as given, ``config`` as JSON ``config_file``; then ``card.json``:
    ``card`` plus ``weights_file``/``weights_sha256`` of the files matching ``weights`` (None:
    no weights), ``config_key`` (the config's sha256) and ``files`` (each file's sha256).
    """
    written: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        if write is not None:
            write(tmp)
        if tensors is not None:
            from safetensors.torch import save_file

            save_file(dict(tensors), str(tmp / validate_name(str(weights_file), "weights file")),
                      metadata={"format": "pt"})  # fmt: skip
        for filename, data in (files or {}).items():
            (tmp / validate_name(filename, "file name")).write_bytes(data)
        full = dict(card)
        if config is not None:
            full[config_key] = atomic_write_json(tmp / str(config_file), dict(config))
        if files:
            full["files"] = {f: sha256_bytes(data) for f, data in files.items()}
        if weights is not None:
            full.update(weights_record(tmp, weights))
        written.update(write_card(tmp, full))

    write_dir_atomically(final, fill)
    return written


def checked_card(directory: Path, missing: str) -> dict[str, Any]:
    """The card of the artifact in ``directory`` (after ``recover``); ``MissingArtifactError``
    with the message ``missing`` (what makes it) when there is none."""
    recover(directory)
    if not (directory / CARD_FILENAME).is_file():
        raise MissingArtifactError(missing)
    return read_card(directory)


def verify_weights(directory: Path, card: Mapping[str, Any], remedy: str) -> None:
    """Check every weights file the card records against its sha256, and that safetensors parse."""
    from safetensors import safe_open

    recorded = card.get("weights_sha256")
    if isinstance(recorded, str):
        name = card.get("weights_file") or DIFFUSERS_WEIGHTS
        expected = {name: recorded}
    elif isinstance(recorded, dict) and recorded:
        expected = dict(recorded)
    else:
        raise CorruptArtifactError(
            f"card {directory / CARD_FILENAME} has no weights_sha256, so the weights cannot be "
            f"checked; the artifact was not written by ArtifactStore. {remedy}"
        )
    for name, sha in expected.items():
        path = directory / validate_name(name, "weights file name")
        if not path.is_file():
            raise CorruptArtifactError(
                f"artifact {directory} is corrupt or incomplete: weights file {path} is missing. "
                f"{remedy}"
            )
        actual = sha256_file(path)
        if actual != sha:
            raise CorruptArtifactError(
                f"weights file {path} is corrupt: sha256 {actual} differs from {sha} recorded in "
                f"its card. {remedy}"
            )
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                list(handle.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CorruptArtifactError(
                f"weights file {path} is corrupt: safetensors cannot parse it ({exc}). {remedy}"
            ) from exc


def verify_file(directory: Path, card: Mapping[str, Any], filename: str, remedy: str) -> bytes:
    """The bytes of ``filename``, checked against the sha256 in the card's ``files``."""
    path = directory / validate_name(filename, "file name")
    data = path.read_bytes() if path.is_file() else None
    if data is None or sha256_bytes(data) != (card.get("files") or {}).get(filename):
        raise CorruptArtifactError(
            f"{path} is missing or does not match its card's sha256 (corrupt): {remedy}"
        )
    return data


def load_config(
    directory: Path, card: Mapping[str, Any], config_file: str, config_key: str, what: str,
    remedy: str,
) -> dict[str, Any]:  # fmt: skip
    """The JSON config of an artifact, checked against the card's ``config_key`` sha256."""
    path = directory / config_file
    if not path.is_file() or sha256_file(path) != card.get(config_key):
        raise CorruptArtifactError(
            f"{what} config {path} is missing or corrupt (its sha256 differs from the card's "
            f"{config_key}). {remedy}"
        )
    return read_json(path, f"{what} config", remedy)


def load_tensors(directory: Path, card: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The safetensors weights file named by a (verified) card."""
    from safetensors.torch import load_file

    return load_file(str(directory / card["weights_file"]))
