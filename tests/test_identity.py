"""One identity per job (cdm.core.identity): what it covers, backbone ids, and the refusals."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cdm.core.identity import (
    JobIdentity,
    differing_keys,
    file_digest,
    job_identity,
    path_digest,
)
from cdm.store import ArtifactStore, StoreError, read_card

TINY = ["experiment=digits_4split", "debug=tiny"]


def compose_config(*overrides: str, config: str = "train"):
    from hydra import compose, initialize_config_dir

    from cdm.jobs.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))


def identity(*overrides: str, stage: str = "shard", config: str = "train"):
    chosen = [] if stage in ("sample", "evaluate") else [f"stage={stage}"]
    cfg = compose_config(*overrides, *chosen, config=config)
    return job_identity(OmegaConf.to_container(cfg, resolve=True), stage)


# ---------------------------------------------------------------- what an identity covers


def test_identity_is_stable_across_composes_and_ignores_inert_keys():
    first, again = identity(*TINY), identity(*TINY)
    assert first == again  # the csv logger's version holds ${now:...}: left out
    assert first.hash == identity(*TINY, "logger=none", "paths.artifacts=/elsewhere").hash
    inert = ("trainer.enable_progress_bar=true", "resume=false", "kill_at_step=3",
             "experiment_name=other", "trainer.log_every_n_steps=7")  # fmt: skip
    assert first.hash == identity(*TINY, *inert).hash
    # the same job composed by another entry point (cdm-table1 trains through its config)
    assert first.hash == identity(*TINY, config="table1").hash
    assert first.hash == identity(*TINY, config="eval").hash


@pytest.mark.parametrize(
    ("override", "keys"),
    [
        ("trainer=ddp_cpu", ["trainer.devices", "trainer.strategy"]),
        ("trainer.devices=2", ["trainer.devices"]),
        ("trainer.precision=64-true", ["trainer.precision"]),
        ("deterministic=false", ["deterministic", "trainer.deterministic"]),
        (
            "backbone.scheduler.beta_schedule=linear",
            ["backbone.id", "backbone.scheduler.beta_schedule"],
        ),
        ("backbone.unet.layers_per_block=2", ["backbone.id", "backbone.unet.layers_per_block"]),
        ("optim.lr=1e-3", ["optim.lr"]),
        ("adapter.rank=4", ["adapter.rank"]),
        ("threads=2", ["threads"]),
        ("seed=1", ["backbone.id", "seed"]),
        ("sharding.n_slices=3", ["sharding.n_slices"]),
    ],
)
def test_each_result_changing_setting_changes_the_identity_and_is_named(override, keys):
    base, other = identity(*TINY), identity(*TINY, override)
    assert base.hash != other.hash
    assert base.differences(other.sections) == keys


def test_a_new_setting_is_part_of_every_identity_by_default():
    for stage in ("backbone", "shard", "router", "feature_net"):
        base = identity(*TINY, stage=stage)
        assert base.hash != identity(*TINY, "+brand_new_setting=1", stage=stage).hash


def test_stages_see_only_their_own_settings():
    shard = identity(*TINY)
    # a shard sees the backbone's training through the backbone's id only
    assert shard.differences(identity(*TINY, "pretrain.lr=1e-5").sections) == ["backbone.id"]
    assert (
        identity(*TINY, stage="backbone").hash
        != identity(*TINY, "pretrain.lr=1e-5", stage="backbone").hash
    )
    # the backbone sees the safe split only: one backbone serves every experiment on it
    assert (
        identity("experiment=digits_2split", "debug=tiny", stage="backbone").hash
        == identity(*TINY, stage="backbone").hash
    )
    assert (
        identity(*TINY, "sharding.safe_fraction=0.5", stage="backbone").hash
        != identity(*TINY, stage="backbone").hash
    )
    # the label-dropout probability trains the backbone too (classifier-free guidance)
    assert (
        identity(*TINY, "optim.cond_drop_prob=0.2", stage="backbone").hash
        != identity(*TINY, stage="backbone").hash
    )
    # a shard's identity does not depend on sampling settings, sampling's on the trainer
    sample = identity(*TINY, config="sample", stage="sample")
    assert (
        sample.hash
        == identity(*TINY, "trainer.precision=64-true", config="sample", stage="sample").hash
    )
    assert sample.hash != identity(*TINY, "steps=3", config="sample", stage="sample").hash
    assert sample.hash != identity(*TINY, "backbone.scheduler.beta_schedule=linear", config="sample", stage="sample").hash  # fmt: skip


def test_differing_keys_walks_nested_sections():
    assert differing_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 0}}) == [
        "a.c",
        "a.d",
    ]
    assert differing_keys({"a": [1, 2]}, {"a": [1, 2]}) == []


# ---------------------------------------------------------------- backbone ids and user files


def write_npz(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(40) % 4)
    return path


def test_backbone_ids_carry_the_short_hash_of_the_backbone_job():
    cfg = compose_config(*TINY)
    assert re.fullmatch(r"digits-r8-tiny-safe0\.3-seed0-[0-9a-f]{8}", cfg.backbone.id)
    assert cfg.backbone.id.endswith(identity(*TINY, stage="backbone").content_short())
    # how a job runs is not what the backbone is: a shard on 2 processes uses the same backbone
    assert compose_config(*TINY, "trainer=ddp_cpu").backbone.id == cfg.backbone.id
    other = compose_config(*TINY, "backbone.unet.layers_per_block=2").backbone.id
    assert other != cfg.backbone.id and other.startswith("digits-r8-tiny-safe0.3-seed0-")
    # experiments that pin an id keep it
    assert (
        compose_config("experiment=digits_4split_uncond").backbone.id
        == "digits-r8-small-uncond-safe0.3-seed0"
    )
    assert (
        compose_config("experiment=digits_4split_private").backbone.id
        == "digits-r8-small-safeclasses01-seed0"
    )


def test_two_npz_datasets_never_share_a_backbone_or_an_identity(tmp_path):
    a, b = write_npz(tmp_path / "a.npz", 0), write_npz(tmp_path / "b.npz", 1)
    common = [
        "data=npz",
        "data.resolution=8",
        "data.channels=1",
        "data.num_classes=4",
        "backbone=tiny",
    ]
    cfg_a = compose_config(*common, f"data.root={a}")
    cfg_b = compose_config(*common, f"data.root={b}")
    assert cfg_a.backbone.id.startswith("npz-r8-tiny-safe0.3-seed0-")
    assert cfg_a.backbone.id != cfg_b.backbone.id
    ia = identity(*common, f"data.root={a}")
    ib = identity(*common, f"data.root={b}")
    assert ia.hash != ib.hash and "data.root.sha256" in ia.differences(ib.sections)
    # the same bytes in another folder are the same data ...
    (tmp_path / "elsewhere").mkdir()
    shutil.copyfile(a, tmp_path / "elsewhere" / "a.npz")
    assert identity(*common, f"data.root={tmp_path / 'elsewhere' / 'a.npz'}").hash == ia.hash
    # ... but under another file name they are another dataset: its sample ids follow the name
    shutil.copyfile(a, tmp_path / "copy.npz")
    renamed = identity(*common, f"data.root={tmp_path / 'copy.npz'}")
    assert renamed.hash != ia.hash and "data.root.name" in renamed.differences(ia.sections)
    assert (
        compose_config(*common, f"data.root={tmp_path / 'copy.npz'}").backbone.id
        != cfg_a.backbone.id
    )


def test_user_files_are_hashed_by_content_once(tmp_path):
    path = write_npz(tmp_path / "x.npz", 0)
    first = file_digest(path)
    assert file_digest(path) == first and path_digest(str(path)) == {
        "sha256": first,
        "name": "x.npz",
    }
    write_npz(path, 1)  # new content, new mtime: hashed again
    assert file_digest(path) != first
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "0.png").write_bytes(b"one")
    before = path_digest(str(folder))
    (folder / "cat" / "1.png").write_bytes(b"two")
    assert path_digest(str(folder)) != before
    assert path_digest(str(tmp_path / "nowhere")) == {"missing": str(tmp_path / "nowhere")}


# ---------------------------------------------------------------- refusals (tiny jobs in process)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    """A store with a tiny backbone and shard 0 of experiment ``ident`` (trained once)."""
    from tests.conftest import run_inprocess

    root = tmp_path_factory.mktemp("artifacts")
    run_inprocess(*TINY, "stage=backbone", artifacts=root)
    run_inprocess(*TINY, "stage=shard", "shard.index=0", "experiment_name=ident", artifacts=root)
    return root


def trained_backbone_id(root: Path) -> str:
    (directory,) = (root / "backbones").iterdir()
    return directory.name


SHARD = (*TINY, "stage=shard", "shard.index=0", "experiment_name=ident")


def test_identical_rerun_reuses_and_the_card_records_the_identity(store_root, train):
    stored = read_card(ArtifactStore(store_root).adapter_dir("ident", "shard-00"))
    card = train(*SHARD, artifacts=store_root)
    assert card["created"] == stored["created"]  # reused, not trained again
    assert card["signature"] == identity(*SHARD).hash
    assert card["identity"]["trainer"]["devices"] == 1
    backbone = read_card(ArtifactStore(store_root).backbone_dir(trained_backbone_id(store_root)))
    recorded = JobIdentity("backbone", backbone["identity"], backbone["signature"])
    assert backbone["name"].endswith("-" + recorded.content_short())


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer=ddp_cpu", "trainer.devices: 1 -> 2"),
        ("trainer.precision=64-true", "trainer.precision"),
        ("deterministic=false", "deterministic: true -> false"),
    ],
)
def test_reusing_a_shard_trained_with_other_settings_is_refused(store_root, train, override, named):
    with pytest.raises(StoreError, match="retrain=true") as err:
        train(*SHARD, override, artifacts=store_root)
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer=ddp_cpu", "trainer.devices: 1 -> 2"),
        ("trainer.precision=64-true", "trainer.precision"),
        ("deterministic=false", "deterministic: true -> false"),
    ],
)
def test_resuming_under_other_settings_is_refused(store_root, train, tmp_path, override, named):
    # a killed job: its checkpoints are there, its adapter is not
    experiment = "resumed"
    root = tmp_path / "artifacts"
    shutil.copytree(store_root, root)
    store = ArtifactStore(root)
    shutil.copytree(
        store.checkpoint_dir("ident", "shard-00"), store.checkpoint_dir(experiment, "shard-00")
    )
    args = (*TINY, "stage=shard", "shard.index=0", f"experiment_name={experiment}")
    with pytest.raises(StoreError, match="start over with retrain=true") as err:
        train(*args, override, artifacts=root)
    assert named in str(err.value) and "checkpoint" in str(err.value)
    assert not (store.adapter_dir(experiment, "shard-00") / "card.json").exists()


@pytest.mark.parametrize("stage", ["shard", "router"])
def test_a_job_on_a_backbone_of_another_schedule_is_refused(store_root, train, stage):
    pinned = f"backbone.id={trained_backbone_id(store_root)}"
    with pytest.raises(StoreError, match="noise schedule") as err:
        train(*TINY, f"stage={stage}", "experiment_name=sched", pinned,
              "backbone.scheduler.beta_schedule=linear", artifacts=store_root)  # fmt: skip
    assert "scheduler.beta_schedule" in str(err.value)


def test_a_sampler_on_a_backbone_of_another_schedule_is_refused(store_root):
    from tests.conftest import run_inprocess

    pinned = f"backbone.id={trained_backbone_id(store_root)}"
    with pytest.raises(StoreError, match="noise schedule"):
        run_inprocess(*TINY, "experiment_name=ident", "composition=average", "num_samples=2",
                      "steps=2", pinned, "backbone.scheduler.beta_schedule=linear",
                      artifacts=store_root, config="sample")  # fmt: skip


def test_another_architecture_under_a_pinned_backbone_id_is_refused(store_root, train):
    pinned = f"backbone.id={trained_backbone_id(store_root)}"
    with pytest.raises(StoreError, match="backbone.unet.layers_per_block: 1 -> 2"):
        train(
            *TINY,
            "stage=backbone",
            pinned,
            "backbone.unet.layers_per_block=2",
            artifacts=store_root,
        )
    with pytest.raises(StoreError, match="architecture"):
        train(*TINY, "stage=shard", "experiment_name=arch", pinned,
              "backbone.unet.layers_per_block=2", artifacts=store_root)  # fmt: skip
