"""The provenance graph: every artifact card in a store read once, as nodes with the hashes and
parents that link them (``cdm.provenance.ledger`` walks it)."""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdm.core.hashing import sha256_bytes
from cdm.core.names import ShardId
from cdm.store.cards import CARD_FILENAME
from cdm.store.feature_nets import list_feature_nets
from cdm.store.records import list_certificates, read_sources
from cdm.store.staleness import stale_reason
from cdm.store.store import ArtifactStore

DELETED = "deleted"  # replaced or removed by cdm-forget: links only, never listed
# the order derivations flow in (parents before children) and artifacts are listed in
KINDS = ("backbone", "feature_net", "adapter", "router", "knn_centroids", "ref_stats", "samples",
         "evaluation", "table")  # fmt: skip
SCOPED = frozenset({"adapter", "router", "knn_centroids", "samples", "evaluation"})
_SKIP_DIRS = frozenset({"manifests", "checkpoints", "logs", "certificates", "sources"})
_BY_FOLDER = {"shards": "adapter", "knn": "knn_centroids", "samples": "samples",
              "evals": "evaluation", "stats": "ref_stats"}  # fmt: skip
_BY_CARD_KIND = {"router": "router", "head": "head", "knn_centroids": "knn_centroids", "samples": "samples",
                 "evaluation": "evaluation", "ref_stats": "ref_stats", "backbone": "backbone"}  # fmt: skip


class ProvenanceError(ValueError):
    """A query that cannot be answered (unknown id or source, no query); the message says why."""


def short_hash(h: Any, n: int = 12) -> str:
    return str(h)[:n] if h else "-"


def hashable(value: Any) -> str | None:
    """A card hash as a string (a sharded save records a dict of file hashes)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


# ------------------------------------------------------------------------------ store reading


class CachedStore(ArtifactStore):
    """The caller's store, reading each manifest, sources record and certificate once per query.

    ``stale_reason`` is the store's own (``cdm.store.staleness``) over these memoised reads.
    """

    def __init__(self, store: ArtifactStore | str | Path) -> None:
        super().__init__(store.root if isinstance(store, ArtifactStore) else store)
        self._raw: dict[tuple[str, str], bytes | None] = {}
        self._parsed: dict[tuple[str, str], dict[str, Any]] = {}
        self._sources: dict[str, dict[str, Any]] = {}
        self._certs: dict[str, list[tuple[Path, bytes]]] = {}
        self._cert_json: dict[Path, dict[str, Any]] = {}

    def manifest_bytes(self, experiment: str, name: str) -> bytes | None:
        """The manifest file's bytes (None when it does not exist)."""
        key = (experiment, name)
        if key not in self._raw:
            path = self.manifest_path(experiment, name)
            self._raw[key] = path.read_bytes() if path.is_file() else None
        return self._raw[key]

    def load_manifest(self, experiment: str, name: str) -> dict[str, Any]:
        key = (experiment, name)
        if key not in self._parsed:
            data = self.manifest_bytes(experiment, name)
            if data is None:
                return super().load_manifest(experiment, name)  # raises MissingArtifactError
            try:
                self._parsed[key] = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return super().load_manifest(experiment, name)  # raises CorruptArtifactError
        return self._parsed[key]

    def manifest_hash(self, experiment: str, name: str) -> str | None:
        """The current hash of a manifest, None when it does not exist."""
        if self.manifest_bytes(experiment, name) is None:
            return None
        return self.load_manifest(experiment, name).get("hash")

    def read_sources(self, experiment: str) -> dict[str, Any]:
        if experiment not in self._sources:
            self._sources[experiment] = read_sources(self, experiment)
        return self._sources[experiment]

    def stale_reason(self, experiment: str, card: dict[str, Any]) -> str | None:
        """``cdm.store.staleness.stale_reason`` over the memoised manifests and sources."""
        return stale_reason(
            self,
            experiment,
            card,
            manifest_hash=lambda name: self.manifest_hash(experiment, name),
            sources=self.read_sources(experiment),
        )

    def certificates(self, experiment: str) -> list[tuple[Path, bytes]]:
        """``(path, bytes)`` of the experiment's forget certificates, oldest first."""
        if experiment not in self._certs:
            self._certs[experiment] = [
                (p, p.read_bytes()) for p in list_certificates(self, experiment)
            ]
        return self._certs[experiment]

    def certificate(self, path: Path, data: bytes) -> dict[str, Any]:
        if path not in self._cert_json:
            try:
                self._cert_json[path] = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self._cert_json[path] = {}
        return self._cert_json[path]


def id_needle(sample_id: str) -> bytes:
    """How ``atomic_write_json`` writes the id inside a JSON file (for a fast first filter)."""
    return json.dumps(sample_id).encode()


def slice_of(manifest: dict[str, Any], position: int) -> int | None:
    stops = [int(b) for _, b in manifest.get("slices") or []]
    return bisect.bisect_right(stops, position) if stops else None


def shard_index(name: str | None) -> int | None:
    return ShardId.parse(name).index if ShardId.is_shard(name) else None


# ------------------------------------------------------------------------------ nodes


@dataclass
class Node:
    """One artifact (or one that cdm-forget replaced: ``ghost``) and what it was made from."""

    kind: str
    experiment: str | None
    name: str
    path: Path | None
    hash: str | None
    card: dict[str, Any]
    quarantined: str | None = None  # the forget request's tag
    ghost: str | None = None  # "replaced by cdm-forget <tag>"
    trained_on: list[tuple[str | None, str, str]] = field(default_factory=list)


def _classify(card: dict[str, Any], folder: str) -> str | None:
    if card.get("kind") == "table":
        return "table"
    if "adapter_kind" in card:
        return "adapter"
    return _BY_CARD_KIND.get(str(card.get("kind"))) or _BY_FOLDER.get(folder)


def _node(kind: str, experiment: str | None, directory: Path, card: dict, raw: bytes) -> Node:
    """A node for a card read from ``directory``."""
    name = directory.name
    if kind == "knn_centroids":
        name = f"{directory.parent.name}/{directory.name}"  # <embedder>/shard-KK as parents name it
    elif kind == "ref_stats":
        name = str(card.get("name") or directory.name)
    elif kind == "adapter":
        name = str(card.get("job") or name)
    elif kind in ("feature_net", "backbone"):
        name = str(card.get("name") or name)
    if kind == "backbone":
        digest = card.get("backbone_hash")
    elif kind == "samples":
        digest = (card.get("files") or {}).get("samples.npz")
    elif kind in ("evaluation", "table"):
        digest = sha256_bytes(raw)
    else:
        digest = card.get("weights_sha256")
    node = Node(kind, experiment, name, directory, hashable(digest), card)
    if card.get("manifest_name") and card.get("manifest_hash"):
        node.trained_on.append((experiment, str(card["manifest_name"]), card["manifest_hash"]))
    for m in card.get("shard_manifests") or []:
        if isinstance(m, dict) and m.get("name") and m.get("hash"):
            node.trained_on.append((experiment, str(m["name"]), m["hash"]))
    if kind == "knn_centroids" and card.get("manifest_hash"):
        node.trained_on.append((experiment, directory.name, card["manifest_hash"]))
    if kind == "backbone":  # shared by the experiments with this safe split
        node.trained_on = [(None, n, h) for _, n, h in node.trained_on]
    return node


def _read(path: Path) -> tuple[dict[str, Any], bytes] | None:
    try:
        raw = path.read_bytes()
        card = json.loads(raw)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return (card, raw) if isinstance(card, dict) else None


def _walk_cards(top: Path) -> Iterable[Path]:
    """Every ``card.json`` under ``top``, not descending into artifacts, temp dirs, or (at the top
    of an experiment) its bookkeeping folders and ``forget/pending`` (a retrain being staged)."""
    if not top.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if CARD_FILENAME in filenames and here != top:
            dirnames[:] = []
            yield here / CARD_FILENAME
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here == top:
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        elif here.parent == top and here.name == "forget":
            dirnames[:] = [d for d in dirnames if d == "quarantine"]


def scan_nodes(store: CachedStore, experiments: Sequence[str]) -> list[Node]:
    """Every artifact card of ``experiments`` plus the shared ones (backbones, feature nets,
    reference statistics, tables)."""
    nodes: list[Node] = []
    for path in _walk_cards(store.backbones_root()):
        read = _read(path)
        if read:
            nodes.append(_node("backbone", None, path.parent, *read))
    for entry in list_feature_nets(store):
        if "error" not in entry:
            node = _node("feature_net", None, Path(entry["path"]), entry, b"")
            nodes.append(node)
    for path in _walk_cards(store.stats_root()):
        read = _read(path)
        if read:
            nodes.append(_node("ref_stats", None, path.parent, *read))
    for path in _walk_cards(store.tables_root()):
        read = _read(path)
        if read and read[0].get("kind") == "table":
            nodes.append(_node("table", None, path.parent, *read))
    for exp in experiments:
        exp_dir = store.experiment_dir(exp)
        quarantine = store.quarantine_root(exp)
        for path in _walk_cards(exp_dir):
            rel = path.parent.relative_to(exp_dir).parts
            tag = None
            if rel[0] == "forget":  # forget/quarantine/<tag>/<what>/...
                if len(rel) < 4 or not path.is_relative_to(quarantine):
                    continue
                tag, rel = rel[2], rel[3:]
            read = _read(path)
            if read is None:
                continue
            kind = _classify(read[0], rel[0])
            if kind is None or kind == "table":
                continue
            node = _node(kind, None if kind == "ref_stats" else exp, path.parent, *read)
            node.quarantined = tag
            nodes.append(node)
        nodes += _ghosts(store, exp)
    return nodes


def _ghosts(store: CachedStore, experiment: str) -> list[Node]:
    """Artifacts cdm-forget replaced or deleted, rebuilt from its certificates (hash + data)."""
    out = []
    for path, data in store.certificates(experiment):
        cert = store.certificate(path, data)
        tag = str(cert.get("name") or path.stem)
        note = f"replaced by cdm-forget {tag}"
        manifests = cert.get("manifests") or {}
        old = {n: m.get("old_hash") for n, m in manifests.items() if isinstance(m, dict)}
        for r in cert.get("retrained") or []:
            job = str(r.get("artifact", "")).removeprefix("adapter ")
            if r.get("old_weights_sha256") and r.get("old_manifest_hash"):
                node = Node("adapter", experiment, job, None, hashable(r["old_weights_sha256"]),
                             {}, ghost=note)  # fmt: skip
                node.trained_on = [(experiment, job, r["old_manifest_hash"])]
                out.append(node)
        removed = cert.get("removed") or {}
        if removed.get("adapter_weights_sha256") and removed.get("manifest"):
            job = str(removed["manifest"])
            node = Node("adapter", experiment, job, None,
                         hashable(removed["adapter_weights_sha256"]), {},
                         ghost=f"deleted by cdm-forget {tag}")  # fmt: skip
            node.trained_on = [(experiment, job, removed.get("manifest_hash") or old.get(job))]
            out.append(node)
        shards = [(experiment, n, h) for n, h in old.items() if n.startswith("shard-") and h]
        shards += [
            (experiment, str(u.get("artifact", "")).removeprefix("adapter "), u["manifest_hash"])
            for u in cert.get("unchanged") or []
            if u.get("manifest_hash")
        ]
        for r in cert.get("routers") or []:
            if r.get("old_weights_sha256") and r.get("action") == "retrained":
                name = str(r.get("artifact", "")).removeprefix("router ")
                node = Node("router", experiment, name, None, hashable(r["old_weights_sha256"]),
                             {}, ghost=note)  # fmt: skip
                node.trained_on = list(shards)
                out.append(node)
        for r in cert.get("knn_centroids") or []:
            name = str(r.get("artifact", "")).removeprefix("knn centroids ")
            job = name.rsplit("/", 1)[-1]
            if r.get("old_weights_sha256") and old.get(job):
                node = Node("knn_centroids", experiment, name, None,
                             hashable(r["old_weights_sha256"]), {}, ghost=note)  # fmt: skip
                node.trained_on = [(experiment, job, old[job])]
                out.append(node)
    return out
