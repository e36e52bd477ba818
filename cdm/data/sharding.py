"""Safe/private split, shard strategies and SISA slices, recorded as hashed ``Manifest``s.

Everything is a pure function of the dataset's ids/labels/scores and ``seed``: candidates are
sorted by id before any seeded permutation (``numpy.random.default_rng([seed, tag])``), so the
result depends neither on dataset order, global RNG state nor Python hash randomisation.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdm.core.hashing import hash_ids
from cdm.core.names import ShardId

STRATEGIES = ("by_class", "random", "by_score", "manifest")
_TAG_SAFE, _TAG_SHARD, _TAG_SLICE = 1, 2, 3  # distinct RNG streams per purpose


def _few(items: Sequence[Any], k: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:k])
    return shown + (f", ... ({len(items)} in all)" if len(items) > k else "")


@dataclass(frozen=True)
class Manifest:
    """One part of the data (safe, a shard or the private union), with SISA slices and a hash."""

    name: str
    ids: tuple[str, ...]
    content_hashes: tuple[str, ...]
    slices: tuple[tuple[int, int], ...]
    classes: tuple[int, ...]
    hash: str
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.content_hashes):
            raise ValueError(
                f"manifest {self.name!r}: {len(self.ids)} ids but {len(self.content_hashes)} hashes"
            )
        pos = 0
        for start, stop in self.slices:
            if start != pos or stop <= start:
                raise ValueError(
                    f"manifest {self.name!r}: slices {self.slices} are not contiguous and non-empty"
                )
            pos = stop
        if pos != len(self.ids):
            raise ValueError(f"manifest {self.name!r}: slices cover {pos} of {len(self.ids)} ids")

    @classmethod
    def build(
        cls,
        name: str,
        ids: Sequence[str],
        content_hashes: Sequence[str],
        slices: Sequence[tuple[int, int]],
        classes: Sequence[int],
        meta: dict | None = None,
    ) -> Manifest:
        """Construct and compute the hash."""
        return cls(
            name=name,
            ids=tuple(ids),
            content_hashes=tuple(content_hashes),
            slices=tuple((int(a), int(b)) for a, b in slices),
            classes=tuple(sorted(int(c) for c in classes)),
            hash=hash_ids(ids, content_hashes),
            meta=dict(meta or {}),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    def slice_ids(self, s: int) -> tuple[str, ...]:
        """Ids of SISA slice ``s``."""
        start, stop = self.slices[s]
        return self.ids[start:stop]

    def slice_of(self, sample_id: str) -> int:
        """The SISA slice that holds ``sample_id`` (ValueError if it is not in this manifest)."""
        return self.slices_of([sample_id])[sample_id]

    def slices_of(self, sample_ids: Iterable[str]) -> dict[str, int]:
        """``{id: SISA slice}`` of ``sample_ids`` (ValueError naming those not in this manifest)."""
        position = {sid: j for j, sid in enumerate(self.ids)}
        wanted = list(sample_ids)
        missing = [sid for sid in wanted if sid not in position]
        if missing:
            raise ValueError(f"ids not in manifest {self.name!r}: {_few(missing)}")
        stops = [b for _, b in self.slices]
        return {sid: bisect.bisect_right(stops, position[sid]) for sid in wanted}

    def without(self, ids: Iterable[str]) -> Manifest:
        """This manifest minus ``ids`` (SISA forgetting, paper App. B), rehashed.

        Every other id keeps its slice and its order inside it, so the slices before the first
        one that loses an id are untouched and their checkpoints stay valid; a slice left empty
        is dropped (the later ones move up by one). ``classes`` is kept: it names the classes the
        shard was dealt, not those left. Ids not in the manifest are ignored. Raises ValueError
        if nothing would be left.
        """
        drop = set(ids) & set(self.ids)
        if not drop:
            return self
        keep_ids, keep_hashes, slices = [], [], []
        for a, b in self.slices:
            start = len(keep_ids)
            for sid, h in zip(self.ids[a:b], self.content_hashes[a:b], strict=True):
                if sid not in drop:
                    keep_ids.append(sid)
                    keep_hashes.append(h)
            if len(keep_ids) > start:
                slices.append((start, len(keep_ids)))
        if not keep_ids:
            raise ValueError(
                f"forgetting {len(drop)} ids would leave manifest {self.name!r} empty: "
                "forget the whole shard (drop its adapter) instead"
            )
        meta = {**self.meta, "n_forgotten": int(self.meta.get("n_forgotten", 0)) + len(drop)}
        return Manifest.build(self.name, keep_ids, keep_hashes, slices, self.classes, meta)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "hash": self.hash,
            "classes": list(self.classes),
            "slices": [list(s) for s in self.slices],
            "meta": self.meta,
            "ids": list(self.ids),
            "content_hashes": list(self.content_hashes),
        }

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        """Inverse of ``to_json``; raises ValueError if the stored hash does not match the ids."""
        name = d.get("name", "?")
        try:
            m = cls(
                name=name,
                ids=tuple(d["ids"]),
                content_hashes=tuple(d["content_hashes"]),
                slices=tuple((int(a), int(b)) for a, b in d["slices"]),
                classes=tuple(int(c) for c in d["classes"]),
                hash=d["hash"],
                meta=dict(d.get("meta", {})),
            )
        except KeyError as e:
            raise ValueError(f"manifest {name!r}: missing field {e}") from None
        actual = hash_ids(m.ids, m.content_hashes)
        if actual != m.hash:
            raise ValueError(
                f"manifest {name!r}: hash mismatch (stored {m.hash[:12]}, recomputed {actual[:12]}): "
                "its ids or content hashes were edited; rebuild the split instead of editing it"
            )
        return m


@dataclass(frozen=True)
class Split:
    """The safe part, the disjoint shards and their union (``private``, used by the paragon)."""

    safe: Manifest
    shards: tuple[Manifest, ...]
    private: Manifest

    @property
    def manifests(self) -> tuple[Manifest, ...]:
        return (self.safe, *self.shards, self.private)

    def __getitem__(self, name: str) -> Manifest:
        for m in self.manifests:
            if m.name == name:
                return m
        raise KeyError(f"no manifest {name!r}; have {[m.name for m in self.manifests]}")


# ----------------------------------------------------------------------------- helpers


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, *tags])


def _sorted_by_id(dataset, idx: Sequence[int]) -> list[int]:
    return sorted(idx, key=lambda i: dataset.ids[i])


def _select_safe(
    dataset, pool: list[int], labels: np.ndarray, safe_classes, safe_fraction, seed
) -> list[int]:
    safe: list[int] = []
    rest = pool
    if safe_classes:
        present = {int(labels[i]) for i in pool}
        unknown = sorted(set(int(c) for c in safe_classes) - present)
        if unknown:
            raise ValueError(
                f"safe_classes {unknown} have no samples in this split; classes present: {sorted(present)}"
            )
        wanted = {int(c) for c in safe_classes}
        safe = [i for i in pool if labels[i] in wanted]
        rest = [i for i in pool if labels[i] not in wanted]
    if safe_fraction > 0:
        rng = _rng(seed, _TAG_SAFE)
        taken: set[int] = set()
        for c in sorted({int(labels[i]) for i in rest}):
            members = _sorted_by_id(dataset, [i for i in rest if labels[i] == c])
            k = int(round(safe_fraction * len(members)))
            taken.update(members[j] for j in rng.permutation(len(members))[:k])
        safe += [i for i in rest if i in taken]
    return _sorted_by_id(dataset, safe)


def _group_by_class(private: list[int], labels: np.ndarray, n_shards: int, seed: int):
    classes = sorted({int(labels[i]) for i in private})
    if n_shards > len(classes):
        raise ValueError(
            f"sharding=by_class: n_shards={n_shards} > {len(classes)} private classes, so some shard "
            "would be empty; lower n_shards or use sharding=random"
        )
    order = _rng(seed, _TAG_SHARD).permutation(classes)
    groups = [sorted(int(c) for c in g) for g in np.array_split(order, n_shards)]
    out = []
    for g in groups:
        members = set(g)
        out.append(([i for i in private if int(labels[i]) in members], {"shard_classes": g}))
    return out


def _group_random(private: list[int], n_shards: int, seed: int):
    if n_shards > len(private):
        raise ValueError(
            f"sharding=random: n_shards={n_shards} > {len(private)} private samples; lower n_shards"
        )
    perm = _rng(seed, _TAG_SHARD).permutation(len(private))
    return [([private[j] for j in part], {}) for part in np.array_split(perm, n_shards)]


def _group_by_score(dataset, private: list[int], n_shards: int, score_key: str):
    scores = getattr(dataset, score_key, None)
    if scores is None:
        raise ValueError(
            f"sharding=by_score: dataset {dataset.name!r} has no {score_key!r} column; "
            "provide scores (e.g. a 'scores' array in an npz dataset) or use sharding=random/by_class"
        )
    s = np.asarray(scores, dtype=np.float64)[private]
    if np.isnan(s).any():
        raise ValueError(
            f"sharding=by_score: {int(np.isnan(s).sum())} private samples have NaN scores"
        )
    if n_shards > len(private):
        raise ValueError(f"sharding=by_score: n_shards={n_shards} > {len(private)} private samples")
    order = np.argsort(s, kind="stable")  # private is sorted by id: ties broken by id
    out = []
    for part in np.array_split(order, n_shards):
        band = s[part]
        out.append(
            (
                [private[j] for j in part],
                {"score_min": float(band.min()), "score_max": float(band.max())},
            )
        )
    return out


def _group_manifest(dataset, private, safe, pool, path: str | None, n_shards: int, split: str):
    if path is None:
        raise ValueError(
            "sharding=manifest needs manifest_path=<json with {'sources': {name: [ids]}}>"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"sharding manifest not found: {p}. Expected JSON: "
            '{"sources": {"alice": ["<id>", ...], "bob": [...]}, "order": ["alice", "bob"] (optional)}. '
            "Nothing is downloaded."
        )
    spec = json.loads(p.read_text())
    sources = spec.get("sources") if isinstance(spec, dict) else None
    if not isinstance(sources, dict) or not sources:
        raise ValueError(
            f"{p}: expected a non-empty object 'sources' mapping source names to id lists"
        )
    names = list(spec.get("order") or sorted(sources))
    if sorted(names) != sorted(sources):
        raise ValueError(f"{p}: 'order' {names} must list exactly the sources {sorted(sources)}")
    if n_shards > 0 and n_shards != len(names):
        raise ValueError(
            f"{p} defines {len(names)} sources but n_shards={n_shards}; set n_shards={len(names)} or 0 (take from file)"
        )
    index = {dataset.ids[i]: i for i in pool}
    safe_set = {dataset.ids[i] for i in safe}
    owner: dict[str, str] = {}
    groups = []
    for name in names:
        ids = sources[name]
        if not isinstance(ids, list) or not ids:
            raise ValueError(
                f"{p}: source {name!r} must be a non-empty list of ids (an empty shard cannot be trained)"
            )
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise ValueError(
                f"{p}: source {name!r} lists ids not in the {split!r} split of dataset {dataset.name!r}: "
                f"{_few(unknown)}"
            )
        in_safe = [i for i in ids if i in safe_set]
        if in_safe:
            raise ValueError(
                f"{p}: source {name!r} lists ids that are in the safe set: {_few(in_safe)}; "
                "remove them from the file or from safe_classes/safe_fraction"
            )
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise ValueError(f"{p}: id {i!r} is listed twice in source {name!r}")
            if i in owner:
                dup = [j for j in ids if j in owner]
                raise ValueError(
                    f"{p}: ids listed in two sources ({owner[i]!r} and {name!r}), e.g. {_few(dup)}; "
                    "each sample must belong to exactly one source"
                )
            seen.add(i)
        owner.update(dict.fromkeys(ids, name))
        groups.append(([index[i] for i in ids], {"source": name}))
    orphans = [dataset.ids[i] for i in private if dataset.ids[i] not in owner]
    if orphans:
        raise ValueError(
            f"{p}: {len(orphans)} private ids are in no source, e.g. {_few(orphans, 3)}; "
            "add them to a source or move them to the safe set"
        )
    return groups


# ----------------------------------------------------------------------------- public API


def slice_order(n: int, n_slices: int, seed: int, index: int) -> list[np.ndarray]:
    """Positions (into shard ``index``'s id-sorted members) of each of its SISA slices: a
    permutation seeded by (seed, index) cut into ``n_slices`` near-equal parts."""
    return np.array_split(_rng(seed, _TAG_SLICE, index).permutation(n), n_slices)


def make_split(
    dataset,
    *,
    strategy: str,
    n_shards: int,
    seed: int,
    safe_fraction: float = 0.0,
    safe_classes: Sequence[int] | None = None,
    n_slices: int = 1,
    score_key: str = "scores",
    manifest_path: str | None = None,
    split: str = "train",
) -> Split:
    """Split ``dataset``'s ``split`` samples into safe + ``n_shards`` disjoint shards, each cut into
    ``n_slices`` SISA slices. See the module docstring for determinism."""
    check_split_args(strategy, n_shards, seed, safe_fraction, n_slices, manifest_path)
    labels = np.asarray(dataset.labels)
    pool = [i for i, s in enumerate(dataset.splits) if s == split]
    if not pool:
        raise ValueError(f"dataset {dataset.name!r} has no samples in split {split!r}")
    pool = _sorted_by_id(dataset, pool)

    safe = _select_safe(dataset, pool, labels, safe_classes, safe_fraction, seed)
    safe_set = set(safe)
    private = [i for i in pool if i not in safe_set]
    if not private:
        raise ValueError(
            "no private samples left after taking the safe set; lower safe_fraction or safe_classes"
        )

    if strategy == "by_class":
        groups = _group_by_class(private, labels, n_shards, seed)
    elif strategy == "random":
        groups = _group_random(private, n_shards, seed)
    elif strategy == "by_score":
        groups = _group_by_score(dataset, private, n_shards, score_key)
    else:
        groups = _group_manifest(dataset, private, safe, pool, manifest_path, n_shards, split)

    base_meta = {
        "dataset": dataset.name,
        "split": split,
        "strategy": strategy,
        "seed": int(seed),
        "n_shards": len(groups),
        "n_slices": int(n_slices),
        "safe_fraction": float(safe_fraction),
        "safe_classes": sorted(int(c) for c in safe_classes or []),
    }
    if manifest_path is not None:
        base_meta["manifest_path"] = str(manifest_path)

    def build(name: str, idx: list[int], slices, meta: dict) -> Manifest:
        return Manifest.build(
            name,
            [dataset.ids[i] for i in idx],
            [dataset.content_hashes[i] for i in idx],
            slices,
            {int(labels[i]) for i in idx},
            {**base_meta, **meta},
        )

    shards, shard_slices = [], []
    for k, (idx, extra) in enumerate(groups):
        name = ShardId(k).name
        parts = _shard_slices(dataset, idx, name, n_slices, seed, k)
        shard_slices.append(parts)
        shards.append(build(name, _concat(parts), _slice_bounds(parts), {"shard": k, **extra}))

    # private = union of shards; its slice j is the union of every shard's slice j (paragon SISA).
    priv_parts = [[i for parts in shard_slices for i in parts[j]] for j in range(n_slices)]
    private_m = build(
        "private",
        _concat(priv_parts),
        _slice_bounds(priv_parts),
        {"shards": [m.name for m in shards]},
    )
    safe_m = build("safe", safe, [(0, len(safe))] if safe else [], {})
    return Split(safe=safe_m, shards=tuple(shards), private=private_m)


def check_split_args(
    strategy: str,
    n_shards: int,
    seed: int,
    safe_fraction: float,
    n_slices: int,
    manifest_path: str | None,
) -> None:
    """Refuse settings ``make_split`` cannot honour, naming the setting and its valid range."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown sharding strategy {strategy!r}; choose one of {list(STRATEGIES)}"
        )
    if strategy != "manifest" and n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if strategy != "manifest" and manifest_path is not None:
        raise ValueError(
            f"manifest_path is only used with strategy='manifest' (got strategy={strategy!r})"
        )
    if not 0.0 <= safe_fraction < 1.0:
        raise ValueError(
            f"safe_fraction must be in [0, 1), got {safe_fraction}; use safe_classes to make whole classes safe"
        )
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _shard_slices(
    dataset, idx: list[int], name: str, n_slices: int, seed: int, k: int
) -> list[list[int]]:
    """Shard ``k``'s dataset indices cut into its ``n_slices`` SISA slices (in training order)."""
    if not idx:
        raise ValueError(f"{name} is empty; lower n_shards")
    if n_slices > len(idx):
        raise ValueError(
            f"n_slices={n_slices} > {len(idx)} samples in {name}; lower n_slices or n_shards"
        )
    idx = _sorted_by_id(dataset, idx)
    return [[idx[j] for j in part] for part in slice_order(len(idx), n_slices, seed, k)]


def _concat(parts: list[list[int]]) -> list[int]:
    return [i for p in parts for i in p]


def _slice_bounds(parts: list[list[int]]) -> list[tuple[int, int]]:
    """``[(start, end)]`` of each slice in the concatenation of ``parts``."""
    bounds = np.cumsum([0] + [len(p) for p in parts])
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def without_ids(split: Split, ids: Iterable[str]) -> Split:
    """``split`` with ``ids`` removed from every shard and from ``private`` (``Manifest.without``).

    How a split is made after ``cdm-forget`` (paper App. B): the split the config computes, minus
    the experiment's forgotten ids, so slice membership and order of every other id never change.
    Raises ValueError if an id is in the safe split (the public backbone's data is never forgotten).
    """
    drop = set(ids)
    in_safe = sorted(drop & set(split.safe.ids))
    if in_safe:
        raise ValueError(
            f"ids {_few(in_safe)} are in the safe split, which trains the public backbone and is "
            "never forgotten; they cannot be removed from it"
        )
    return Split(
        safe=split.safe,
        shards=tuple(m.without(drop) for m in split.shards),
        private=split.private.without(drop),
    )


def new_shard(
    index: int,
    ids: Sequence[str],
    content_hashes: Sequence[str],
    labels: Sequence[int],
    *,
    n_slices: int,
    seed: int,
    meta: dict,
) -> Manifest:
    """The manifest ``shard-<index>`` of a source added to an experiment (``cdm-add-source``),
    sliced exactly as ``make_split`` slices its shards."""
    if not ids:
        raise ValueError(f"{ShardId(int(index))}: an added source needs at least one sample")
    if n_slices > len(ids):
        raise ValueError(
            f"n_slices={n_slices} > {len(ids)} samples in the new source; lower sharding.n_slices"
        )
    order = sorted(range(len(ids)), key=lambda j: ids[j])
    parts = [[order[j] for j in part] for part in slice_order(len(ids), n_slices, seed, index)]
    members = [j for part in parts for j in part]
    bounds = np.cumsum([0] + [len(p) for p in parts])
    return Manifest.build(
        ShardId(int(index)).name,
        [ids[j] for j in members],
        [content_hashes[j] for j in members],
        list(zip(bounds[:-1], bounds[1:], strict=True)),
        {int(labels[j]) for j in members},
        {**meta, "shard": int(index), "n_slices": int(n_slices)},
    )


def with_shards(split: Split, added: Sequence[Manifest]) -> Split:
    """``split`` plus the shards of added sources; ``private`` (the paragon's data) grows by
    them, its slice j being the union of every shard's slice j as in ``make_split``."""
    if not added:
        return split
    names = [m.name for m in split.shards]
    clash = [m.name for m in added if m.name in names]
    if clash:
        raise ValueError(f"added shards {clash} clash with the split's own shards {names}")
    private = split.private
    n = max(len(private.slices), *(len(m.slices) for m in added))
    parts_ids = [list(private.slice_ids(j)) if j < len(private.slices) else [] for j in range(n)]
    hashes = dict(zip(private.ids, private.content_hashes, strict=True))
    for m in added:
        hashes.update(zip(m.ids, m.content_hashes, strict=True))
        for j in range(len(m.slices)):
            parts_ids[j] += list(m.slice_ids(j))
    ids = [i for part in parts_ids for i in part]
    bounds = np.cumsum([0] + [len(p) for p in parts_ids if p])
    shards = (*split.shards, *added)
    new_private = Manifest.build(
        "private",
        ids,
        [hashes[i] for i in ids],
        list(zip(bounds[:-1], bounds[1:], strict=True)),
        {c for m in shards for c in m.classes},
        {**private.meta, "shards": [m.name for m in shards]},
    )
    return Split(safe=split.safe, shards=shards, private=new_private)


def without_shards(split: Split, names: Iterable[str]) -> Split:
    """``split`` without the shards ``names`` (forgotten sources). Their ids must also be
    forgotten (``without_ids``) to leave ``private``; ``cdm-forget forget.shard`` does both."""
    drop = set(names)
    unknown = drop - {m.name for m in split.shards}
    if unknown:
        raise ValueError(
            f"no shards {sorted(unknown)} to remove; have {[m.name for m in split.shards]}"
        )
    shards = tuple(m for m in split.shards if m.name not in drop)
    if not shards:
        raise ValueError("removing these shards would leave the experiment with none")
    meta = {**split.private.meta, "shards": [m.name for m in shards]}
    private = Manifest.build(
        "private", split.private.ids, split.private.content_hashes, split.private.slices,
        split.private.classes, meta,
    )  # fmt: skip
    return Split(safe=split.safe, shards=shards, private=private)


def held_out(dataset, classes: Sequence[int] | None = None, split: str = "test") -> list[int]:
    """Dataset indices of the ``split`` samples (optionally only of ``classes``)."""
    wanted = None if classes is None else {int(c) for c in classes}
    labels = np.asarray(dataset.labels)
    return [
        i
        for i, s in enumerate(dataset.splits)
        if s == split and (wanted is None or int(labels[i]) in wanted)
    ]


def indices_of(dataset, manifest: Manifest) -> list[int]:
    """Dataset indices of ``manifest.ids`` in manifest order; checks that the content hashes still match."""
    index = getattr(dataset, "id_to_index", None) or {sid: i for i, sid in enumerate(dataset.ids)}
    missing = [sid for sid in manifest.ids if sid not in index]
    if missing:
        raise ValueError(
            f"manifest {manifest.name!r}: {len(missing)} ids not in dataset {dataset.name!r}: {_few(missing)}"
        )
    out = [index[sid] for sid in manifest.ids]
    changed = [
        sid
        for sid, i, h in zip(manifest.ids, out, manifest.content_hashes, strict=True)
        if dataset.content_hashes[i] != h
    ]
    if changed:
        raise ValueError(
            f"manifest {manifest.name!r}: {len(changed)} samples changed content since it was built: "
            f"{_few(changed)}; rebuild the split"
        )
    return out


def slice_indices(dataset, manifest: Manifest) -> list[list[int]]:
    """Dataset indices of each SISA slice of ``manifest`` (for ``ManifestDataModule``)."""
    idx = indices_of(dataset, manifest)
    return [idx[a:b] for a, b in manifest.slices]
