"""When an artifact no longer matches the data its experiment holds (after cdm-forget or
cdm-add-source). The store's checked loads refuse such artifacts; jobs, lifecycle and provenance
ask the same question here, so there is one answer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cdm.core.names import ShardId
from cdm.store.layout import StoreLayout
from cdm.store.records import list_manifests, load_manifest, read_sources


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
            return f"source {name} was forgotten (cdm-forget forget.shard); its data is gone"
        now = manifest_hash(name) if name else None
        if now is None:  # the manifest does not exist (any more)
            continue
        if now != old:
            return f"manifest {name} was {str(old)[:12]} when trained, is {str(now)[:12]} now"
    return None
