"""Safe/private split, shard strategies and SISA slices, recorded as hashed ``Manifest``s.

Where a sample goes is a function of its own id and ``seed`` alone (``id_hash``: blake2b keyed by
the seed): whether it is safe (``safe_fraction``), its shard under ``sharding=random``, its SISA
slice, and its place in each epoch's order (``epoch_order``). Removing ids therefore moves no other
id: the split of a dataset minus some ids is the split of the dataset minus those ids, so anyone
who trains from scratch on the remaining ids (``sharding=manifest``) gets the slices and the order
``cdm-forget`` retrained with (``cdm-verify``). ``by_class`` deals whole classes by a permutation of
the class labels (a function of the labels present), ``by_score`` cuts score bands. Nothing depends
on dataset order, global RNG state or Python hash randomisation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cdm.core.names import ShardId
from cdm.data.manifest import Manifest, Split, abbreviate
from cdm.data.scores import DatasetScores

STRATEGIES = ("by_class", "random", "by_score", "manifest")
_TAG_SHARD = 2  # the RNG stream of by_class's class permutation


# ----------------------------------------------------------------------------- per-id hashes


def id_hash(seed: int, purpose: str, sample_id: str, epoch: int | None = None) -> int:
    """A 64-bit hash of ``(purpose, epoch, sample_id)`` keyed by ``seed`` (blake2b): every per-id
    decision (safe, random shard, SISA slice, epoch order) reads its own ``purpose``."""
    message = f"{purpose}\x1f{'' if epoch is None else int(epoch)}\x1f{sample_id}".encode()
    digest = hashlib.blake2b(message, digest_size=8, key=str(int(seed)).encode())
    return int.from_bytes(digest.digest(), "big")


def id_fraction(seed: int, purpose: str, sample_id: str) -> float:
    """``id_hash`` as a number in [0, 1): a coin for ``sample_id`` alone."""
    return id_hash(seed, purpose, sample_id) / 2.0**64


def slice_of_id(sample_id: str, n_slices: int, seed: int) -> int:
    """The SISA slice of ``sample_id`` (before empty slices are dropped): its hash mod ``n_slices``."""
    return id_hash(seed, "slice", sample_id) % int(n_slices)


def epoch_order(ids: Sequence[str], seed: int, epoch: int) -> list[int]:
    """Positions of ``ids`` in epoch ``epoch``'s training order: sorted by ``id_hash(seed, epoch,
    id)`` (ties by id), so removing ids keeps the relative order of the others."""
    keys = [(id_hash(seed, "order", sid, epoch), sid) for sid in ids]
    return sorted(range(len(ids)), key=keys.__getitem__)


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, *tags])


def _sorted_by_id(dataset, idx: Sequence[int]) -> list[int]:
    return sorted(idx, key=lambda i: dataset.ids[i])


def _select_safe(
    dataset, pool: list[int], labels: np.ndarray, safe_classes, safe_fraction, seed
) -> list[int]:
    """``safe_classes`` whole, plus each other id whose ``id_fraction(seed, "safe", id)`` is below
    ``safe_fraction`` (about that fraction of every class)."""
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
    if safe_fraction > 0:  # each id by its own coin: removing others never changes it
        safe += [i for i in rest if id_fraction(seed, "safe", dataset.ids[i]) < safe_fraction]
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


def _group_random(dataset, private: list[int], n_shards: int, seed: int):
    """Shard of each id: ``id_hash(seed, "shard", id) mod n_shards`` (near-equal sizes)."""
    if n_shards > len(private):
        raise ValueError(
            f"sharding=random: n_shards={n_shards} > {len(private)} private samples; lower n_shards"
        )
    groups: list[list[int]] = [[] for _ in range(n_shards)]
    for i in private:  # each id by its own hash: removing others never moves it
        groups[id_hash(seed, "shard", dataset.ids[i]) % n_shards].append(i)
    empty = [ShardId(k).name for k, g in enumerate(groups) if not g]
    if empty:
        raise ValueError(
            f"sharding=random: {len(empty)} shards ({abbreviate(empty, 3)}) drew none of the "
            f"{len(private)} private samples; lower n_shards"
        )
    return [(g, {}) for g in groups]


def _group_by_score(dataset, private: list[int], n_shards: int, scores):
    if scores is None:
        scores = DatasetScores()(dataset)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(dataset),):
        raise ValueError(
            f"sharding=by_score: {scores.shape[0] if scores.ndim else 0} scores for "
            f"{len(dataset)} samples of {dataset.name!r}; the scorer must give one per sample"
        )
    s = scores[private]
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
            '{"sources": {"alice": ["<id>", ...], "bob": [...]}, "order": ["alice", "bob"] (optional), '
            '"excluded": ["<id>", ...] (optional: private ids no source trains on)}. '
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
                f"{abbreviate(unknown)}"
            )
        in_safe = [i for i in ids if i in safe_set]
        if in_safe:
            raise ValueError(
                f"{p}: source {name!r} lists ids that are in the safe set: {abbreviate(in_safe)}; "
                "remove them from the file or from safe_classes/safe_fraction"
            )
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise ValueError(f"{p}: id {i!r} is listed twice in source {name!r}")
            if i in owner:
                dup = [j for j in ids if j in owner]
                raise ValueError(
                    f"{p}: ids listed in two sources ({owner[i]!r} and {name!r}), e.g. {abbreviate(dup)}; "
                    "each sample must belong to exactly one source"
                )
            seen.add(i)
        owner.update(dict.fromkeys(ids, name))
        groups.append(([index[i] for i in ids], {"source": name}))
    excluded = spec.get("excluded") or []
    if not isinstance(excluded, list):
        raise ValueError(f"{p}: 'excluded' must be a list of ids (left out of every source)")
    wrong = [i for i in excluded if i in owner or i in safe_set or i not in index]
    if wrong:
        raise ValueError(
            f"{p}: 'excluded' lists ids that a source or the safe set holds, or that are not in the "
            f"{split!r} split: {abbreviate(wrong)}; list there only private ids that no source trains on"
        )
    placed = owner.keys() | set(excluded)
    orphans = [dataset.ids[i] for i in private if dataset.ids[i] not in placed]
    if orphans:
        raise ValueError(
            f"{p}: {len(orphans)} private ids are in no source, e.g. {abbreviate(orphans, 3)}; "
            "add them to a source, to 'excluded' (trained on by no one, e.g. forgotten) or move "
            "them to the safe set"
        )
    return groups


# ----------------------------------------------------------------------------- public API


def slice_parts(ids: Sequence[str], n_slices: int, seed: int) -> list[list[int]]:
    """Positions of ``ids`` in each of the ``n_slices`` SISA slices (``slice_of_id``), each slice in
    id order. A slice may be empty: callers drop it, as ``Manifest.without`` drops a slice that
    forgetting empties, so both number the slices left alike."""
    parts: list[list[int]] = [[] for _ in range(int(n_slices))]
    for j in sorted(range(len(ids)), key=ids.__getitem__):
        parts[slice_of_id(ids[j], n_slices, seed)].append(j)
    return parts


def make_split(
    dataset,
    *,
    strategy: str,
    n_shards: int,
    seed: int,
    safe_fraction: float = 0.0,
    safe_classes: Sequence[int] | None = None,
    n_slices: int = 1,
    scores: Sequence[float] | np.ndarray | None = None,
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
        groups = _group_random(dataset, private, n_shards, seed)
    elif strategy == "by_score":
        groups = _group_by_score(dataset, private, n_shards, scores)
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
        parts = _shard_slices(dataset, idx, name, n_slices, seed)
        shard_slices.append(parts)
        shards.append(build(name, _concat(parts), _slice_bounds(parts), {"shard": k, **extra}))

    # private = union of shards; its slice j is the union of every shard's slice j (paragon SISA).
    priv_parts = [
        _sorted_by_id(dataset, [i for parts in shard_slices for i in parts[j]])
        for j in range(n_slices)
    ]
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


def _shard_slices(dataset, idx: list[int], name: str, n_slices: int, seed: int) -> list[list[int]]:
    """Shard ``name``'s dataset indices in each of its ``n_slices`` SISA slices (``slice_parts``;
    a slice may be empty)."""
    if not idx:
        raise ValueError(f"{name} is empty; lower n_shards")
    if n_slices > len(idx):
        raise ValueError(
            f"n_slices={n_slices} > {len(idx)} samples in {name}; lower n_slices or n_shards"
        )
    return [
        [idx[j] for j in part]
        for part in slice_parts([dataset.ids[i] for i in idx], n_slices, seed)
    ]


def _concat(parts: list[list[int]]) -> list[int]:
    return [i for p in parts for i in p]


def _slice_bounds(parts: list[list[int]]) -> list[tuple[int, int]]:
    """``[(start, end)]`` of each non-empty slice in the concatenation of ``parts``."""
    bounds = np.cumsum([0] + [len(p) for p in parts if p])
    return list(zip(bounds[:-1], bounds[1:], strict=True))


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
    sliced exactly as ``make_split`` slices its shards (``slice_parts``)."""
    if not ids:
        raise ValueError(f"{ShardId(int(index))}: an added source needs at least one sample")
    if n_slices > len(ids):
        raise ValueError(
            f"n_slices={n_slices} > {len(ids)} samples in the new source; lower sharding.n_slices"
        )
    parts = slice_parts(list(ids), n_slices, seed)
    members = _concat(parts)
    return Manifest.build(
        ShardId(int(index)).name,
        [ids[j] for j in members],
        [content_hashes[j] for j in members],
        _slice_bounds(parts),
        {int(labels[j]) for j in members},
        {**meta, "shard": int(index), "n_slices": int(n_slices)},
    )
