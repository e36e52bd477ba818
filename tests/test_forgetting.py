"""cdm-forget: exact forgetting of sample ids by SISA retraining (paper Sec. 5, App. B).

The core claim: after forgetting, the shard's adapter is bit-identical to one trained from scratch
on the reduced data, while the rest of the model is untouched and everything else that saw the
ids is retrained, recomputed, refused or set aside.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cdm.data.manifest import Manifest
from cdm.lifecycle.downstream import schedule_cost
from cdm.lifecycle.forget import ForgetError
from cdm.store import ArtifactStore, StaleArtifactError, StoreError, load_checkpoint, sha256_file
from cdm.store.records import (
    add_forgotten_ids,
    forgotten_ids,
    list_certificates,
    read_forget_journal,
)
from tests.conftest import REPO, run_inprocess

EXP = "digits_2split"
TINY = [f"experiment={EXP}", "debug=tiny", "sharding.n_slices=3"]
SAMPLES = ["composition=average", "num_samples=4", "steps=2", "progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits_2split (3 SISA slices per shard): both shards, router, paragon, k-NN, samples."""
    root = tmp_path_factory.mktemp("trained")
    for stage in ("backbone", "shard", "router", "paragon", "knn"):
        run_inprocess(*TINY, f"stage={stage}", artifacts=root)
    run_inprocess(*TINY, "stage=shard", "shard.index=1", artifacts=root)
    run_inprocess(*TINY, *SAMPLES, "name=both", artifacts=root, config="sample")
    run_inprocess(*TINY, *SAMPLES, "name=only1", "shards=[1]", artifacts=root, config="sample")
    return root


@pytest.fixture
def root(trained, tmp_path) -> Path:
    """A private copy of the trained store (each test forgets something else)."""
    return Path(shutil.copytree(trained, tmp_path / "artifacts"))


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    """sha256 of shard 0 trained FROM SCRATCH in a fresh store whose split leaves ``ids`` out."""
    cache: dict[tuple[str, ...], str] = {}

    def train(ids: list[str]) -> str:
        key = tuple(sorted(ids))
        if key not in cache:
            fresh = tmp_path_factory.mktemp("fresh")
            shutil.copytree(trained / "backbones", fresh / "backbones")
            add_forgotten_ids(ArtifactStore(fresh), EXP, ids, "reference")
            run_inprocess(*TINY, "stage=shard", artifacts=fresh)
            cache[key] = weights_sha(fresh, "shard-00")
        return cache[key]

    return train


def forget(root: Path, *overrides: str) -> dict:
    """Run cdm-forget's library entry point in this process."""
    return run_inprocess(f"experiment={EXP}", *overrides, artifacts=root, config="forget")


def ids_arg(ids: list[str]) -> str:
    return f"forget.ids=[{','.join(ids)}]"


def weights_sha(root: Path, job: str) -> str:
    return sha256_file(ArtifactStore(root).adapter_dir(EXP, job) / "adapter_model.safetensors")


def manifest(root: Path, name: str) -> Manifest:
    return Manifest.from_json(ArtifactStore(root).load_manifest(EXP, name))


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of the store, except logs and the forget bookkeeping."""
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not {"logs", "forget", "hydra-run"} & set(p.relative_to(root).parts)
    }


def fed_ids(path: Path, dataset) -> set[str]:
    mask = load_checkpoint(path)["cdm"]["fed_mask"]
    return {dataset.ids[i] for i in mask.nonzero().flatten().tolist()}


def backbone_hash(root: Path) -> str:
    (directory,) = (root / "backbones").iterdir()  # digits-r8-tiny-safe0.3-seed0-<hash>
    return json.loads((directory / "card.json").read_text())["backbone_hash"]


# ------------------------------------------------------------------------------ exactness


def test_forgetting_a_later_slice_equals_training_from_scratch(root, reference, tmp_path):
    from cdm.data.loaders import load_digits_dataset

    store = ArtifactStore(root)
    old0, old1, old_private = (
        manifest(root, "shard-00"),
        manifest(root, "shard-01"),
        manifest(root, "private"),
    )
    ids = [*old0.slice_ids(1)[:2], old0.slice_ids(2)[0]]  # earliest affected slice: 1
    before = snapshot(root)
    ckpts = store.checkpoint_dir(EXP, "shard-00")

    cert = forget(root, ids_arg(ids))

    # bit-identical to a fresh store's shard 0 trained from scratch on the reduced data
    assert weights_sha(root, "shard-00") == reference(ids)
    retrained = cert["retrained"][0]
    assert retrained["restarted_from"]["kind"] == "slice_checkpoint"
    assert retrained["restarted_from"]["slice"] == 0
    assert retrained["restarted_from"]["path"] == str(ckpts / "slice-00.ckpt")
    assert (
        retrained["restarted_from"]["sha256"]
        == before[str((ckpts / "slice-00.ckpt").relative_to(root))]
    )
    assert (
        retrained["old_weights_sha256"]
        == before[f"experiments/{EXP}/shards/shard-00/adapter_model.safetensors"]
    )
    assert retrained["new_weights_sha256"] == reference(ids)
    # the other shard is untouched, byte for byte
    assert (
        weights_sha(root, "shard-01")
        == before[f"experiments/{EXP}/shards/shard-01/adapter_model.safetensors"]
    )
    assert manifest(root, "shard-01") == old1
    assert [u["artifact"] for u in cert["unchanged"]] == ["adapter shard-01"]
    # new manifests: the old ones minus the ids, same slices otherwise
    new0, new_private = manifest(root, "shard-00"), manifest(root, "private")
    assert new0.ids == tuple(i for i in old0.ids if i not in ids)
    assert (
        new0.slice_ids(0) == old0.slice_ids(0)
        and len(new0.slice_ids(1)) == len(old0.slice_ids(1)) - 2
    )
    assert set(new_private.ids) == set(old_private.ids) - set(ids)
    assert cert["manifests"]["shard-00"] == {
        **cert["manifests"]["shard-00"],
        "old_hash": old0.hash,
        "new_hash": new0.hash,
    }
    assert cert["manifests"]["private"]["new_hash"] == new_private.hash
    assert store.read_adapter_card(EXP, "shard-00")["manifest_hash"] == new0.hash
    # the request: ids, content hashes, shard and slice
    got = {s["id"]: s for s in cert["request"]["samples"]}
    assert sorted(got) == sorted(ids) and {s["slice"] for s in got.values()} == {1, 2}
    assert all(s["shard"] == 0 and len(s["content_hash"]) == 64 for s in got.values())
    # checkpoints: slice 0 kept as is, later ones (which saw the ids) replaced by ids-free ones
    assert (
        sha256_file(ckpts / "slice-00.ckpt")
        == before[str((ckpts / "slice-00.ckpt").relative_to(root))]
    )
    dataset = load_digits_dataset()
    for name in ("slice-01.ckpt", "slice-02.ckpt", "last.ckpt"):
        assert not set(ids) & fed_ids(ckpts / name, dataset)
    assert fed_ids(ckpts / "last.ckpt", dataset) == set(new0.ids)
    # the router was retrained on the new shard manifests
    router = json.loads((store.router_dir(EXP) / "card.json").read_text())
    assert {m["name"]: m["hash"] for m in router["shard_manifests"]} == {
        "shard-00": new0.hash,
        "shard-01": old1.hash,
    }
    assert cert["routers"][0]["action"] == "retrained"
    store.load_router(EXP, backbone_hash=backbone_hash(root))  # not stale
    # shard 0's k-NN centroids were recomputed from the new manifest; shard 1's are untouched
    assert [(k["artifact"], k["action"]) for k in cert["knn_centroids"]] == [
        ("knn centroids pixels/shard-00", "recomputed")
    ]
    knn0 = json.loads((root / f"experiments/{EXP}/knn/pixels/shard-00/card.json").read_text())
    assert knn0["manifest_hash"] == new0.hash
    fresh = tmp_path / "fresh-knn"  # the same as computing them in a fresh store
    add_forgotten_ids(ArtifactStore(fresh), EXP, ids, "reference")
    run_inprocess(*TINY, "stage=knn", artifacts=fresh)
    knn0 = f"experiments/{EXP}/knn/pixels/shard-00/centroids.safetensors"
    assert sha256_file(root / knn0) == sha256_file(fresh / knn0)
    knn1 = f"experiments/{EXP}/knn/pixels/shard-01/centroids.safetensors"
    assert sha256_file(root / knn1) == before[knn1]
    # samples drawn from shard 0 are set aside; those of shard 1 alone are kept
    assert [q["artifact"] for q in cert["quarantined"]] == ["samples/both"]
    assert (root / f"experiments/{EXP}/samples/only1/card.json").is_file()
    assert not (root / f"experiments/{EXP}/samples/both").exists()
    # the certificate is in the store, with the cost of retraining the paragon instead
    path = Path(cert["path"])
    assert path.parent == store.certificate_dir(EXP) and path.name.endswith(".json")
    assert json.loads(path.read_text())["request"] == cert["request"]
    cost = cert["cost"]
    assert 0 < cost["forget_retrain"]["samples_fed"] < retrained["cost_from_scratch"]["samples_fed"]
    assert cost["paragon_from_scratch"]["samples_fed"] > cost["forget_retrain"]["samples_fed"]
    assert not store.forget_pending_dir(EXP).exists()


def test_forgetting_the_first_slice_retrains_from_scratch(root, reference):
    store = ArtifactStore(root)
    ids = [manifest(root, "shard-00").slice_ids(0)[3]]
    old_private = manifest(root, "private").hash
    for rel, card in [
        (f"experiments/{EXP}/evals/both", {"parents": [{"kind": "samples", "name": "both"}]}),
        (f"experiments/{EXP}/evals/only1", {"parents": [{"kind": "samples", "name": "only1"}]}),
        ("stats/domain/private-ref", {"ids_hash": old_private}),
        ("stats/domain/test-ref", {"ids_hash": "f" * 64}),
    ]:
        (root / rel).mkdir(parents=True)
        (root / rel / "card.json").write_text(json.dumps(card))
    cert = forget(root, ids_arg(ids), "forget.retrain_router=false")
    assert [q["artifact"] for q in cert["quarantined"]] == [
        "samples/both",
        "evals/both",
        "stats/domain/private-ref",
    ]
    assert (root / f"experiments/{EXP}/evals/only1").is_dir()
    assert (root / "stats/domain/test-ref").is_dir()
    assert weights_sha(root, "shard-00") == reference(ids)
    start = cert["retrained"][0]["restarted_from"]
    assert start["kind"] == "scratch" and "slice 0" in start["reason"]
    # without retrain_router the router is refused until retrained
    with pytest.raises(StaleArtifactError, match="stage=router .*retrain=true"):
        store.load_router(EXP, backbone_hash=backbone_hash(root))
    assert cert["routers"][0]["action"].startswith("stale")


def test_stale_paragon_is_refused_until_retrained(root):
    store = ArtifactStore(root)
    ids = [manifest(root, "shard-01").slice_ids(2)[0]]
    store.checked_adapter(EXP, "paragon", backbone_hash=backbone_hash(root))
    cert = forget(root, ids_arg(ids))
    assert [s["artifact"] for s in cert["stale"]] == ["adapter paragon"]
    with pytest.raises(StaleArtifactError, match="stage=paragon .*retrain=true"):
        store.checked_adapter(EXP, "paragon", backbone_hash=backbone_hash(root))
    # its checkpoints from the first private slice holding the id on are gone
    assert sorted(p.name for p in store.checkpoint_dir(EXP, "paragon").glob("*.ckpt")) == [
        "slice-00.ckpt",
        "slice-01.ckpt",
    ]
    card = run_inprocess(*TINY, "stage=paragon", artifacts=root)  # stale: trained again
    assert card["manifest_hash"] == manifest(root, "private").hash
    store.checked_adapter(EXP, "paragon", backbone_hash=backbone_hash(root))


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("request_ids", "message"),
    [
        (["digits/train/999999"], "in no shard manifest"),
        ([], "empty forget request"),
        ("safe", "safe split .* public"),
        ("twice", "already forgotten"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(root, request_ids, message):
    if request_ids == "safe":
        request_ids = [manifest(root, "safe").ids[0], manifest(root, "shard-00").ids[0]]
    if request_ids == "twice":
        request_ids = [manifest(root, "shard-00").ids[-1]]
        forget(root, ids_arg(request_ids), "forget.retrain_router=false")
    before = snapshot(root)
    with pytest.raises(ForgetError, match=message):
        forget(root, ids_arg(request_ids))
    assert snapshot(root) == before
    assert not ArtifactStore(root).forget_pending_dir(EXP).exists()


def test_a_request_that_empties_a_shard_is_refused(root):
    ids = list(manifest(root, "shard-01").ids)
    with pytest.raises(ForgetError, match="every sample of shard-01.*whole source"):
        forget(root, ids_arg(ids))


# ------------------------------------------------------------------------------ failures


def test_killed_forget_changes_nothing_and_a_rerun_finishes_it(root, reference):
    """Killed mid-retrain: the old adapter, manifests and checkpoints are intact."""
    store = ArtifactStore(root)
    ids = [manifest(root, "shard-00").slice_ids(1)[0]]
    before = snapshot(root)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cdm.cli.forget", f"experiment={EXP}", ids_arg(ids), "kill_at_step=4",
           f"paths.artifacts={root}", f"hydra.run.dir={root}/hydra-run"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert "retraining shard-00" in proc.stdout
    assert snapshot(root) == before
    assert forgotten_ids(store, EXP) == [] and list_certificates(store, EXP) == []
    store.checked_adapter(EXP, "shard-00", backbone_hash=backbone_hash(root))  # still served
    cert = forget(root, ids_arg(ids))  # drops the unfinished retrain, does it again
    assert weights_sha(root, "shard-00") == reference(ids)
    assert cert["retrained"][0]["restarted_from"]["slice"] == 0


def test_crash_while_committing_is_rolled_forward(root, reference, monkeypatch):
    store = ArtifactStore(root)
    ids = [manifest(root, "shard-00").slice_ids(2)[1]]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(ArtifactStore, "install_adapter", crash)
        with pytest.raises(OSError, match="disk full"):
            forget(root, ids_arg(ids), "forget.retrain_router=false")
    assert read_forget_journal(store, EXP)["state"] == "committing"
    # the new manifest is in, so the old adapter (which saw the id) is no longer served ...
    with pytest.raises(StaleArtifactError):
        store.checked_adapter(EXP, "shard-00", backbone_hash=backbone_hash(root))
    # ... and training jobs refuse to run until the request is finished
    with pytest.raises(StoreError, match="cdm-forget experiment=digits_2split"):
        run_inprocess(*TINY, "stage=shard", "shard.index=1", artifacts=root)
    cert = forget(root)  # no ids: finish the interrupted request
    assert cert["request"]["samples"][0]["id"] == ids[0]
    assert weights_sha(root, "shard-00") == reference(ids)
    assert not store.forget_pending_dir(EXP).exists()


# ------------------------------------------------------------------------------ pure parts


def test_manifest_without_keeps_slices_and_drops_emptied_ones():
    ids = [f"d/train/{i:06d}" for i in range(7)]
    m = Manifest.build("shard-00", ids, ["h"] * 7, [(0, 3), (3, 4), (4, 7)], [1])
    out = m.without([ids[3], ids[5], "not/there"])
    assert out.ids == (ids[0], ids[1], ids[2], ids[4], ids[6])
    assert out.slices == ((0, 3), (3, 5))  # the one-id slice 1 is gone, slice 2 moved up
    assert out.meta["n_forgotten"] == 2 and out.classes == m.classes
    assert [m.slice_of(i) for i in ids] == [0, 0, 0, 1, 2, 2, 2]
    assert m.without(["not/there"]) is m
    with pytest.raises(ValueError, match="empty"):
        m.without(ids)


def test_schedule_cost_counts_each_slice_from_the_restart_on():
    # slices of 3, 2, 1 samples, 2 epochs per slice: actives 3, 5, 6
    assert schedule_cost([3, 2, 1], 2, 4) == {"samples_fed": 28, "optimizer_steps": 10}
    assert schedule_cost([3, 2, 1], 2, 4, start_slice=1) == {
        "samples_fed": 22,
        "optimizer_steps": 8,
    }


def test_forgotten_weights_differ_from_the_original(root):
    """Sanity: forgetting really changes the shard (the exactness test is not vacuous)."""
    before = weights_sha(root, "shard-00")
    forget(
        root, ids_arg([manifest(root, "shard-00").slice_ids(2)[0]]), "forget.retrain_router=false"
    )
    assert weights_sha(root, "shard-00") != before


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (REPO / "cdm/conf/experiment").glob("*.yaml"))
)
def test_forget_config_composes_for_every_experiment(experiment):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("forget", overrides=[f"experiment={experiment}", "forget.ids=[a/b/1]"])
    assert cfg.experiment_name == experiment and list(cfg.forget.ids) == ["a/b/1"]
    assert cfg.forget.retrain_router is True and cfg.forget.ids_file is None
