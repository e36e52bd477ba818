"""What cdm-list shows: every artifact's card under a store root, and a plain-text table of them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cdm.store import records
from cdm.store.cards import CARD_FILENAME
from cdm.store.errors import StoreError
from cdm.store.feature_nets import feature_net_stale_reason, list_feature_nets
from cdm.store.io import read_card
from cdm.store.layout import OLD_PREFIX, TMP_PREFIX, StoreLayout, validate_name, visible_dirs
from cdm.store.staleness import changed_parent, stale_reason
from cdm.store.stats import KID_NOTE

# list_artifacts: the artifact type of a card under experiments/<exp>/, by its "kind"
ARTIFACT_OF_KIND = {
    "router": "router",
    "head": "head",  # a shard's compartmental-router head (experiments/<exp>/heads/shard-KK)
    "knn_centroids": "knn",
    "samples": "samples",
    "evaluation": "evaluation",
}


def _format_seconds(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.4g}"


def _metrics_summary(metrics: Any, limit: int = 3) -> str:
    """Up to ``limit`` scalar metrics, losses first: ``final_loss=0.0312 steps=500``."""
    if not isinstance(metrics, Mapping):
        return "-"
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, int | float | str)]
    scalars.sort(key=lambda kv: 0 if "loss" in str(kv[0]) else 1)
    parts = [f"{k}={_format_value(v)}" for k, v in scalars[:limit]]
    return " ".join(parts) if parts else "-"


def _prefix(value: Any, n: int = 10) -> str:
    return str(value)[:n] if value else "-"


def format_table(cards: Iterable[Mapping[str, Any]]) -> str:
    """A plain-text table with one row per artifact (as returned by ``list_artifacts``)."""
    header = (
        "ARTIFACT",
        "KIND",
        "NAME",
        "STATUS",
        "DATA",
        "BACKBONE",
        "METRICS",
        "WALL",
        "CREATED",
    )
    rows = []
    for card in cards:
        artifact = card.get("artifact", "-")
        experiment = card.get("experiment")
        if artifact == "adapter":
            name = f"{experiment}/{card.get('job', card.get('name', '?'))}"
        elif artifact == "manifest":
            name = f"{experiment}/manifests/{card.get('name', '?')}"
        else:
            name = str(card.get("backbone_id") or card.get("name", "?"))
        status = str(card.get("status", "-"))
        if "error" in card:
            rows.append(
                (artifact, "?", name, status, "-", "-", f"ERROR: {card['error']}", "-", "-")
            )
            continue
        data_hash = card.get("manifest_hash")
        kind = kind_label(card)
        metrics = _metrics_summary(card.get("metrics"))
        if artifact == "manifest" and card.get("n_samples") is not None:
            metrics = f"n_samples={card['n_samples']}"
        rows.append(
            (
                str(artifact),
                kind,
                name,
                status,
                _prefix(data_hash),
                _prefix(card.get("backbone_hash")),
                metrics,
                _format_seconds(card.get("wall_time_s")),
                str(card.get("created", "-")),
            )
        )
    if not rows:
        return "(no artifacts)"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    if any("KID" in row[header.index("METRICS")] for row in rows):
        lines.append(f"note: {KID_NOTE}")
    return "\n".join(lines)


def kind_label(card: Mapping[str, Any]) -> str:
    """``shard/lora``: the card's kind, with its adapter kind when that says more."""
    kind = str(card.get("kind", "-"))
    adapter_kind = card.get("adapter_kind")
    return f"{kind}/{adapter_kind}" if adapter_kind and adapter_kind != kind else kind


def summary_line(card: Mapping[str, Any]) -> str:
    """One line for a job's card, as a training command reports it:
    ``shard-00 (shard/lora): 435 steps, heldout_loss=0.1743 train/loss=0.1189, 2m07s``."""
    kind = kind_label(card)
    steps = card.get("optimizer_steps") or (card.get("metrics") or {}).get("global_step")
    metrics = {k: v for k, v in (card.get("metrics") or {}).items() if k != "global_step"}
    parts = [
        f"{steps} steps" if steps is not None else None,
        _metrics_summary(metrics, limit=2),
        _format_seconds(card.get("wall_time_s")),
    ]
    name = card.get("job") or card.get("name", "?")
    return f"{name} ({kind}): " + ", ".join(p for p in parts if p and p != "-")


def card_entry(artifact: str, directory: Path, **extra: Any) -> dict[str, Any]:
    try:
        entry: dict[str, Any] = read_card(directory)
    except StoreError as exc:
        entry = {"error": str(exc)}
    entry.update(artifact=artifact, path=str(directory), **extra)
    return entry


def quarantined_entries(store: StoreLayout, experiment: str) -> list[dict[str, Any]]:
    """The cards that forget requests set aside (``forget/quarantine/<tag>/...``), marked with
    their request's tag (``quarantined``)."""
    root = store.quarantine_root(experiment)
    entries = []
    for card_path in sorted(root.rglob(CARD_FILENAME)) if root.is_dir() else []:
        directory = card_path.parent
        tag = directory.relative_to(root).parts[0]
        entry = card_entry("adapter", directory, experiment=experiment, job=directory.name)
        entry.update(artifact=ARTIFACT_OF_KIND.get(entry.get("kind"), "adapter"), quarantined=tag)
        entries.append(entry)
    return entries


def artifact_status(store: StoreLayout, entry: Mapping[str, Any]) -> str:
    """``current``, ``stale (why)`` or ``quarantined (request tag)`` for a ``list_artifacts``
    entry: stale when trained on data the experiment no longer holds
    (``cdm.store.staleness.stale_reason``), when a parent was retrained or redrawn since
    (``changed_parent``; e.g. an evaluation of samples that were replaced) or, for a feature
    net, when ids it saw were forgotten."""
    if entry.get("quarantined"):
        return f"quarantined ({entry['quarantined']})"
    if "error" in entry:
        return "unreadable"
    experiment, reason = entry.get("experiment"), None
    if entry.get("artifact") == "feature_net":
        reason = feature_net_stale_reason(store, dict(entry))
    elif experiment and entry.get("artifact") not in ("manifest", "backbone"):
        reason = stale_reason(store, experiment, entry) or changed_parent(store, experiment, entry)
    return "current" if reason is None else f"stale ({reason})"


def list_artifacts(store: StoreLayout, experiment: str | None = None) -> list[dict[str, Any]]:
    """Every backbone, manifest and adapter card under the root (or of one experiment).

    Each entry is the card plus ``artifact`` ("backbone" | "manifest" | "adapter" | ...),
    ``path``, ``experiment`` (None for backbones) and ``status`` (``artifact_status``), plus
    ``job`` for adapters, ``backbone_id`` for backbones and ``quarantined`` (the forget
    request's tag) for what a forget request set aside. Hidden temp dirs are skipped; an unreadable card gives an entry with ``error``.
    Sorted by (experiment, artifact, name).
    """
    entries: list[dict[str, Any]] = []
    if experiment is None:
        for directory in visible_dirs(store.backbones_root()):
            if (directory / CARD_FILENAME).is_file():
                entries.append(
                    card_entry("backbone", directory, experiment=None, backbone_id=directory.name)
                )
        experiments = records.list_experiments(store)
        entries += list_feature_nets(store)
    else:
        experiments = [validate_name(experiment, "experiment name")]
    for exp in experiments:
        exp_dir = store.experiment_dir(exp)
        for name in records.list_manifests(store, exp):
            path = store.manifest_path(exp, name)
            entry: dict[str, Any] = {"kind": "manifest", "name": name}
            try:
                manifest = records.load_manifest(store, exp, name)
                for key in ("manifest_hash", "hash"):
                    if manifest.get(key):
                        entry["manifest_hash"] = manifest[key]
                        break
                ids = manifest.get("ids")
                entry["n_samples"] = manifest.get("n_samples", len(ids) if ids else None)
                if "created" in manifest:
                    entry["created"] = manifest["created"]
            except StoreError as exc:
                entry["error"] = str(exc)
            entry.update(artifact="manifest", path=str(path), experiment=exp)
            entries.append(entry)
        # adapters, routers, k-NN centroids, samples: any card outside manifests/checkpoints/logs
        for card_path in sorted(exp_dir.rglob(CARD_FILENAME)):
            parts = card_path.relative_to(exp_dir).parts
            if parts[0] in {"manifests", "checkpoints", "logs", "forget"} or any(
                p.startswith((TMP_PREFIX, OLD_PREFIX)) for p in parts
            ):
                continue
            directory = card_path.parent
            entry = card_entry("adapter", directory, experiment=exp, job=directory.name)
            entry["artifact"] = ARTIFACT_OF_KIND.get(entry.get("kind"), "adapter")
            entries.append(entry)
        entries += quarantined_entries(store, exp)
    for entry in entries:
        entry["status"] = artifact_status(store, entry)
    order = {"backbone": 0, "manifest": 1, "adapter": 2, "router": 3, "knn": 4, "samples": 5,
             "evaluation": 6, "feature_net": 7}  # fmt: skip
    entries.sort(
        key=lambda e: (
            e.get("experiment") or "",
            order.get(e["artifact"], 9),
            str(e.get("job") or e.get("backbone_id") or e.get("name") or ""),
            e["path"],
        )
    )
    return entries
