"""The store's layout owns every path; ShardId names shards; the generic artifact refuses corruption."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cdm.core.names import ShardId, job_name
from cdm.store import ArtifactStore, CorruptArtifactError, MissingArtifactError, StatsKey
from cdm.store.artifact import (
    checked_card,
    load_tensors,
    save_artifact,
    verify_file,
    verify_weights,
)
from cdm.store.layout import EXPERIMENT_DIRS, PENDING_DIRS, ROOT_DIRS, StoreLayout
from cdm.store.records import (
    add_forgotten_ids,
    forgotten_ids,
    read_forget_journal,
    read_sources,
    save_sources,
    write_forget_journal,
)

PACKAGE = Path(__file__).resolve().parents[1] / "cdm"


def test_shard_id_round_trip_and_errors() -> None:
    for index in (0, 3, 12, 100):
        shard = ShardId(index)
        assert ShardId.parse(shard.name) == shard and str(shard) == shard.name
    assert ShardId(3).name == "shard-03" and ShardId.parse("shard-7").index == 7
    assert job_name("shard", 5) == "shard-05" and job_name("paragon") == "paragon"
    assert ShardId.is_shard("shard-01") and not ShardId.is_shard("paragon")
    assert not ShardId.is_shard(None) and not ShardId.is_shard("shard-x")
    assert sorted([ShardId(2), ShardId(0)]) == [ShardId(0), ShardId(2)]
    for bad in ("shard-", "shard-a", "paragon", "shard-03/..", ""):
        with pytest.raises(ValueError, match="is not a shard name"):
            ShardId.parse(bad)
    for bad_index in (-1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="non-negative int"):
            ShardId(bad_index)  # type: ignore[arg-type]


def test_stats_key_round_trip() -> None:
    key = StatsKey("digits", 8, "train", "ab" * 32)
    assert key.name == "digits-r8-train-" + "ab" * 8
    assert StatsKey.parse(key.name) == StatsKey("digits", 8, "train", "ab" * 8)
    assert StatsKey.parse("my-data-r16-shard_00-" + "0" * 16).dataset == "my-data"
    assert StatsKey.parse("not a key") is None


def test_layout_paths_keep_the_on_disk_names(tmp_path: Path) -> None:
    layout = StoreLayout(tmp_path)
    exp = tmp_path / "experiments" / "e"
    assert layout.adapter_dir("e", ShardId(3).name) == exp / "shards" / "shard-03"
    assert layout.forget_journal_path("e") == exp / "forget" / "pending" / "journal.json"
    assert layout.pending_adapter_dir("e", "shard-01") == exp / "forget/pending/adapters/shard-01"
    assert layout.pending_manifest_path("e", "safe") == exp / "forget/pending/manifests/safe.json"
    assert layout.quarantine_dir("e", "t1") == exp / "forget" / "quarantine" / "t1"
    assert layout.certificate_path("e", "t1") == exp / "certificates" / "t1.json"
    assert layout.source_record_path("e", "b5") == exp / "sources" / "b5.json"
    assert layout.stats_dir("pixels", StatsKey("d", 8, "test", "f" * 64)) == (
        tmp_path / "stats" / "pixels" / ("d-r8-test-" + "f" * 16)
    )
    assert layout.table_dir("table1") == tmp_path / "tables" / "table1"
    assert layout.audit_log_path() == tmp_path / "audit" / "serve.jsonl"
    assert layout.centroids_dir("e", "pixels", "shard-00") == exp / "knn/pixels/shard-00"
    assert isinstance(ArtifactStore(tmp_path), StoreLayout)


# a store path segment joined by hand: `x / "stats"`, `/ "last.ckpt"`, or a glob over one
_STORE_NAMES = sorted(set(ROOT_DIRS) | set(EXPERIMENT_DIRS) | set(PENDING_DIRS) | {
    "pending", "quarantine", "journal.json", "forgotten.json", "lock", "last.ckpt",
    "sources.json", "serve.jsonl"})  # fmt: skip
_HAND_BUILT = [
    re.compile(r'/\s*"(' + "|".join(map(re.escape, _STORE_NAMES)) + ')"'),
    re.compile(r"""f?["']shard-\{"""),  # a shard name built by hand: use ShardId(k).name
    re.compile(r"\[6:\]"),  # a shard name parsed by slicing: use ShardId.parse(name)
]


def hand_built_store_paths(package: Path) -> list[str]:
    """``file:line: text`` of each store path or shard name built outside ``cdm/store``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] == "store" or rel == Path("core/names.py"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(p.search(code) for p in _HAND_BUILT):
                found.append(f"{rel}:{number}: {line.strip()}")
    return found


def test_only_the_layout_builds_store_paths(tmp_path: Path) -> None:
    assert hand_built_store_paths(PACKAGE) == []
    # the check can fail: a module that joins a store folder by hand is reported
    fake = tmp_path / "cdm"
    (fake / "paper").mkdir(parents=True)
    (fake / "paper" / "x.py").write_text(
        'def f(store):\n    return store.root / "tables" / "t"\n'
        'def g(k):\n    return f"shard-{k:02d}"\n'
    )
    assert [h.split(":")[1] for h in hand_built_store_paths(fake)] == ["2", "4"]


def test_generic_artifact_round_trip_and_refusals(tmp_path: Path) -> None:
    final = tmp_path / "a" / "thing"
    card = save_artifact(
        final,
        {"kind": "thing"},
        tensors={"w": torch.arange(4.0)},
        weights_file="w.safetensors",
        config={"width": 4},
        config_file="config.json",
        files={"notes.txt": b"hello"},
    )
    assert card["weights_file"] == "w.safetensors" and len(card["weights_sha256"]) == 64
    assert set(card) >= {"config_sha256", "files"}
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".")]
    loaded = checked_card(final, "missing")
    verify_weights(final, loaded, "remake it")
    assert torch.equal(load_tensors(final, loaded)["w"], torch.arange(4.0))
    assert verify_file(final, loaded, "notes.txt", "remake it") == b"hello"

    data = bytearray((final / "w.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (final / "w.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="corrupt.*remake it"):
        verify_weights(final, loaded, "remake it")
    (final / "notes.txt").write_bytes(b"changed")
    with pytest.raises(CorruptArtifactError, match="corrupt"):
        verify_file(final, loaded, "notes.txt", "remake it")
    with pytest.raises(MissingArtifactError, match="make it with X"):
        checked_card(tmp_path / "nothing", "make it with X")


def test_records_round_trip(tmp_path: Path) -> None:
    layout = StoreLayout(tmp_path)
    assert read_sources(layout, "e") == {"added": [], "removed": []}
    save_sources(layout, "e", {"added": [], "removed": [{"job": "shard-01"}]})
    assert read_sources(layout, "e")["removed"] == [{"job": "shard-01"}]
    layout.sources_path("e").write_text("{")
    with pytest.raises(CorruptArtifactError, match="sources record"):
        read_sources(layout, "e")
    assert read_forget_journal(layout, "e") is None
    write_forget_journal(layout, "e", {"state": "committing"})
    assert read_forget_journal(layout, "e") == {"state": "committing"}
    add_forgotten_ids(layout, "e", ["b", "a"], "t1")
    add_forgotten_ids(layout, "e", ["a"], "t1")  # idempotent
    assert forgotten_ids(layout, "e") == ["a", "b"]
