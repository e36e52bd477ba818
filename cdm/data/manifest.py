"""Manifests: the hashed, sliced list of sample ids a job trains on, and the split of an experiment
into safe, private and shard manifests, with the changes forgetting and adding sources make."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdm.core.hashing import hash_ids


def abbreviate(items: Sequence[Any], k: int = 5) -> str:
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
            raise ValueError(f"ids not in manifest {self.name!r}: {abbreviate(missing)}")
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
            f"ids {abbreviate(in_safe)} are in the safe split, which trains the public backbone and is "
            "never forgotten; they cannot be removed from it"
        )
    return Split(
        safe=split.safe,
        shards=tuple(m.without(drop) for m in split.shards),
        private=split.private.without(drop),
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
    forgotten (``without_ids``) to leave ``private``; ``cdm-forget forget.source`` does both."""
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
            f"manifest {manifest.name!r}: {len(missing)} ids not in dataset {dataset.name!r}: {abbreviate(missing)}"
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
            f"{abbreviate(changed)}; rebuild the split"
        )
    return out


def slice_indices(dataset, manifest: Manifest) -> list[list[int]]:
    """Dataset indices of each SISA slice of ``manifest`` (for ``ManifestDataModule``)."""
    idx = indices_of(dataset, manifest)
    return [idx[a:b] for a, b in manifest.slices]
