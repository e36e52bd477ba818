"""Sharding: disjoint shards covering the private set, deterministic in the seed, hashed manifests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cdm.core.hashing import hash_ids
from cdm.data.datasets import ArrayDataset
from cdm.data.loaders import load_digits_dataset, load_npz
from cdm.data.manifest import Manifest, held_out, indices_of, slice_indices, without_ids
from cdm.data.sharding import epoch_order, id_hash, make_split, slice_of_id

SAFE = {"safe_fraction": 0.1, "safe_classes": [9]}


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture(scope="module")
def scored(digits):
    """Digits with a score column (mean intensity), so by_score runs on the same data."""
    return ArrayDataset(
        digits.raw,
        name="digits",
        ids=digits.ids,
        labels=digits.labels.numpy(),
        class_names=digits.class_names,
        splits=digits.splits,
        scores=digits.raw.reshape(len(digits), -1).mean(1),
    )


def write_sources(path, dataset, seed: int, n: int = 3, **safe) -> str:
    """A sources file: the private ids of a random split, dealt to n named users by index."""
    private = make_split(dataset, strategy="random", n_shards=1, seed=seed, **safe).private
    ids = sorted(private.ids)
    sources = {f"user{k}": ids[k::n] for k in range(n)}
    path.write_text(json.dumps({"sources": sources}))
    return str(path)


def split_for(strategy, dataset, tmp_path, seed=0, **kw):
    extra = {}
    if strategy == "manifest":
        extra["manifest_path"] = write_sources(tmp_path / f"src{seed}.json", dataset, seed, **SAFE)
    return make_split(
        dataset, strategy=strategy, n_shards=3, seed=seed, n_slices=4, **SAFE, **extra, **kw
    )


STRATS = ["by_class", "random", "by_score", "manifest"]


@pytest.mark.parametrize("strategy", STRATS)
def test_split_properties(strategy, scored, tmp_path):
    ds = scored
    sp = split_for(strategy, ds, tmp_path)
    train = {ds.ids[i] for i, s in enumerate(ds.splits) if s == "train"}
    safe = set(sp.safe.ids)
    shard_sets = [set(m.ids) for m in sp.shards]
    assert len(sp.shards) == 3 and [m.name for m in sp.shards] == [
        "shard-00",
        "shard-01",
        "shard-02",
    ]
    assert all(len(s) == len(m.ids) > 0 for s, m in zip(shard_sets, sp.shards, strict=True))
    assert sum(map(len, shard_sets)) == len(set().union(*shard_sets))  # pairwise disjoint
    assert not safe & set().union(*shard_sets)
    assert set().union(*shard_sets) == set(sp.private.ids) == train - safe
    assert len(sp.private.ids) == len(set(sp.private.ids))
    # safe: all of class 9 plus ~10% of each other class
    labels = {ds.ids[i]: int(ds.labels[i]) for i in range(len(ds))}
    assert {i for i in train if labels[i] == 9} <= safe
    assert 9 not in sp.private.classes and 9 in sp.safe.classes
    assert 0.05 < sum(labels[i] != 9 for i in safe) / len(train) < 0.15
    # slices cover each shard in order; private slice j is the union of the shards' slice j
    for m in sp.shards:
        assert m.n_slices == 4 and m.slices[0][0] == 0 and m.slices[-1][1] == len(m.ids)
        assert sum((m.slice_ids(s) for s in range(4)), ()) == m.ids
        # each id's slice is its own hash mod n_slices (slices in id order): sizes near-equal
        assert all(m.slice_of(i) == slice_of_id(i, 4, 0) for i in m.ids)
        assert all(list(m.slice_ids(s)) == sorted(m.slice_ids(s)) for s in range(4))
        mean = len(m.ids) / 4  # binomial sizes: within 4 standard deviations
        assert all(abs(b - a - mean) < 4 * (mean * 0.75) ** 0.5 for a, b in m.slices)
        assert m.hash == hash_ids(m.ids, m.content_hashes)
        assert m.meta["strategy"] == strategy and m.meta["seed"] == 0
        assert m.classes == tuple(sorted({labels[i] for i in m.ids}))
    for j in range(4):
        assert set(sp.private.slice_ids(j)) == set().union(*(m.slice_ids(j) for m in sp.shards))
    # indices_of / slice_indices map back to the dataset
    idx = indices_of(ds, sp.shards[1])
    assert [ds.ids[i] for i in idx] == list(sp.shards[1].ids)
    assert sum(slice_indices(ds, sp.shards[1]), []) == idx


@pytest.mark.parametrize("strategy", STRATS)
def test_deterministic_in_seed(strategy, scored, tmp_path):
    a = split_for(strategy, scored, tmp_path, seed=1)
    b = split_for(strategy, scored, tmp_path, seed=1)
    c = split_for(strategy, scored, tmp_path, seed=2)
    assert [m.ids for m in a.manifests] == [m.ids for m in b.manifests]
    assert [m.hash for m in a.manifests] == [m.hash for m in b.manifests]
    assert [m.ids for m in a.manifests] != [m.ids for m in c.manifests]


def test_independent_of_python_hash_seed(digits):
    code = (
        "from cdm.data import load_digits_dataset, make_split;"
        "s = make_split(load_digits_dataset(), strategy='by_class', n_shards=3, seed=5,"
        " safe_fraction=0.2, n_slices=2);"
        "print([m.hash for m in s.manifests], [m.ids[:3] for m in s.manifests])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    s = make_split(digits, strategy="by_class", n_shards=3, seed=5, safe_fraction=0.2, n_slices=2)
    expected = f"{[m.hash for m in s.manifests]} {[m.ids[:3] for m in s.manifests]}"
    assert out.stdout.strip() == expected


def test_by_class_disjoint_classes(digits):
    sp = make_split(digits, strategy="by_class", n_shards=4, seed=0)
    classes = [set(m.classes) for m in sp.shards]
    assert sorted(c for s in classes for c in s) == list(range(10))
    assert sorted(len(s) for s in classes) == [2, 2, 3, 3]
    assert [sorted(s) for s in classes] == [m.meta["shard_classes"] for m in sp.shards]
    assert len(sp.safe.ids) == 0 and sp.safe.slices == ()


def test_random_near_equal(digits):
    sp = make_split(digits, strategy="random", n_shards=7, seed=0)
    sizes = [len(m.ids) for m in sp.shards]
    mean = sum(sizes) / 7  # each id's shard is its own hash mod 7: binomial sizes
    assert all(abs(n - mean) < 4 * (mean * 6 / 7) ** 0.5 for n in sizes)
    assert sum(sizes) == digits.splits.count("train")
    assert all(m.meta["shard"] == id_hash(0, "shard", i) % 7 for m in sp.shards for i in m.ids)


def test_manifest_json_round_trip_and_tamper(digits):
    sp = make_split(digits, strategy="random", n_shards=2, seed=0, safe_fraction=0.2, n_slices=3)
    for m in sp.manifests:
        d = json.loads(json.dumps(m.to_json()))
        back = Manifest.from_json(d)
        assert back == m and back.meta == m.meta and back.slices == m.slices
    d = json.loads(json.dumps(sp.shards[0].to_json()))
    d["ids"][0] = "digits/999999"
    with pytest.raises(ValueError, match="shard-00.*hash mismatch"):
        Manifest.from_json(d)
    d = json.loads(json.dumps(sp.safe.to_json()))
    d["content_hashes"][-1] = "0" * 64
    with pytest.raises(ValueError, match="'safe'.*rebuild"):
        Manifest.from_json(d)
    d = sp.private.to_json()
    d["slices"] = [[0, 5]]
    with pytest.raises(ValueError, match="slices cover 5"):
        Manifest.from_json(d)


def test_indices_of_detects_changed_content(digits):
    sp = make_split(digits, strategy="random", n_shards=2, seed=0)
    images = digits.raw.copy()
    i = digits.id_to_index[sp.shards[0].ids[0]]
    images[i] = 255 - images[i]
    changed = ArrayDataset(
        images,
        name="digits",
        ids=digits.ids,
        labels=digits.labels.numpy(),
        class_names=digits.class_names,
        splits=digits.splits,
    )
    with pytest.raises(ValueError, match="changed content.*rebuild"):
        indices_of(changed, sp.shards[0])
    assert len(indices_of(changed, sp.shards[1])) == len(sp.shards[1].ids)


def test_held_out(digits):
    test = held_out(digits)
    assert len(test) == digits.splits.count("test") and all(
        digits.splits[i] == "test" for i in test
    )
    some = held_out(digits, classes=[3, 4])
    assert some and {int(digits.labels[i]) for i in some} == {3, 4}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"strategy": "by_class", "n_shards": 11}, "sharding=random"),
        ({"strategy": "by_class", "n_shards": 3, "safe_classes": list(range(8))}, "lower n_shards"),
        ({"strategy": "random", "n_shards": 0}, "n_shards must be >= 1"),
        ({"strategy": "random", "n_shards": 2000}, "lower n_shards"),
        ({"strategy": "random", "n_shards": 2, "safe_fraction": 1.0}, r"\[0, 1\)"),
        ({"strategy": "random", "n_shards": 2, "safe_fraction": -0.1}, r"\[0, 1\)"),
        ({"strategy": "random", "n_shards": 2, "n_slices": 0}, "n_slices must be >= 1"),
        ({"strategy": "random", "n_shards": 2, "n_slices": 1000}, "lower n_slices"),
        ({"strategy": "random", "n_shards": 700}, "drew none of.*lower n_shards"),
        (
            {"strategy": "random", "n_shards": 2, "safe_classes": list(range(10))},
            "no private samples",
        ),
        ({"strategy": "random", "n_shards": 2, "safe_classes": [12]}, "classes present"),
        ({"strategy": "random", "n_shards": 2, "seed": -1}, "non-negative"),
        ({"strategy": "kmeans", "n_shards": 2}, "choose one of"),
        ({"strategy": "by_score", "n_shards": 2}, "no 'scores' column.*sharding=random"),
        ({"strategy": "random", "n_shards": 2, "manifest_path": "x.json"}, "only used with"),
        ({"strategy": "manifest", "n_shards": 0}, "needs manifest_path"),
        ({"strategy": "random", "n_shards": 2, "split": "val"}, "no samples in split 'val'"),
    ],
)
def test_impossible_splits_explain_fix(digits, kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_split(digits, **kwargs)


def test_by_score_on_npz(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    np.savez(
        tmp_path / "aesthetic.npz",
        images=rng.integers(0, 256, size=(n, 4, 4), dtype=np.uint8),
        labels=rng.integers(0, 3, size=n),
        scores=rng.permutation(n).astype(float),
    )
    ds = load_npz(path=str(tmp_path / "aesthetic.npz"))
    sp = make_split(ds, strategy="by_score", n_shards=4, seed=0, n_slices=2)
    bands = [sorted(float(ds.scores[i]) for i in indices_of(ds, m)) for m in sp.shards]
    assert bands == [[float(s) for s in range(10 * k, 10 * k + 10)] for k in range(4)]
    assert sp.shards[0].meta["score_min"] == 0.0 and sp.shards[3].meta["score_max"] == 39.0
    ds.scores[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make_split(ds, strategy="by_score", n_shards=2, seed=0)


def test_manifest_strategy(digits, tmp_path):
    ids = [digits.ids[i] for i, s in enumerate(digits.splits) if s == "train"]
    path = tmp_path / "sources.json"
    path.write_text(json.dumps({"sources": {"bob": ids[1::2], "alice": ids[0::2]}}))
    sp = make_split(
        digits, strategy="manifest", n_shards=0, seed=0, manifest_path=str(path), n_slices=2
    )
    assert [m.meta["source"] for m in sp.shards] == ["alice", "bob"]
    assert set(sp.shards[1].ids) == set(ids[1::2]) and sp.shards[0].meta["manifest_path"] == str(
        path
    )
    path.write_text(
        json.dumps({"sources": {"bob": ids[1::2], "alice": ids[0::2]}, "order": ["bob", "alice"]})
    )
    sp = make_split(digits, strategy="manifest", n_shards=2, seed=0, manifest_path=str(path))
    assert [m.meta["source"] for m in sp.shards] == ["bob", "alice"]


def _bad_sources(digits, tmp_path, sources, **kw):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(sources))
    return make_split(
        digits,
        strategy="manifest",
        n_shards=kw.pop("n_shards", 0),
        seed=0,
        manifest_path=str(path),
        **kw,
    )


def test_manifest_strategy_errors(digits, tmp_path):
    ids = [digits.ids[i] for i, s in enumerate(digits.splits) if s == "train"]
    test_id = digits.ids[digits.splits.index("test")]
    cases = [
        (
            {"sources": {"a": ids[:10] + ["digits/xyz"], "b": ids[10:]}},
            {},
            "bad.json.*'digits/xyz'",
        ),
        ({"sources": {"a": ids[:10] + [test_id], "b": ids[10:]}}, {}, "not in the 'train' split"),
        (
            {"sources": {"a": ids[:12], "b": ids[10:]}},
            {},
            r"two sources \('a' and 'b'\).*" + ids[10],
        ),
        ({"sources": {"a": ids[:10] + ids[:1], "b": ids[10:]}}, {}, "listed twice in source 'a'"),
        ({"sources": {"a": ids[:10], "b": ids[20:]}}, {}, "10 private ids are in no source"),
        ({"sources": {"a": ids, "b": []}}, {}, "non-empty list"),
        ({"sources": {"a": ids[:10], "b": ids[10:]}}, {"n_shards": 3}, "set n_shards=2 or 0"),
        ({"sources": {"a": ids[:10], "b": ids[10:]}, "order": ["a"]}, {}, "must list exactly"),
        ({"users": {}}, {}, "'sources'"),
        ({"sources": {"a": ids[:2], "b": ids[2:]}}, {"n_slices": 3}, "lower n_slices"),
    ]
    for sources, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            _bad_sources(digits, tmp_path, sources, **kw)
    # ids that the safe set already owns
    safe = make_split(digits, strategy="random", n_shards=1, seed=0, safe_fraction=0.2).safe.ids
    with pytest.raises(ValueError, match="in the safe set"):
        _bad_sources(digits, tmp_path, {"sources": {"a": ids}}, safe_fraction=0.2)
    assert safe
    with pytest.raises(FileNotFoundError, match="sources"):
        make_split(
            digits, strategy="manifest", n_shards=0, seed=0, manifest_path=str(tmp_path / "no.json")
        )


# ------------------------------------------------------------------ removing ids moves no other id


def without_samples(dataset, drop: set[str]) -> ArrayDataset:
    """``dataset`` with the samples ``drop`` deleted (a third party's copy of the data left)."""
    keep = [i for i, sid in enumerate(dataset.ids) if sid not in drop]
    return ArrayDataset(
        dataset.raw[keep],
        name=dataset.name,
        ids=[dataset.ids[i] for i in keep],
        labels=dataset.labels.numpy()[keep],
        class_names=dataset.class_names,
        splits=[dataset.splits[i] for i in keep],
    )


def drawn(ids, seed: int, fraction: float) -> set[str]:
    """A seeded sample of ``ids`` (the ids a request forgets)."""
    rng = np.random.default_rng(seed)
    return {ids[j] for j in rng.choice(len(ids), int(fraction * len(ids)), replace=False)}


@pytest.mark.parametrize("strategy", ["random", "by_class"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_removing_ids_leaves_every_other_id_where_it_was(digits, strategy, seed):
    """Safe split, shard, slice and in-slice order of an id depend on the id and the seed alone:
    the split of the data minus some ids is the split of the data, minus those ids."""
    kw = {"strategy": strategy, "n_shards": 3, "seed": seed, "safe_fraction": 0.2, "n_slices": 4}
    full = make_split(digits, **kw)
    drop = drawn(full.private.ids, seed, 0.1 + 0.1 * seed)
    after = make_split(without_samples(digits, drop), **kw)
    expected = without_ids(full, drop)
    assert after.safe == full.safe
    assert after.shards == expected.shards  # ids, slices (an emptied slice dropped alike), hashes
    assert after.private == expected.private


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_manifest_sharding_on_the_ids_left_equals_forgetting(digits, tmp_path, seed):
    """A third party's ``sharding=manifest`` on the remaining ids (the forgotten ones listed as
    ``excluded``) gives the manifests ``cdm-forget`` made."""
    kw = {"n_shards": 0, "seed": seed, "safe_fraction": 0.2, "n_slices": 3}
    full = make_split(digits, strategy="random", **{**kw, "n_shards": 3})
    # forget a whole slice of shard 1, so slices are dropped and renumbered too
    drop = set(full.shards[1].slice_ids(1)) | drawn(full.private.ids, seed, 0.05)
    expected = without_ids(full, drop)
    path = tmp_path / "left.json"
    sources = {m.name: list(m.ids) for m in expected.shards}
    path.write_text(
        json.dumps({"sources": sources, "order": list(sources), "excluded": sorted(drop)})
    )
    after = make_split(digits, strategy="manifest", manifest_path=str(path), **kw)
    assert expected.shards[1].n_slices == 2
    assert [(m.name, m.ids, m.slices, m.hash) for m in after.shards] == [
        (m.name, m.ids, m.slices, m.hash) for m in expected.shards
    ]
    assert after.private == expected.private and after.safe == full.safe
    # without 'excluded' the forgotten ids are orphans, named with the fix
    path.write_text(json.dumps({"sources": sources}))
    with pytest.raises(ValueError, match="in no source.*'excluded'"):
        make_split(digits, strategy="manifest", manifest_path=str(path), **kw)
    path.write_text(json.dumps({"sources": sources, "excluded": [full.safe.ids[0]]}))
    with pytest.raises(ValueError, match="'excluded' lists ids that a source or the safe set"):
        make_split(digits, strategy="manifest", manifest_path=str(path), **kw)


@pytest.mark.parametrize("seed", [0, 5, 11])
def test_epoch_order_of_the_ids_left_is_the_order_minus_the_removed(digits, seed):
    ids = [sid for sid, s in zip(digits.ids, digits.splits, strict=True) if s == "train"]
    drop = drawn(ids, seed, 0.3)
    left = [sid for sid in ids if sid not in drop]
    for epoch in range(3):
        order = [ids[j] for j in epoch_order(ids, seed, epoch)]
        assert [left[j] for j in epoch_order(left, seed, epoch)] == [
            sid for sid in order if sid not in drop
        ]
    assert epoch_order(ids, seed, 0) != epoch_order(ids, seed, 1)
    assert epoch_order(ids, seed, 0) != epoch_order(ids, seed + 1, 0)
