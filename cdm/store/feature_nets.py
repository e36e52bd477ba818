"""Domain feature-net artifacts: one per (dataset, resolution, seed), shared by every experiment.

Layout under the store root::

    feature_nets/<key>/                  feature_net.safetensors + feature_net_config.json + card.json
    feature_nets/checkpoints/<key>/      Lightning last.ckpt / slice-00.ckpt while training
    feature_nets/logs/                   csv / wandb dirs

``<key>`` is ``<dataset>-r<resolution>-seed<seed>`` by default (``feature_net_key``). Writes are
atomic (temp dir + rename); loading checks the weights and config against their card's sha256.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cdm.store.cards import CARD_FILENAME, utc_now
from cdm.store.store import (
    ArtifactStore,
    CorruptArtifactError,
    InvalidNameError,
    MissingArtifactError,
    StaleArtifactError,
    StoreError,
    _recover,
    _verify_weights,
    _visible_dirs,
    _write_card,
    _write_dir_atomically,
    atomic_write_json,
    read_card,
    sha256_file,
    validate_name,
)

FEATURE_NETS_DIR = "feature_nets"
WEIGHTS_FILE = "feature_net.safetensors"
CONFIG_FILE = "feature_net_config.json"
DEFAULT_KEY_PATTERN = "{dataset}-r{resolution}-seed{seed}"
_RESERVED = frozenset({"checkpoints", "logs"})


def feature_net_key(
    dataset: str, resolution: int, seed: int, pattern: str = DEFAULT_KEY_PATTERN, **fields: Any
) -> str:
    """Store key of a feature net: ``feature_net_key("digits", 8, 0) == "digits-r8-seed0"``.

    ``pattern`` may use ``{dataset}``, ``{resolution}``, ``{seed}`` and any extra ``fields``
    (the job passes ``{channels}``).
    """
    try:
        key = pattern.format(dataset=dataset, resolution=int(resolution), seed=int(seed), **fields)
    except (KeyError, IndexError) as exc:
        raise InvalidNameError(
            f"feature_net.id pattern {pattern!r} uses an unknown field {exc}: use {{dataset}}, "
            f"{{resolution}}, {{seed}} or {{channels}}"
        ) from exc
    return validate_name(key, "feature net id")


def feature_nets_root(store: ArtifactStore) -> Path:
    """``<root>/feature_nets``."""
    return store.root / FEATURE_NETS_DIR


def feature_net_dir(store: ArtifactStore, key: str) -> Path:
    """``<root>/feature_nets/<key>``."""
    validate_name(key, "feature net id")
    if key in _RESERVED:
        raise InvalidNameError(f"feature net id {key!r} is reserved ({sorted(_RESERVED)})")
    return feature_nets_root(store) / key


def feature_net_checkpoint_dir(store: ArtifactStore, key: str) -> Path:
    """``<root>/feature_nets/checkpoints/<key>`` (Lightning ``last.ckpt`` while training)."""
    return feature_nets_root(store) / "checkpoints" / feature_net_dir(store, key).name


def feature_net_log_dir(store: ArtifactStore) -> Path:
    """``<root>/feature_nets/logs`` (not created here)."""
    return feature_nets_root(store) / "logs"


def clear_feature_net_checkpoints(store: ArtifactStore, key: str) -> bool:
    """Delete a feature net's checkpoints (before retraining it); True if there were any."""
    directory = feature_net_checkpoint_dir(store, key)
    if not directory.exists():
        return False
    shutil.rmtree(directory)
    try:
        directory.parent.rmdir()  # feature_nets/checkpoints/, once empty
    except OSError:
        pass
    return True


def has_feature_net(store: ArtifactStore, key: str) -> bool:
    """True if a feature-net card exists under ``key``."""
    return (feature_net_dir(store, key) / CARD_FILENAME).is_file()


def train_hint(dataset: str, resolution: int, seed: int) -> str:
    """The command that trains the feature net of a dataset at a resolution."""
    return (
        f"cdm-train stage=feature_net data={dataset} data.resolution={resolution} seed={seed}  "
        f"(or cdm-train experiment=<any experiment on {dataset}> stage=feature_net)"
    )


def save_feature_net(
    store: ArtifactStore,
    key: str,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    card: Mapping[str, Any],
) -> dict[str, Any]:
    """Write weights (safetensors), config and card atomically; returns the written card.

    The card gains ``kind="feature_net"``, ``name=key``, ``created`` (if absent),
    ``weights_file``, ``weights_sha256`` and ``config_sha256``.
    """
    from safetensors.torch import save_file

    final = feature_net_dir(store, key)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if not tensors:
        raise StoreError(f"feature net {key}: the state dict is empty")
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config_sha = atomic_write_json(tmp / CONFIG_FILE, dict(config))
        full = dict(card)
        full.update(kind="feature_net", name=key, config_sha256=config_sha)
        full.setdefault("created", utc_now())
        full.update(weights_file=WEIGHTS_FILE, weights_sha256=sha256_file(tmp / WEIGHTS_FILE))
        written.update(_write_card(tmp, full))

    _write_dir_atomically(final, write)
    return written


def read_feature_net_card(store: ArtifactStore, key: str, hint: str | None = None) -> dict:
    """The card of a feature net; ``MissingArtifactError`` naming ``hint`` if there is none."""
    directory = feature_net_dir(store, key)
    _recover(directory)
    if not (directory / CARD_FILENAME).is_file():
        how = hint or "cdm-train stage=feature_net data=<dataset> data.resolution=<r> seed=<seed>"
        raise MissingArtifactError(f"no feature net {key!r} at {directory}. Train it with: {how}")
    return read_card(directory)


def feature_net_stale_reason(store: ArtifactStore, card: dict[str, Any]) -> str | None:
    """Why a feature net may no longer be used: ids of its dataset forgotten (in any experiment)
    after it was trained, which its train split still held; else None."""
    prefix = f"{card.get('dataset')}/"
    excluded = set(card.get("forgotten_excluded") or [])
    since = sorted(
        i for i in store.all_forgotten_ids() if i.startswith(prefix) and i not in excluded
    )
    if not since:
        return None
    return f"{len(since)} ids it was trained on were forgotten since, e.g. {since[0]!r}"


def load_feature_net(
    store: ArtifactStore, key: str, hint: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A checked feature net -> ``(state_dict, config, card)``.

    Refuses (``StoreError`` subclasses) a missing net, and weights or config whose sha256
    differs from the card. Weights are read with safetensors only.
    """
    from safetensors.torch import load_file

    card = read_feature_net_card(store, key, hint)
    directory = feature_net_dir(store, key)
    how = hint or "cdm-train stage=feature_net ... retrain=true"
    remedy = f"Retrain it ({how} retrain=true) or restore {directory} from a backup."
    if card.get("kind") != "feature_net":
        raise CorruptArtifactError(
            f"{directory} holds a {card.get('kind')!r} card, not a feature net. {remedy}"
        )
    _verify_weights(directory, card, remedy)
    stale = feature_net_stale_reason(store, card)
    if stale:
        raise StaleArtifactError(
            f"feature net {key!r} is stale: {stale} (cdm-forget). Retrain it without them: "
            f"{how} retrain=true"
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or sha256_file(config_path) != card.get("config_sha256"):
        raise CorruptArtifactError(
            f"feature net config {config_path} is missing or corrupt (sha256 differs from the "
            f"card's config_sha256). {remedy}"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    state = load_file(str(directory / card["weights_file"]))
    return state, config, card


def list_feature_nets(store: ArtifactStore) -> list[dict[str, Any]]:
    """Every feature-net card, as ``list_artifacts`` entries (``artifact="feature_net"``, path)."""
    entries = []
    for directory in _visible_dirs(feature_nets_root(store)):
        if directory.name in _RESERVED or not (directory / CARD_FILENAME).is_file():
            continue
        try:
            entry: dict[str, Any] = read_card(directory)
        except StoreError as exc:
            entry = {"error": str(exc), "name": directory.name}
        entry.update(artifact="feature_net", path=str(directory), experiment=None)
        entries.append(entry)
    return entries
