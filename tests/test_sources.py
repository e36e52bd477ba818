"""Whole sources: forgetting one deletes its adapter (paper Sec. 5, "Forgetting"); adding one
trains a new adapter and touches no other (Sec. 5, "Continual Learning")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cdm.lifecycle.add_source import AddSourceError, run_add_source
from cdm.lifecycle.forget import ForgetError, run_forget
from cdm.store import ArtifactStore, StaleArtifactError, sha256_file
from cdm.store.records import forgotten_ids, read_forget_journal, read_sources
from tests.conftest import run_inprocess

EXP = "digits_4split"
TINY = [f"experiment={EXP}", "debug=tiny", "sharding.n_shards=3", "sharding.n_slices=2"]
SAMPLES = ["num_samples=4", "steps=2", "progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny 3-shard digits CDM: backbone, shards, router, paragon, k-NN, two sample sets."""
    root = tmp_path_factory.mktemp("sources")
    run_inprocess(*TINY, "stage=backbone", artifacts=root)
    for k in range(3):
        run_inprocess(*TINY, "stage=shard", f"shard.index={k}", artifacts=root)
    for stage in ("router", "paragon", "knn"):
        run_inprocess(*TINY, f"stage={stage}", artifacts=root)
    run_inprocess(*TINY, *SAMPLES, "composition=classifier", "name=all", artifacts=root, config="sample")  # fmt: skip
    run_inprocess(*TINY, *SAMPLES, "composition=average", "shards=[0]", "name=only0", artifacts=root, config="sample")  # fmt: skip
    return root


@pytest.fixture
def root(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "artifacts"))


def compose_and_run(config: str, root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    every = [*TINY, *overrides, f"paths.artifacts={root}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config, overrides=every)
        if config == "forget":
            return run_forget(cfg)
        return run_add_source(cfg, every)


def backbone_hash(store: ArtifactStore) -> str:
    return store.read_adapter_card(EXP, "shard-00")["backbone_hash"]


def adapter_hashes(root: Path) -> dict[str, str]:
    store = ArtifactStore(root)
    return {
        p.name: sha256_file(p / "adapter_model.safetensors")
        for p in sorted((store.experiment_dir(EXP) / "shards").glob("shard-*"))
    }


# ------------------------------------------------------------------------------ forgetting a source


def test_forgetting_a_source_deletes_it_and_keeps_the_others(root):
    store = ArtifactStore(root)
    before = adapter_hashes(root)
    shard1 = store.load_manifest(EXP, "shard-01")
    cert = compose_and_run("forget", root, "forget.source=1")

    # deleted, not hidden: adapter, manifest, checkpoints, centroids
    assert not store.adapter_dir(EXP, "shard-01").exists()
    assert "shard-01" not in store.list_manifests(EXP)
    assert not store.checkpoint_dir(EXP, "shard-01").exists()
    assert not list((store.experiment_dir(EXP) / "knn").glob("*/shard-01"))
    deleted = {d["artifact"].split(" ")[0] for d in cert["deleted"]}
    assert {"adapter", "manifest", "checkpoints", "knn"} <= deleted
    assert cert["removed"]["adapter_weights_sha256"]
    assert cert["request"]["shard"] == "shard-01" and cert["request"]["n_ids"] == len(shard1["ids"])
    # the other adapters are byte-identical
    after = adapter_hashes(root)
    assert after == {k: v for k, v in before.items() if k != "shard-01"}
    # the router was retrained on the remaining shards only; samples that used it are set aside
    (router,) = cert["routers"]
    assert router["action"] == "retrained"
    assert [m["name"] for m in router["shard_manifests"]] == ["shard-00", "shard-02"]
    moved = {q["artifact"] for q in cert["quarantined"]}
    assert "samples/all" in moved and "samples/only0" not in moved
    # the private data lost exactly the source's ids; the paragon is refused until retrained
    private = store.load_manifest(EXP, "private")
    assert not set(shard1["ids"]) & set(private["ids"])
    assert set(shard1["ids"]) <= set(forgotten_ids(store, EXP))
    assert any(s["artifact"] == "adapter paragon" for s in cert["stale"])
    with pytest.raises(StaleArtifactError):
        store.checked_adapter(EXP, "paragon", backbone_hash=backbone_hash(store))
    # the model still composes, from the remaining shards
    card = run_inprocess(*TINY, *SAMPLES, "composition=classifier", "name=after", artifacts=root, config="sample")  # fmt: skip
    assert card["shards"] == [0, 2]
    # training the forgotten shard again is refused with the indices that exist
    with pytest.raises(ValueError, match=r"has shards \[0, 2\]"):
        run_inprocess(*TINY, "stage=shard", "shard.index=1", artifacts=root)
    # the paragon retrains on the data left
    paragon = run_inprocess(*TINY, "stage=paragon", "retrain=true", artifacts=root)
    assert paragon["manifest_hash"] == private["hash"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["forget.source=7"], "has no source '7'|has no source 7"),
        (["forget.source=nobody"], "has no source 'nobody'"),
        (["forget.source=1", "forget.ids=[digits/000001]"], "not both"),
    ],
)
def test_bad_source_requests_change_nothing(root, overrides, message):
    store = ArtifactStore(root)
    before = adapter_hashes(root)
    with pytest.raises(ForgetError, match=message):
        compose_and_run("forget", root, *overrides)
    assert adapter_hashes(root) == before
    assert read_sources(store, EXP) == {"added": [], "removed": []}


def test_the_last_shard_cannot_be_forgotten(root):
    compose_and_run("forget", root, "forget.source=0", "forget.retrain_router=false")
    compose_and_run("forget", root, "forget.source=shard-01", "forget.retrain_router=false")
    with pytest.raises(ForgetError, match="only shard"):
        compose_and_run("forget", root, "forget.source=2")
    with pytest.raises(ForgetError, match="already forgotten"):
        compose_and_run("forget", root, "forget.source=0")


def test_crash_while_removing_a_source_is_rolled_forward(root, monkeypatch):
    store = ArtifactStore(root)

    def crash(self, experiment, job):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ArtifactStore, "delete_adapter", crash)
    with pytest.raises(KeyboardInterrupt):
        compose_and_run("forget", root, "forget.source=2", "forget.retrain_router=false")
    # already refused: the shard is recorded as removed before anything is deleted
    with pytest.raises(StaleArtifactError, match="forgotten"):
        store.checked_adapter(EXP, "shard-02", backbone_hash=backbone_hash(store))
    monkeypatch.undo()
    cert = compose_and_run("forget", root, "forget.retrain_router=false")  # no request: finish it
    assert cert["request"]["shard"] == "shard-02"
    assert not store.adapter_dir(EXP, "shard-02").exists()
    assert read_forget_journal(store, EXP) is None


# ------------------------------------------------------------------------------ adding a source


def new_source(path: Path, classes: tuple[int, ...] = (2, 3), n: int = 40) -> Path:
    """A .npz of digits test images (never in any shard) of ``classes``."""
    from cdm.data.loaders import load_digits_dataset

    data = load_digits_dataset(resolution=8, channels=1)
    idx = [i for i, s in enumerate(data.splits) if s == "test" and int(data.labels[i]) in classes]
    images = np.stack([((data.image(i)[0] + 1) * 127.5).round().numpy() for i in idx[:n]])
    np.savez(path, images=images.astype(np.uint8), labels=data.labels[idx[:n]].numpy())
    return path


def test_adding_a_source_touches_no_existing_adapter(root, tmp_path):
    store = ArtifactStore(root)
    before = adapter_hashes(root)
    router_before = json.loads((store.router_dir(EXP) / "card.json").read_text())
    record = compose_and_run(
        "add_source", root, "source.name=batch5", f"source.path={new_source(tmp_path / 'b.npz')}",
        "add.num_samples=6", "add.steps=2",
    )  # fmt: skip
    assert record["job"] == "shard-03" and record["n_samples"] == 40
    after = adapter_hashes(root)
    assert {k: after[k] for k in before} == before  # existing adapters byte-identical
    assert set(after) == {*before, "shard-03"}
    manifest = store.load_manifest(EXP, "shard-03")
    assert manifest["meta"]["source"] == "batch5" and len(manifest["ids"]) == 40
    assert all(i.startswith("batch5/") for i in manifest["ids"])
    private = store.load_manifest(EXP, "private")
    assert set(manifest["ids"]) <= set(private["ids"])
    # router retrained on 4 shards; new centroids for the new shard only
    (router,) = record["routers"]
    assert [m["name"] for m in router["shard_manifests"]][-1] == "shard-03"
    assert router["new_weights_sha256"] != router_before["weights_sha256"]
    assert [c["artifact"].split("/")[-1] for c in record["knn_centroids"]] == ["shard-03"]
    assert record["samples"]["shards"] == [0, 1, 2, 3]
    trace = np.load(Path(record["samples"]["path"]) / "trace.npz")["weights"]
    assert trace.shape[-1] == 4
    assert any(s["artifact"] == "adapter paragon" for s in record["stale"])
    # provenance: the (now stale) paragon was trained on shard 0's samples, never on the new ones
    from cdm.provenance import what_depends_on

    def derived(sample_id: str) -> dict[str, str]:
        found = what_depends_on(store, sample_id=sample_id, experiment=EXP)["artifacts"]
        return {f"{a['kind']} {a['name'].split('/')[-1]}": a["status"] for a in found}

    old_sample = derived(store.load_manifest(EXP, "shard-00")["ids"][0])
    assert old_sample["adapter paragon"] == "stale" and "adapter shard-03" not in old_sample
    new_sample = derived(manifest["ids"][0])
    assert new_sample["adapter shard-03"] == "served" and new_sample["router router"] == "served"
    assert "adapter paragon" not in new_sample and "adapter shard-00" not in new_sample
    # the store keeps its own copy of the data: the original may go away
    (tmp_path / "b.npz").unlink()
    card = run_inprocess(*TINY, *SAMPLES, "composition=classifier", "name=again", artifacts=root, config="sample")  # fmt: skip
    assert card["shards"] == [0, 1, 2, 3]
    # a sample of the added source can be forgotten exactly like any other
    cert = compose_and_run("forget", root, f"forget.ids=[{manifest['ids'][0]}]", "forget.retrain_router=false")  # fmt: skip
    assert [r["artifact"] for r in cert["retrained"]] == ["adapter shard-03"]
    # and the whole source too: its stored data is deleted
    cert = compose_and_run("forget", root, "forget.source=batch5", "forget.retrain_router=false")
    assert not store.source_data_path(EXP, "batch5").exists()
    assert any(d["artifact"] == "source data batch5" for d in cert["deleted"])


def test_adding_a_source_that_fails_leaves_nothing(root, tmp_path, monkeypatch):
    import cdm.lifecycle.add_source

    store = ArtifactStore(root)
    private = store.load_manifest(EXP, "private")

    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cdm.lifecycle.add_source, "run_job", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        compose_and_run("add_source", root, "source.name=b6", f"source.path={new_source(tmp_path / 'b.npz')}")  # fmt: skip
    assert read_sources(store, EXP)["added"] == []
    assert "shard-03" not in store.list_manifests(EXP)
    assert not store.source_data_path(EXP, "b6").exists()
    assert store.load_manifest(EXP, "private")["hash"] == private["hash"]


def test_bad_sources_are_refused(root, tmp_path):
    with pytest.raises(AddSourceError, match="does not exist"):
        compose_and_run("add_source", root, "source.name=x", f"source.path={tmp_path / 'none.npz'}")
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 2, 12]))
    with pytest.raises(AddSourceError, match="outside the experiment's 10 classes"):
        compose_and_run("add_source", root, "source.name=x", f"source.path={bad}")
    with pytest.raises(AddSourceError, match="source.name=<name>"):
        compose_and_run("add_source", root, f"source.path={bad}")
    assert read_sources(ArtifactStore(root), EXP) == {"added": [], "removed": []}


# ------------------------------------------------------------------------------ store-wide artifacts


def test_a_feature_net_that_saw_a_forgotten_id_is_refused_until_retrained(root):
    """The domain feature net trains on the dataset's whole train split, private data included:
    after cdm-forget it is stale (refused by FD_<dataset> and knn=feature_net) until retrained
    without the forgotten ids, which its next training leaves out by itself."""
    from cdm.jobs.feature_net import load_domain_features

    store = ArtifactStore(root)
    first = run_inprocess(*TINY, "stage=feature_net", artifacts=root)
    load_domain_features(store, "digits", 8, 0)
    sid = store.load_manifest(EXP, "shard-01")["ids"][0]
    cert = compose_and_run("forget", root, f"forget.ids=[{sid}]", "forget.retrain_router=false")
    assert [s["artifact"] for s in cert["stale"] if s["artifact"].startswith("feature_net")] == [
        f"feature_net {first['name']}"
    ]
    with pytest.raises(StaleArtifactError, match="forgotten since"):
        load_domain_features(store, "digits", 8, 0)
    again = run_inprocess(*TINY, "stage=feature_net", artifacts=root)  # retrains by itself
    assert again["forgotten_excluded"] == [sid]
    assert again["n_train"] == first["n_train"] - 1
    assert again["weights_sha256"] != first["weights_sha256"]
    load_domain_features(store, "digits", 8, 0)  # usable again


def test_cli_refusals_exit_2_with_the_message(root, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    common = [*TINY, f"paths.artifacts={root}", f"hydra.run.dir={tmp_path}/run"]
    for module, args, message in [
        (
            "cdm.cli.add_source",
            ["source.name=x", f"source.path={tmp_path}/none.npz"],
            "does not exist",
        ),
        ("cdm.cli.forget", ["forget.source=nobody"], "has no source 'nobody'"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", module, *common, *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr
