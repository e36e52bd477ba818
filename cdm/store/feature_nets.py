"""Domain feature-net artifacts: one per (dataset, resolution, seed), shared by every experiment.

Layout under the store root::

    feature_nets/<key>/                  feature_net.safetensors + feature_net_config.json + card.json
    feature_nets/checkpoints/<key>/      Lightning last.ckpt / slice-00.ckpt while training
    feature_nets/logs/                   csv / wandb dirs

``<key>`` is ``<dataset>-r<resolution>-seed<seed>`` by default (``feature_net_key``). Writes are
atomic (temp dir + rename); loading checks the weights and config against their card's sha256.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cdm.store.artifact import (
    checked_card,
    cpu_tensors,
    load_config,
    load_tensors,
    save_artifact,
    verify_weights,
)
from cdm.store.cards import CARD_FILENAME, utc_now
from cdm.store.errors import CorruptArtifactError, InvalidNameError, StaleArtifactError, StoreError
from cdm.store.io import delete_path, read_card
from cdm.store.layout import FEATURE_NET_RESERVED, StoreLayout, validate_name, visible_dirs
from cdm.store.records import all_forgotten_ids

WEIGHTS_FILE = "feature_net.safetensors"
CONFIG_FILE = "feature_net_config.json"
DEFAULT_KEY_PATTERN = "{dataset}-r{resolution}-seed{seed}"


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


def clear_feature_net_checkpoints(layout: StoreLayout, key: str) -> bool:
    """Delete a feature net's checkpoints (before retraining it); True if there were any."""
    directory = layout.feature_net_checkpoint_dir(key)
    if not delete_path(directory):
        return False
    try:
        directory.parent.rmdir()  # feature_nets/checkpoints/, once empty
    except OSError:
        pass
    return True


def has_feature_net(layout: StoreLayout, key: str) -> bool:
    """True if a feature-net card exists under ``key``."""
    return (layout.feature_net_dir(key) / CARD_FILENAME).is_file()


def train_hint(dataset: str, resolution: int, seed: int) -> str:
    """The command that trains the feature net of a dataset at a resolution."""
    return (
        f"cdm-train stage=feature_net data={dataset} data.resolution={resolution} seed={seed}  "
        f"(or cdm-train experiment=<any experiment on {dataset}> stage=feature_net)"
    )


def save_feature_net(
    layout: StoreLayout,
    key: str,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    card: Mapping[str, Any],
) -> dict[str, Any]:
    """Write weights (safetensors), config and card atomically; returns the written card.

    The card gains ``kind="feature_net"``, ``name=key``, ``created`` (if absent),
    ``weights_file``, ``weights_sha256`` and ``config_sha256``.
    """
    full = dict(card)
    full.update(kind="feature_net", name=key)
    full.setdefault("created", utc_now())
    return save_artifact(
        layout.feature_net_dir(key),
        full,
        tensors=cpu_tensors(state, f"feature net {key}"),
        weights_file=WEIGHTS_FILE,
        config=config,
        config_file=CONFIG_FILE,
    )


def read_feature_net_card(layout: StoreLayout, key: str, hint: str | None = None) -> dict:
    """The card of a feature net; ``MissingArtifactError`` naming ``hint`` if there is none."""
    directory = layout.feature_net_dir(key)
    how = hint or "cdm-train stage=feature_net data=<dataset> data.resolution=<r> seed=<seed>"
    return checked_card(directory, f"no feature net {key!r} at {directory}. Train it with: {how}")


def feature_net_stale_reason(layout: StoreLayout, card: dict[str, Any]) -> str | None:
    """Why a feature net may no longer be used: ids of its dataset forgotten (in any experiment)
    after it was trained, which its train split still held; else None."""
    prefix = f"{card.get('dataset')}/"
    excluded = set(card.get("forgotten_excluded") or [])
    since = sorted(
        i for i in all_forgotten_ids(layout) if i.startswith(prefix) and i not in excluded
    )
    if not since:
        return None
    return f"{len(since)} ids it was trained on were forgotten since, e.g. {since[0]!r}"


def load_feature_net(
    layout: StoreLayout, key: str, hint: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """A checked feature net -> ``(state_dict, config, card)``.

    Refuses (``StoreError`` subclasses) a missing net, and weights or config whose sha256
    differs from the card. Weights are read with safetensors only.
    """
    card = read_feature_net_card(layout, key, hint)
    directory = layout.feature_net_dir(key)
    how = hint or "cdm-train stage=feature_net ... retrain=true"
    remedy = f"Retrain it ({how} retrain=true) or restore {directory} from a backup."
    if card.get("kind") != "feature_net":
        raise CorruptArtifactError(
            f"{directory} holds a {card.get('kind')!r} card, not a feature net. {remedy}"
        )
    verify_weights(directory, card, remedy)
    stale = feature_net_stale_reason(layout, card)
    if stale:
        raise StaleArtifactError(
            f"feature net {key!r} is stale: {stale} (cdm-forget). Retrain it without them: "
            f"{how} retrain=true"
        )
    config = load_config(directory, card, CONFIG_FILE, "config_sha256", "feature net", remedy)
    return load_tensors(directory, card), config, card


def list_feature_nets(layout: StoreLayout) -> list[dict[str, Any]]:
    """Every feature-net card, as ``list_artifacts`` entries (``artifact="feature_net"``, path)."""
    entries = []
    for directory in visible_dirs(layout.feature_nets_root()):
        if directory.name in FEATURE_NET_RESERVED or not (directory / CARD_FILENAME).is_file():
            continue
        try:
            entry: dict[str, Any] = read_card(directory)
        except StoreError as exc:
            entry = {"error": str(exc), "name": directory.name}
        entry.update(artifact="feature_net", path=str(directory), experiment=None)
        entries.append(entry)
    return entries
