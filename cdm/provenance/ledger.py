"""The provenance ledger: which artifacts derive from a sample id or a source (``cdm-provenance``).

Nothing is recorded for it: every answer is a query over what the store already holds, so it can
never disagree with the store.

* where a sample is: the manifests of each experiment that list it (shard, SISA slice, content
  hash), or, once forgotten, the forget certificate whose request lists it;
* which versions of those manifests held it: the current one and, walking the certificates'
  ``old_hash -> new_hash`` records backwards, every older one (forgetting only removes ids);
* what was derived from those versions, transitively, through the cards: adapters (``manifest_name``
  / ``manifest_hash``; the paragon through ``private``), the backbone (``safe``), routers
  (``shard_manifests``), k-NN centroids (``manifest_hash``), reference statistics (``ids_hash``),
  samples (``parents`` by hash; an adapter parent also names its ``manifest_hash``), evaluations
  (their samples and reference statistics), tables (their cells' experiment, samples and
  metrics), and domain feature nets, which train on their dataset's whole train split;
* each one's status: ``served`` (live and current), ``stale`` (trained on a manifest version the
  experiment no longer holds, as ``cdm.store.staleness.stale_reason`` says, or derived from something
  that is no longer current) or ``quarantined`` (set aside under ``forget/quarantine`` by
  cdm-forget).

Artifacts that cdm-forget replaced (the retrained shard's old adapter, the old router and k-NN
centroids) are no longer in the store; their certificate's hashes still link what was drawn from
them. The store layout is read through ``ArtifactStore``; the folders it has no method for
(``stats/``, ``tables/``, ``forget/quarantine/``) are derived from ``store.root`` and
``store.experiment_dir`` below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdm.provenance.graph import (
    DELETED,
    KINDS,
    SCOPED,
    CachedStore,
    Node,
    ProvenanceError,
    hashable,
    id_needle,
    scan_nodes,
    shard_index,
    short_hash,
    slice_of,
)
from cdm.store.feature_nets import feature_net_stale_reason
from cdm.store.layout import StatsKey, validate_name
from cdm.store.records import forgotten_ids
from cdm.store.store import ArtifactStore

__all__ = [
    "QUARANTINED",
    "SERVED",
    "STALE",
    "ProvenanceError",
    "dependents",
    "format_report",
    "locate",
    "what_depends_on",
]

SERVED, STALE, QUARANTINED = "served", "stale", "quarantined"

# ------------------------------------------------------------------------------ seeds


@dataclass
class _Seeds:
    """What the query's data is: manifest versions holding it, and datasets whose train split does."""

    versions: set[tuple[str, str, str]] = field(default_factory=set)  # (experiment, name, hash)
    train_datasets: set[str] = field(default_factory=set)

    def add_chain(
        self,
        store: CachedStore,
        experiment: str,
        name: str,
        digest: str | None,
        query_ids: frozenset[str] = frozenset(),
    ) -> None:
        """``digest`` and every older version of the manifest that held the same ids, following
        the ``old_hash -> new_hash`` records of forget certificates (which only remove ids) and of
        added sources (which only add a shard to ``private``) backwards."""
        if not digest:
            return
        known = {digest}
        changed = True
        while changed:
            changed = False
            records = [
                store.certificate(path, data) for path, data in store.certificates(experiment)
            ]
            records += [  # cdm-add-source grows private: before it, private held none of its ids
                a for a in store.read_sources(experiment)["added"]
                if not query_ids & set((a.get("manifest") or {}).get("ids") or [])
            ]  # fmt: skip
            for record in records:
                m = (record.get("manifests") or {}).get(name)
                if isinstance(m, dict) and m.get("new_hash") in known and m.get("old_hash"):
                    if m["old_hash"] not in known:
                        known.add(m["old_hash"])
                        changed = True
        self.versions |= {(experiment, name, h) for h in known}

    def match(self, experiment: str | None, name: str, digest: str | None) -> bool:
        if experiment is None:  # shared artifact (the backbone): any experiment's manifest
            return any(n == name and h == digest for _, n, h in self.versions)
        return (experiment, name, digest) in self.versions

    def has_hash(self, digest: Any, experiment: str | None = None) -> str | None:
        """The manifest name of a seeded version with this hash (in ``experiment`` if given)."""
        for exp, name, h in self.versions:
            if h == digest and (experiment is None or exp == experiment):
                return name
        return None


def _train_split_dataset(meta: dict[str, Any], sample_id: str | None = None) -> str | None:
    """The dataset whose train split holds a manifest's ids (None for added sources, whose
    samples are in no dataset split, and for ids not named ``<dataset>/...``)."""
    dataset = meta.get("dataset")
    if not dataset or meta.get("split", "train") != "train" or meta.get("strategy") == "added":
        return None
    if sample_id is not None and not sample_id.startswith(f"{dataset}/"):
        return None
    return str(dataset)


# ------------------------------------------------------------------------------ the query


def _experiments(store: ArtifactStore, experiment: str | None) -> list[str]:
    if experiment is None:
        return store.list_experiments()
    validate_name(experiment, "experiment name")
    if not store.experiment_dir(experiment).is_dir():
        have = ", ".join(store.list_experiments()) or "none"
        raise ProvenanceError(
            f"no experiment {experiment!r} under {store.experiments_root()} (it has: {have})"
        )
    return [experiment]


def _locate(
    store: CachedStore, sample_id: str, experiments: Sequence[str]
) -> tuple[list[dict[str, Any]], _Seeds]:
    needle = id_needle(sample_id)
    locations: list[dict[str, Any]] = []
    seeds = _Seeds()
    for exp in experiments:
        for name in store.list_manifests(exp):
            data = store.manifest_bytes(exp, name)
            if data is None or needle not in data:
                continue
            manifest = store.load_manifest(exp, name)
            ids = manifest.get("ids") or []
            try:
                pos = ids.index(sample_id)
            except ValueError:
                continue
            hashes = manifest.get("content_hashes") or []
            meta = manifest.get("meta") or {}
            locations.append(
                {"experiment": exp, "manifest": name, "shard": shard_index(name),
                 "slice": slice_of(manifest, pos), "content_hash": hashes[pos] if pos < len(hashes) else None,
                 "source": meta.get("source"), "manifest_hash": manifest.get("hash"),
                 "forgotten": False, "certificate": None}
            )  # fmt: skip
            seeds.add_chain(store, exp, name, manifest.get("hash"), frozenset([sample_id]))
            dataset = _train_split_dataset(meta, sample_id)
            if dataset:
                seeds.train_datasets.add(dataset)
        if sample_id not in set(forgotten_ids(store, exp)):
            continue
        found = False
        for path, data in store.certificates(exp):
            if needle not in data:
                continue
            cert = store.certificate(path, data)
            manifests = cert.get("manifests") or {}
            for s in (cert.get("request") or {}).get("samples") or []:
                if s.get("id") != sample_id:
                    continue
                found = True
                name = s.get("manifest")
                old = (manifests.get(name) or {}).get("old_hash")
                locations.append(
                    {"experiment": exp, "manifest": name, "shard": s.get("shard"),
                     "slice": s.get("slice"), "content_hash": s.get("content_hash"), "source": None,
                     "manifest_hash": old, "forgotten": True, "certificate": str(path)}
                )  # fmt: skip
                seeds.add_chain(store, exp, name, old)
                seeds.add_chain(
                    store, exp, "private", (manifests.get("private") or {}).get("old_hash")
                )
                dataset = _train_split_dataset({"dataset": cert.get("dataset")}, sample_id)
                if dataset:
                    seeds.train_datasets.add(dataset)
        if not found:
            locations.append(_forgotten_with_a_source(store, exp, sample_id, seeds))
    return locations, seeds


def _forgotten_with_a_source(
    store: CachedStore, experiment: str, sample_id: str, seeds: _Seeds
) -> dict[str, Any]:
    """A forgotten id no sample request lists: it left with a whole source. Which one is known
    only when a single source was removed (the store keeps no id list of a removed source)."""
    removed = [r for r in store.read_sources(experiment).get("removed", []) if r.get("job")]
    entry: dict[str, Any] = {"experiment": experiment, "manifest": None, "shard": None,
                             "slice": None, "content_hash": None, "source": None,
                             "manifest_hash": None, "forgotten": True, "certificate": None}  # fmt: skip
    if len(removed) != 1:
        jobs = ", ".join(r["job"] for r in removed) or "none recorded"
        entry["note"] = (
            f"forgotten with a whole source ({jobs}); the store does not record which one held "
            "this id, so what derived from it is not listed"
        )
        return entry
    r = removed[0]
    path = store.certificate_path(experiment, str(r.get("certificate")))
    entry["note"] = f"inferred: {r['job']} is the only source removed from {experiment}"
    entry.update(manifest=r["job"], shard=shard_index(r["job"]), source=r.get("source"),
                 manifest_hash=r.get("manifest_hash"),
                 certificate=str(path) if path.is_file() else r.get("certificate"))  # fmt: skip
    seeds.add_chain(store, experiment, r["job"], r.get("manifest_hash"))
    if path.is_file():
        cert = store.certificate(path, path.read_bytes())
        private = ((cert.get("manifests") or {}).get("private") or {}).get("old_hash")
        seeds.add_chain(store, experiment, "private", private)
    return entry


def _source_seeds(
    store: CachedStore, source: str, experiments: Sequence[str]
) -> tuple[list[dict[str, Any]], _Seeds]:
    """The shard manifests named ``source`` or whose ``meta["source"]`` is ``source`` (current or
    removed as a whole source), seeded as in ``dependents``."""
    locations: list[dict[str, Any]] = []
    seeds = _Seeds()
    needle = id_needle(source)
    for exp in experiments:
        picked = []
        for name in store.list_manifests(exp):
            data = store.manifest_bytes(exp, name) or b""
            if not name.startswith("shard-") or (name != source and needle not in data):
                continue
            meta = store.load_manifest(exp, name).get("meta") or {}
            if source in (name, str(meta.get("source"))):
                picked.append(name)
        for r in store.read_sources(exp).get("removed", []):
            if r.get("job") and source in (r["job"], str(r.get("source"))):
                picked.append(str(r["job"]))
        for name in dict.fromkeys(picked):
            location = _seed_manifest(store, exp, name, seeds)
            if location is not None:
                locations.append(location)
    return locations, seeds


class _Ledger:
    """The derivation walk and the status of each artifact over one scan of the store."""

    def __init__(self, store: CachedStore, nodes: list[Node], seeds: _Seeds) -> None:
        self.store = store
        self.nodes = nodes
        self.seeds = seeds
        self.index: dict[tuple[str, str], list[Node]] = {}
        self.by_name: dict[tuple[str, str], list[Node]] = {}
        for node in nodes:
            if node.hash:
                self.index.setdefault((node.kind, node.hash), []).append(node)
            self.by_name.setdefault((node.kind, node.name), []).append(node)
        self.evals: dict[tuple[str | None, str], list[Node]] = {}
        for node in nodes:
            if node.kind == "evaluation":
                self.evals.setdefault((node.experiment, node.name), []).append(node)
        self.via: dict[int, list[str]] = {}
        self._status: dict[int, tuple[str, str | None]] = {}

    # ---- links

    def parents(self, node: Node) -> list[tuple[dict[str, Any], list[Node]]]:
        """Each recorded parent of ``node`` and the nodes it resolves to (by kind and hash)."""
        out = []
        for p in node.card.get("parents") or []:
            if not isinstance(p, dict) or not p.get("kind"):
                continue
            kind, digest = str(p["kind"]), hashable(p.get("hash"))
            if digest:
                candidates = self.index.get((kind, digest), [])
            else:  # a parent recorded by name only
                candidates = self.by_name.get((kind, str(p.get("name"))), [])
            found = [
                n
                for n in candidates
                if (kind not in SCOPED or n.experiment == node.experiment)
                and (not p.get("name") or n.name == p["name"])
            ]
            out.append((p, found))
        if node.kind == "table":
            for cell in self._cells(node):
                evals = self.evals.get((cell.get("experiment"), str(cell.get("samples"))), [])
                exact = [e for e in evals if "metrics" in cell and e.card.get("metrics") == cell["metrics"]]  # fmt: skip
                ref = {
                    "kind": "evaluation",
                    "name": f"{cell.get('experiment')}/{cell.get('samples')}",
                }
                out.append((ref, exact or evals))
        return out

    @staticmethod
    def _cells(table: Node) -> list[dict[str, Any]]:
        card = table.card
        cells = [c for c in card.get("cells") or [] if isinstance(c, dict)]
        cells += [
            {"experiment": card.get("experiment"), **p}
            for p in card.get("points") or []
            if isinstance(p, dict)
        ]  # fmt: skip  (cdm/fig2.py: one experiment, points)
        return [c for c in cells if c.get("samples")]

    def derive(self) -> None:
        """Mark every node derived from the seeds, with the links that make it so."""
        order = {k: i for i, k in enumerate(KINDS)}
        ranked = sorted(self.nodes, key=lambda n: order.get(n.kind, len(KINDS)))
        changed = True
        while changed:  # one pass suffices when parents come first; repeat for safety
            changed = False
            for node in ranked:
                if id(node) in self.via:
                    continue
                via = self._links(node)
                if via:
                    self.via[id(node)] = via
                    changed = True

    def _links(self, node: Node) -> list[str]:
        seeds, via = self.seeds, []
        for exp, name, digest in node.trained_on:
            if seeds.match(exp, name, digest):
                via.append(f"manifest {name} ({short_hash(digest)})")
        card = node.card
        if node.kind == "ref_stats":
            name = seeds.has_hash(card.get("ids_hash"))
            if name:
                via.append(f"reference set = manifest {name} ({short_hash(card.get('ids_hash'))})")
            key = StatsKey.parse(node.name)
            if key and key.reference == "train" and key.dataset in seeds.train_datasets:
                via.append(f"reference set = the train split of {key.dataset}")
        if node.kind == "feature_net":
            dataset = card.get("dataset")
            if dataset in seeds.train_datasets and card.get("split", "train") == "train":
                via.append(f"trained on the dataset's train split ({dataset})")
        for p, found in self.parents(node):
            hit = [n for n in found if id(n) in self.via]
            label = parent_label(p)
            if hit:
                via.append(label + (f" ({hit[0].ghost})" if hit[0].ghost else ""))
            elif p.get("manifest_hash") and seeds.has_hash(p["manifest_hash"], node.experiment):
                via.append(f"{label}, trained on manifest {short_hash(p['manifest_hash'])}")
        return list(dict.fromkeys(via))

    # ---- status

    def status(self, node: Node) -> tuple[str, str | None]:
        """``(status, reason)`` of a node (memoised; parents first)."""
        key = id(node)
        if key not in self._status:
            self._status[key] = (STALE, "cyclic parents")  # never expected; guards recursion
            self._status[key] = self._compute_status(node)
        return self._status[key]

    def _compute_status(self, node: Node) -> tuple[str, str | None]:
        if node.ghost:
            return DELETED, node.ghost
        if node.quarantined:
            return QUARANTINED, f"set aside by cdm-forget {node.quarantined}"
        exp, card = node.experiment, node.card
        store = self.store
        if node.kind in ("adapter", "router") and exp is not None:
            reason = store.stale_reason(exp, card)
            if reason:
                return STALE, reason
        if node.kind == "feature_net":  # trained on a dataset's train split: forgetting any of it
            reason = feature_net_stale_reason(store, card)
            if reason:
                return STALE, reason
        if node.kind == "knn_centroids" and exp is not None and card.get("manifest_hash"):
            job = node.name.rsplit("/", 1)[-1]
            reason = store.stale_reason(
                exp, {"manifest_name": job, "manifest_hash": card["manifest_hash"]}
            )
            if reason is None and store.manifest_hash(exp, job) is None:
                reason = f"manifest {job} no longer exists"
            if reason:
                return STALE, reason
        if node.kind == "ref_stats":  # features of a manifest version no longer current
            for exp2, name, digest in sorted(self.seeds.versions):
                now = store.manifest_hash(exp2, name)
                if digest == card.get("ids_hash") and now != digest:
                    was = f"manifest {name} was {short_hash(digest)} when computed"
                    return STALE, f"{was}, is {short_hash(now) if now else 'gone'} now"
        for p, found in self.parents(node):
            label = parent_label(p)
            if not found:
                return STALE, self.missing_parent(node, p)
            statuses = [self.status(n) for n in found]
            if not any(s == SERVED for s, _ in statuses):
                state, why = statuses[0]
                return STALE, f"its parent {label} is {state}" + (f" ({why})" if why else "")
        return SERVED, None

    def missing_parent(self, node: Node, parent: dict[str, Any]) -> str:
        """Why ``parent`` of ``node`` is not in the store: replaced by a newer run under the same
        name (e.g. samples redrawn with other settings), or gone."""
        kind, name = str(parent.get("kind")), str(parent.get("name", "?"))
        label = f"{parent_label(parent)} ({short_hash(parent.get('hash'))})"
        newer = [
            n for n in self.by_name.get((kind, name), [])
            if not n.ghost and (kind not in SCOPED or n.experiment == node.experiment)
        ]  # fmt: skip
        if newer:
            now = newer[0]
            created = now.card.get("created")
            return (
                f"its parent {label} was replaced by a newer run ({short_hash(now.hash)}"
                + (f", {created}" if created else "")
                + f"): redo this {node.kind} to use it"
            )
        return f"its parent {label} is no longer in the store"

    # ---- output

    def entry(self, node: Node) -> dict[str, Any]:
        status, reason = self.status(node)
        out: dict[str, Any] = {
            "kind": node.kind,
            "experiment": node.experiment,
            "name": node.name,
            "path": str(node.path) if node.path else None,
            "hash": node.hash,
            "status": status,
            "via": "; ".join(self.via.get(id(node), [])),
        }
        if node.kind == "ref_stats":  # one reference set has statistics in each feature space
            out["feature_space"] = node.card.get("feature_space") or (
                node.path.parent.name if node.path else None
            )
        if reason:
            out["reason"] = reason
        return out

    def derived(self, experiments: Sequence[str] | None = None) -> list[dict[str, Any]]:
        order = {k: i for i, k in enumerate(KINDS)}
        picked = [
            n for n in self.nodes
            if id(n) in self.via and not n.ghost
            and (experiments is None or n.experiment is None or n.experiment in experiments)
        ]  # fmt: skip
        picked.sort(key=lambda n: (order.get(n.kind, 99), n.experiment or "", n.name, str(n.path)))
        return [self.entry(n) for n in picked]

    def deleted(self, experiments: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Derived artifacts cdm-forget replaced or deleted (known from its certificates)."""
        return [
            {"kind": n.kind, "experiment": n.experiment, "name": n.name, "hash": n.hash,
             "status": DELETED, "reason": n.ghost, "via": "; ".join(self.via[id(n)])}
            for n in self.nodes
            if n.ghost and id(n) in self.via
            and (experiments is None or n.experiment in experiments)
        ]  # fmt: skip

    def unresolved(self, experiments: Sequence[str]) -> list[dict[str, Any]]:
        """Artifacts not found derived, but with a parent that is gone: their lineage stops there."""
        out = []
        for node in self.nodes:
            if id(node) in self.via or node.ghost or node.kind == "table":
                continue
            if node.experiment is not None and node.experiment not in experiments:
                continue
            for p, found in self.parents(node):
                if not found and not (p.get("kind") == "adapter" and p.get("manifest_hash")):
                    out.append(
                        {"kind": node.kind, "experiment": node.experiment, "name": node.name,
                         "path": str(node.path), "missing_parent": f"{p['kind']} {p.get('name')}",
                         "missing_hash": p.get("hash"), "reason": self.missing_parent(node, p)}
                    )  # fmt: skip
                    break
        return out


# ------------------------------------------------------------------------------ public API


def _as_store(store: ArtifactStore | str | Path) -> CachedStore:
    return store if isinstance(store, CachedStore) else CachedStore(store)


def locate(
    store: ArtifactStore | str | Path, sample_id: str, experiment: str | None = None
) -> list[dict[str, Any]]:
    """Where ``sample_id`` is: one entry per experiment and manifest that lists it (``manifest``,
    ``shard`` index or None for safe/private, SISA ``slice``, ``content_hash``, ``source``,
    ``manifest_hash``), plus one per forget request that removed it (``forgotten=True``,
    ``certificate``: the certificate's path; slice and hash as the certificate records them)."""
    cached = _as_store(store)
    return _locate(cached, str(sample_id), _experiments(cached, experiment))[0]


def dependents(
    store: ArtifactStore | str | Path, experiment: str, manifest_names: Iterable[str]
) -> list[dict[str, Any]]:
    """Every artifact derived, transitively, from the data of the manifests ``manifest_names`` of
    ``experiment``: from their current and every older version (a removed source: the version
    ``sources.json`` records) and, since a shard's samples are also in ``private``, from what
    the private manifest fed (the paragon, private reference statistics). Each: ``kind``,
    ``experiment``, ``name``, ``path``, ``hash``, ``status`` (served | stale | quarantined),
    ``reason`` (unless served) and ``via``."""
    cached = _as_store(store)
    experiments = _experiments(cached, experiment)
    seeds = _Seeds()
    for name in manifest_names:
        if not _seed_manifest(cached, experiment, str(name), seeds):
            have = ", ".join(cached.list_manifests(experiment)) or "none"
            raise ProvenanceError(
                f"experiment {experiment!r} has no manifest {name!r} (it has: {have})"
            )
    ledger = _Ledger(cached, scan_nodes(cached, experiments), seeds)
    ledger.derive()
    return ledger.derived()


def _seed_manifest(store: CachedStore, experiment: str, name: str, seeds: _Seeds) -> dict | None:
    """Seed the versions of manifest ``name`` (current, or removed as a whole source) and of the
    private manifest that holds a shard's samples; a location entry, None if there is no such
    manifest."""
    manifest = (
        store.load_manifest(experiment, name) if store.manifest_hash(experiment, name) else None
    )
    if manifest is not None:
        meta = manifest.get("meta") or {}
        seeds.add_chain(store, experiment, name, manifest.get("hash"))
        if name.startswith("shard-"):
            seeds.add_chain(
                store, experiment, "private", store.manifest_hash(experiment, "private"),
                frozenset(manifest.get("ids") or []),
            )  # fmt: skip
        dataset = _train_split_dataset(meta)
        if dataset:
            seeds.train_datasets.add(dataset)
        return {"experiment": experiment, "manifest": name, "shard": shard_index(name),
                "source": meta.get("source"), "manifest_hash": manifest.get("hash"),
                "n_samples": len(manifest.get("ids") or []), "forgotten": False,
                "certificate": None}  # fmt: skip
    removed = [r for r in store.read_sources(experiment).get("removed", []) if r.get("job") == name]
    if not removed:
        return None
    r = removed[-1]
    path = store.certificate_path(experiment, str(r.get("certificate")))
    seeds.add_chain(store, experiment, name, r.get("manifest_hash"))
    if path.is_file():
        cert = store.certificate(path, path.read_bytes())
        old = ((cert.get("manifests") or {}).get("private") or {}).get("old_hash")
        seeds.add_chain(store, experiment, "private", old)
    return {"experiment": experiment, "manifest": name, "shard": shard_index(name),
            "source": r.get("source"), "manifest_hash": r.get("manifest_hash"),
            "n_samples": r.get("n_samples"), "forgotten": True,
            "certificate": str(path) if path.is_file() else r.get("certificate")}  # fmt: skip


def what_depends_on(
    store: ArtifactStore | str | Path,
    sample_id: str | None = None,
    source: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """What depends on sample ``sample_id`` or on source ``source`` (a shard manifest name such as
    ``shard-03``, or a source name of a ``sharding=manifest`` experiment), in ``experiment`` or in
    every experiment of the store.

    Returns ``{"query", "locations", "artifacts", "served", "deleted", "unresolved"}``: where the
    data is (see ``locate``), every derived artifact in the store (see ``dependents``), those
    still served, derived artifacts cdm-forget replaced or deleted (from its certificates: kind,
    name, old hash), and artifacts whose lineage could not be followed because a parent is no
    longer in the store.
    """
    if (sample_id is None) == (source is None):
        raise ProvenanceError(
            "give exactly one of a sample id (provenance.sample=<id>) or a source "
            "(provenance.source=shard-KK or a source name)"
        )
    cached = _as_store(store)
    experiments = _experiments(cached, experiment)
    if sample_id is not None:
        locations, seeds = _locate(cached, str(sample_id), experiments)
        if not locations:
            raise ProvenanceError(_unknown_id(cached, str(sample_id), experiments))
    else:
        locations, seeds = _source_seeds(cached, str(source), experiments)
        if not locations:
            raise ProvenanceError(_unknown_source(cached, str(source), experiments))
    ledger = _Ledger(cached, scan_nodes(cached, experiments), seeds)
    ledger.derive()
    scope = None if experiment is None else [experiment]
    artifacts = ledger.derived(scope)
    query = {"sample": sample_id, "source": source, "experiment": experiment,
             "store": str(cached.root)}  # fmt: skip
    return {
        "query": query,
        "locations": locations,
        "artifacts": artifacts,
        "served": [a for a in artifacts if a["status"] == SERVED],
        "deleted": ledger.deleted(scope),
        "unresolved": ledger.unresolved(scope or experiments),
    }


def _unknown_id(store: CachedStore, sample_id: str, experiments: Sequence[str]) -> str:
    if not experiments:
        return f"the store {store.root} has no experiments: nothing can depend on {sample_id!r}"
    where = store.manifests_pattern()
    example = None
    for exp in experiments:
        names = store.list_manifests(exp)
        if names:
            smallest = min(names, key=lambda n: store.manifest_path(exp, n).stat().st_size)
            ids = store.load_manifest(exp, smallest).get("ids") or []
            example = ids[0] if ids else None
            break
    scope = f"experiment {experiments[0]!r}" if len(experiments) == 1 else "any experiment"
    hint = f" (ids look like {example!r})" if example else ""
    return (
        f"sample id {sample_id!r} is in no manifest of {scope} and was never forgotten from it: "
        f"sample ids are listed in {where}{hint}"
    )


def _unknown_source(store: CachedStore, source: str, experiments: Sequence[str]) -> str:
    have = []
    for exp in experiments:
        for name in store.list_manifests(exp):
            if name.startswith("shard-"):
                src = (store.load_manifest(exp, name).get("meta") or {}).get("source")
                have.append(f"{exp}/{name}" + (f" ({src})" if src else ""))
    listed = ", ".join(have[:12]) + (f", ... ({len(have)} in all)" if len(have) > 12 else "")
    return (
        f"no shard manifest or source named {source!r} in "
        f"{experiments[0] if len(experiments) == 1 else 'any experiment'}; give a shard manifest "
        f"name (shard-KK) or a source name: {listed or 'the store has no shard manifests'}"
    )


def parent_label(parent: dict[str, Any]) -> str:
    """``kind name`` of a card's parent entry (``ref_stats <space>/<name>``: one reference set
    has statistics in each feature space)."""
    space = parent.get("feature_space")
    return f"{parent['kind']} {space + '/' if space else ''}{parent.get('name', '?')}"


def artifact_label(entry: dict[str, Any]) -> str:
    """How a report row names an artifact: ``experiment/name``; reference statistics also name
    their feature space (one reference set has a row per space)."""
    label = f"{entry['experiment']}/{entry['name']}" if entry.get("experiment") else entry["name"]
    return f"{entry['feature_space']}/{label}" if entry.get("feature_space") else label


def format_report(result: dict[str, Any]) -> str:
    """A readable report of ``what_depends_on``: locations, a table (kind, name, status, via) and
    the summary line."""
    query = result["query"]
    subject = query["sample"] if query.get("sample") is not None else f"source {query['source']}"
    lines = []
    for loc in result["locations"]:
        where = f"{loc['experiment']}/{loc.get('manifest') or '?'}"
        parts = [where]
        if loc.get("slice") is not None:
            parts.append(f"slice {loc['slice']}")
        if loc.get("n_samples") is not None:
            parts.append(f"{loc['n_samples']} samples")
        if loc.get("source"):
            parts.append(f"source {loc['source']}")
        if loc.get("content_hash"):
            parts.append(f"content {short_hash(loc['content_hash'])}")
        if loc.get("forgotten"):
            parts.append(f"FORGOTTEN ({Path(str(loc['certificate'])).name if loc.get('certificate') else 'certificate unknown'})")  # fmt: skip
        if loc.get("note"):
            parts.append(loc["note"])
        lines.append("  ".join(parts))
    header = ("KIND", "ARTIFACT", "STATUS", "VIA")
    rows = [(a["kind"], artifact_label(a), a["status"], a["via"]) for a in result["artifacts"]]
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        lines.append("")
        for row in [header, *rows]:
            cells = [c.ljust(w) for c, w in zip(row[:3], widths, strict=True)]
            lines.append("  ".join([*cells, row[3]]).rstrip())
    for d in result.get("deleted") or []:
        lines.append(
            f"gone: {d['kind']} {d['experiment']}/{d['name']} ({short_hash(d['hash'])}), {d['reason']}"
        )
    for a in result["artifacts"]:
        if a.get("reason"):
            lines.append(f"{a['status']}: {a['kind']} {artifact_label(a)}: {a['reason']}")
    for u in result.get("unresolved") or []:
        lines.append(
            f"note: {u['kind']} {u['experiment'] or ''}/{u['name']}: lineage not followed, "
            + u.get("reason", f"its parent {u['missing_parent']} is no longer in the store")
        )
    n, m = len(result["artifacts"]), len(result["served"])
    lines.append(f"{n} artifact{'s' if n != 1 else ''} derived from {subject}, {m} still served")
    return "\n".join(lines)
