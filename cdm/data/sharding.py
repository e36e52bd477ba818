"""Safe/private split, shard strategies and SISA slices, recorded as hashed ``Manifest``s.

Everything is a pure function of the dataset's ids/labels/scores and ``seed``: candidates are
sorted by id before any seeded permutation (``numpy.random.default_rng([seed, tag])``), so the
result depends neither on dataset order, global RNG state nor Python hash randomisation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cdm.core.names import ShardId
from cdm.data.manifest import Manifest, Split, abbreviate

STRATEGIES = ("by_class", "random", "by_score", "manifest")
_TAG_SAFE, _TAG_SHARD, _TAG_SLICE = 1, 2, 3  # distinct RNG streams per purpose


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
    orphans = [dataset.ids[i] for i in private if dataset.ids[i] not in owner]
    if orphans:
        raise ValueError(
            f"{p}: {len(orphans)} private ids are in no source, e.g. {abbreviate(orphans, 3)}; "
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
