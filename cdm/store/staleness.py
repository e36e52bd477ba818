"""When an artifact no longer matches the data its experiment holds (after cdm-forget or
cdm-add-source). The store's checked loads refuse such artifacts; jobs, lifecycle and provenance
ask the same question here, so there is one answer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cdm.core.names import ShardId
from cdm.store.errors import StoreError
from cdm.store.io import read_card
from cdm.store.layout import SAMPLES_FILE, StoreLayout
from cdm.store.records import list_manifests, load_manifest, read_sources

# the parents whose hash changed_parent checks (reference statistics are checked by cdm-eval)
PARENT_KINDS = ("backbone", "adapter", "router", "head", "feature_net", "knn_centroids", "samples")


def stale_reason(
    layout: StoreLayout,
    experiment: str,
    card: Mapping[str, Any],
    *,
    manifest_hash: Callable[[str], str | None] | None = None,
    sources: Mapping[str, Any] | None = None,
) -> str | None:
    """Why ``card``'s artifact no longer matches the experiment's manifests, or None.

    An adapter names the manifest it was fed (``manifest_name``/``manifest_hash``), a router
    every shard manifest (``shard_manifests``); after cdm-forget rewrites a manifest, every
    artifact trained on its old version (e.g. the paragon) is stale until retrained.
    ``manifest_hash`` and ``sources`` let a caller that caches the records pass them in.
    """
    if manifest_hash is None:

        def manifest_hash(name: str) -> str | None:
            if not layout.manifest_path(experiment, name).is_file():
                return None
            return load_manifest(layout, experiment, name).get("hash")

    sources = read_sources(layout, experiment) if sources is None else sources
    trained = []
    if card.get("manifest_name") and card.get("manifest_hash"):
        trained.append((card["manifest_name"], card["manifest_hash"]))
    trained += [(m.get("name"), m.get("hash")) for m in card.get("shard_manifests") or []]
    removed = {r.get("job") for r in sources["removed"]}
    if card.get("shard_manifests"):  # a router covers exactly the experiment's shards
        have = {n for n in list_manifests(layout, experiment) if ShardId.is_shard(n)}
        new = sorted(have - {m.get("name") for m in card["shard_manifests"]})
        if new:
            return f"shards {new} were added after it was trained (cdm-add-source)"
    for name, old in trained:
        if name in removed:
            return f"source {name} was forgotten (cdm-forget forget.source); its data is gone"
        now = manifest_hash(name) if name else None
        if now is None:  # the manifest does not exist (any more)
            continue
        if now != old:
            return f"manifest {name} was {str(old)[:12]} when trained, is {str(now)[:12]} now"
    return None


def parent_hash_now(layout: StoreLayout, experiment: str, parent: Mapping[str, Any]) -> str | None:
    """The hash the store holds now for one ``parents`` entry of a card (None: gone, unreadable,
    or a kind this does not track)."""
    kind, name = parent.get("kind"), str(parent.get("name"))
    try:
        if kind == "backbone":
            return read_card(layout.backbone_dir(name)).get("backbone_hash")
        if kind == "adapter":
            return read_card(layout.adapter_dir(experiment, name)).get("weights_sha256")
        if kind == "router":
            return read_card(layout.router_dir(experiment, name)).get("weights_sha256")
        if kind == "head":
            return read_card(layout.head_dir(experiment, name)).get("weights_sha256")
        if kind == "feature_net":
            return read_card(layout.feature_net_dir(name)).get("weights_sha256")
        if kind == "knn_centroids":
            embedder, job = name.split("/")
            return read_card(layout.centroids_dir(experiment, embedder, job)).get("weights_sha256")
        if kind == "samples":
            return (
                read_card(layout.samples_dir(experiment, name)).get("files", {}).get(SAMPLES_FILE)
            )
    except (StoreError, ValueError):
        return None
    return None


def changed_parent(layout: StoreLayout, experiment: str, card: Mapping[str, Any]) -> str | None:
    """Why a derived artifact (samples, an evaluation) no longer matches its parents, or None:
    a parent (backbone, adapter, router, centroids, feature net, samples) that was retrained,
    redrawn or removed since the artifact was made."""
    for parent in card.get("parents") or []:
        if parent.get("kind") not in PARENT_KINDS:
            continue
        now = parent_hash_now(layout, experiment, parent)
        if now != parent.get("hash"):
            what = f"{parent['kind']} {parent.get('name')}"
            verb = "redrawn" if parent["kind"] == "samples" else "retrained"
            return f"{what} is gone" if now is None else f"{what} was {verb} since"
    return None
