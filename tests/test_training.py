"""Shard training end to end through cdm-train: cards, determinism, kill/resume, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdm.core.hashing import hash_ids
from cdm.data.loaders import load_digits_dataset
from cdm.store import ArtifactStore, read_card

TINY = ["experiment=digits_4split", "debug=tiny"]


@pytest.fixture(scope="module")
def store_root(tiny_digits_backbone) -> Path:
    """A store holding a tiny safe backbone for digits (trained once for this module)."""
    return tiny_digits_backbone


def backbone_id(root: Path) -> str:
    """The id of the one backbone in the store (``digits-r8-tiny-safe0.3-seed0-<hash>``)."""
    (directory,) = (root / "backbones").iterdir()
    return directory.name


def adapter_weights(root: Path, experiment: str, job: str) -> dict[str, torch.Tensor]:
    return load_file(ArtifactStore(root).adapter_dir(experiment, job) / "adapter_model.safetensors")


def test_card_records_the_hash_of_the_ids_actually_fed(store_root, train):
    train(*TINY, "stage=shard", "shard.index=1", "experiment_name=cards", artifacts=store_root)
    store = ArtifactStore(store_root)
    card = read_card(store.adapter_dir("cards", "shard-01"))
    manifest = store.load_manifest("cards", "shard-01")
    assert card["manifest_hash"] == manifest["hash"]
    assert card["n_samples_fed"] == len(manifest["ids"])
    # the manifest hash is the hash of exactly those ids with their content hashes
    dataset = load_digits_dataset()
    index = dataset.id_to_index
    assert (
        hash_ids(manifest["ids"], [dataset.content_hashes[index[i]] for i in manifest["ids"]])
        == card["manifest_hash"]
    )
    backbone = read_card(store.backbone_dir(card["parents"][0]["name"]))
    assert card["backbone_hash"] == backbone["backbone_hash"]
    assert card["config"]["shard"]["index"] == 1 and card["code_version"]
    assert card["metrics"]["global_step"] > 0 and card["wall_time_s"] > 0
    # the adapter's own parameters moved away from their initialisation (lora_B starts at zero)
    weights = adapter_weights(store_root, "cards", "shard-01")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    # a slice checkpoint exists per SISA slice, for forgetting
    ckpts = sorted(p.name for p in store.checkpoint_dir("cards", "shard-01").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "slice-00.ckpt", "slice-01.ckpt"]


def test_seeded_runs_are_bit_identical_and_seed_matters(store_root, cli, train):
    # one run through the command line, one in this process: same bits
    cli(*TINY, "stage=shard", "shard.index=0", "experiment_name=det-a", artifacts=store_root)
    train(*TINY, "stage=shard", "shard.index=0", "experiment_name=det-b", artifacts=store_root)
    a = adapter_weights(store_root, "det-a", "shard-00")
    b = adapter_weights(store_root, "det-b", "shard-00")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(
        *TINY,
        "stage=shard",
        "shard.index=0",
        "experiment_name=det-c",
        "optim.lr=1e-3",
        artifacts=store_root,
    )
    c = adapter_weights(store_root, "det-c", "shard-00")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_killed_and_resumed_run_ends_bit_identical(store_root, cli, train):
    args = (*TINY, "stage=shard", "shard.index=2", "optim.epochs_per_slice=2")
    # the uninterrupted reference in this process (command line == in process: the test above)
    train(*args, "experiment_name=ref", artifacts=store_root)
    killed = cli(
        *args, "experiment_name=resumed", "kill_at_step=5", artifacts=store_root, check=False
    )
    assert killed.returncode == 17, killed.stderr[-2000:]
    store = ArtifactStore(store_root)
    assert not (store.adapter_dir("resumed", "shard-02") / "card.json").exists()
    assert (store.checkpoint_dir("resumed", "shard-02") / "last.ckpt").exists()
    resumed = cli(*args, "experiment_name=resumed", artifacts=store_root)
    assert "resuming shard-02" in resumed.stdout
    ref = adapter_weights(store_root, "ref", "shard-02")
    res = adapter_weights(store_root, "resumed", "shard-02")
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    assert (
        read_card(store.adapter_dir("resumed", "shard-02"))["manifest_hash"]
        == read_card(store.adapter_dir("ref", "shard-02"))["manifest_hash"]
    )


def test_resume_with_other_settings_is_refused(store_root, cli):
    args = (*TINY, "stage=shard", "shard.index=3", "experiment_name=changed")
    assert cli(*args, "kill_at_step=2", artifacts=store_root, check=False).returncode == 17
    assert (ArtifactStore(store_root).checkpoint_dir("changed", "shard-03") / "last.ckpt").exists()
    proc = cli(*args, "optim.lr=5e-4", artifacts=store_root, check=False)
    assert proc.returncode != 0
    assert "retrain=true" in proc.stderr


def test_existing_artifact_is_kept_unless_retrain(store_root, train, caplog):
    args = (*TINY, "stage=shard", "shard.index=0", "experiment_name=keep")
    train(*args, artifacts=store_root)
    path = ArtifactStore(store_root).adapter_dir("keep", "shard-00") / "card.json"

    # the card file itself (inode and mtime in ns), not its whole-second "created" stamp: a tiny
    # retrain can finish within the same second
    def written(p: Path) -> tuple[int, int]:
        return p.stat().st_ino, p.stat().st_mtime_ns

    before = written(path)
    caplog.set_level(logging.INFO, logger="cdm")
    train(*args, artifacts=store_root)
    assert "already trained" in caplog.text
    assert written(path) == before
    caplog.clear()
    train(*args, "retrain=true", artifacts=store_root)
    assert written(path) != before and "already trained" not in caplog.text


def test_paragon_trains_on_all_private_data(store_root, train):
    train(*TINY, "stage=paragon", "experiment_name=paragon", artifacts=store_root)
    store = ArtifactStore(store_root)
    card = read_card(store.adapter_dir("paragon", "paragon"))
    private = store.load_manifest("paragon", "private")
    shards = [store.load_manifest("paragon", f"shard-{k:02d}") for k in range(4)]
    assert card["manifest_hash"] == private["hash"]
    assert sorted(private["ids"]) == sorted(i for s in shards for i in s["ids"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage=shard", "shard.index=7"], "has shards [0, 1, 2, 3]"),
        (["stage=shard", "shard.index=0", "backbone.id=never-trained"], "stage=backbone"),
        (["stage=shard", "sharding.n_shards=20", "experiment_name=too-many"], "sharding=random"),
        (
            ["stage=backbone", "data=cifar10", "data.root=/nonexistent/cifar"],
            "cifar-10-batches-bin",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(store_root, train, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        train(*TINY, *overrides, artifacts=store_root)
    assert message in str(err.value)


def test_backbone_trained_on_another_safe_split_is_refused(store_root, train):
    # same backbone id, but a safe split drawn with another seed: it may have seen private data
    with pytest.raises(ValueError, match="may have seen private data"):
        train(*TINY, "stage=shard", "seed=5", f"backbone.id={backbone_id(store_root)}",
              "experiment_name=other-safe", artifacts=store_root)  # fmt: skip


def test_wandb_offline_run_is_grouped_and_recorded_on_the_card(store_root, train):
    card = train(
        *TINY,
        "stage=shard",
        "shard.index=3",
        "experiment_name=wb",
        "logger=wandb",
        artifacts=store_root,
    )
    run_id = card["wandb_run_id"]
    assert run_id
    runs = list((ArtifactStore(store_root).log_dir("wb") / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    assert card["config"]["logger"]["wandb"]["group"] == "wb"
    assert card["config"]["logger"]["wandb"]["job_type"] == "shard"


def test_full_finetune_shard_saves_a_whole_unet(store_root, train):
    from diffusers import UNet2DModel

    card = train(
        *TINY,
        "stage=shard",
        "shard.index=1",
        "experiment_name=full",
        "adapter=full",
        artifacts=store_root,
    )
    store = ArtifactStore(store_root)
    assert card["adapter_kind"] == "full"
    model = UNet2DModel.from_pretrained(
        store.adapter_dir("full", "shard-01"), local_files_only=True
    )
    backbone, _ = store.load_backbone(card["parents"][0]["name"])
    changed = [
        k for k, v in model.state_dict().items() if not torch.equal(v, backbone.state_dict()[k])
    ]
    assert changed  # every weight is the shard's own


def test_ema_weights_are_what_gets_saved(store_root, train):
    train(*TINY, "stage=shard", "shard.index=0", "experiment_name=no-ema", artifacts=store_root)
    train(
        *TINY,
        "stage=shard",
        "shard.index=0",
        "experiment_name=ema",
        "optim.ema_decay=0.5",
        artifacts=store_root,
    )
    plain = adapter_weights(store_root, "no-ema", "shard-00")
    ema = adapter_weights(store_root, "ema", "shard-00")
    assert not all(torch.equal(plain[k], ema[k]) for k in plain)


def test_unconditional_backbone_has_no_class_embedding(tmp_path, train):
    card = train(*TINY, "stage=backbone", "data.conditional=false", artifacts=tmp_path)
    unet, _ = ArtifactStore(tmp_path).load_backbone(card["name"])
    assert unet.config.num_class_embeds is None and unet.class_embedding is None


def test_shard_refuses_a_backbone_of_the_other_conditioning(tmp_path, train):
    card = train(*TINY, "stage=backbone", "data.conditional=false", artifacts=tmp_path)
    # the conditioning is part of the backbone's id: a conditional shard looks for another one
    with pytest.raises(ValueError, match="stage=backbone"):
        train(*TINY, "stage=shard", "data.conditional=true", artifacts=tmp_path)
    # and one pinned to the unconditional backbone is refused for its class embedding
    with pytest.raises(ValueError, match="num_class_embeds"):
        train(*TINY, "stage=shard", "data.conditional=true", f"backbone.id={card['name']}",
              artifacts=tmp_path)  # fmt: skip


def test_killed_and_resumed_run_with_ema_ends_bit_identical(store_root, cli, train):
    args = (
        *TINY,
        "stage=shard",
        "shard.index=1",
        "optim.epochs_per_slice=2",
        "optim.ema_decay=0.9",
    )
    train(*args, "experiment_name=ema-ref", artifacts=store_root)  # reference: in process
    killed = cli(
        *args, "experiment_name=ema-resumed", "kill_at_step=5", artifacts=store_root, check=False
    )
    assert killed.returncode == 17, killed.stderr[-2000:]
    store = ArtifactStore(store_root)
    ckpt = torch.load(
        store.checkpoint_dir("ema-resumed", "shard-01") / "last.ckpt", weights_only=False
    )
    ema = ckpt["cdm"]["ema"]
    # the average is in the checkpoint, and only over the adapter's own tensors (lean for LoRA)
    assert ema["optimization_step"] > 0 and ema["decay"] == 0.9
    assert ema["names"] and all("lora_" in n for n in ema["names"])
    assert len(ema["shadow_params"]) == len(ema["names"]) < len(ckpt["state_dict"])
    resumed = cli(*args, "experiment_name=ema-resumed", artifacts=store_root)
    assert "resuming shard-01" in resumed.stdout
    ref = adapter_weights(store_root, "ema-ref", "shard-01")
    res = adapter_weights(store_root, "ema-resumed", "shard-01")
    assert ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref)


def test_shard_checkpoint_loads_with_load_from_checkpoint(store_root, train):
    from cdm.models.backbone import build_scheduler
    from cdm.training.jobs import ShardTraining

    card = train(*TINY, "stage=shard", "shard.index=2", "experiment_name=hparams", artifacts=store_root)  # fmt: skip
    store = ArtifactStore(store_root)
    path = store.checkpoint_dir("hparams", "shard-02") / "slice-00.ckpt"
    saved = torch.load(path, weights_only=False)
    assert not {"model", "unet", "alphas_cumprod"} & set(saved["hyper_parameters"])
    backbone, _ = store.load_backbone(card["parents"][0]["name"])
    scheduler = build_scheduler(card["config"]["backbone"]["scheduler"])
    rng = torch.get_rng_state()
    module = ShardTraining.load_from_checkpoint(
        path, unet=backbone, alphas_cumprod=scheduler.alphas_cumprod
    )
    torch.set_rng_state(rng)
    assert module.hparams.lr == card["config"]["optim"]["lr"]
    assert module.hparams.adapter_cfg == card["config"]["adapter"]
    assert module.hparams.dataset_size == len(module.fed_mask)
    weights = module.state_dict()
    assert weights.keys() == saved["state_dict"].keys()
    assert all(torch.equal(weights[k], v) for k, v in saved["state_dict"].items())
    # the slice checkpoint's adapter already moved away from its initialisation
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_cdm_list_is_a_hydra_command(store_root):
    import subprocess
    import sys

    from cdm.store import format_table
    from tests.conftest import REPO

    def cdm_list(*overrides: str) -> str:
        cmd = [sys.executable, "-m", "cdm.cli.list_artifacts", *overrides,
               f"paths.artifacts={store_root}"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    cards = ArtifactStore(store_root).list_artifacts("digits_4split")
    assert cards
    assert cdm_list("experiment=digits_4split") == format_table(cards) + "\n"
    listed = json.loads(cdm_list("experiment=digits_4split", "list.json=true"))
    assert listed == json.loads(json.dumps(cards))
    everything = json.loads(cdm_list("list.json=true"))
    assert len(everything) >= len(cards)
    with_cards = cdm_list("list.cards=true")  # the shared backbone is outside any experiment
    assert with_cards.startswith(format_table(ArtifactStore(store_root).list_artifacts()))
    assert "\n== backbone " in with_cards
