"""Forgetting at the SISA limit: the cost model of a forget request (steps as the cards ran them,
the ideal ratio of ``benchmarks/forget_cost.py``) and a stale paragon restarted from its own last
clean slice checkpoint, bit-identical to one trained from scratch on the data left."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdm.data.manifest import Manifest
from cdm.lifecycle.downstream import JobSchedule, expected_forget_cost, schedule_cost
from cdm.store import ArtifactStore, load_checkpoint, read_card, sha256_file
from cdm.store.records import add_forgotten_ids
from tests.conftest import run_inprocess
from tests.test_forgetting import forget

EXP = "digits_2split"
# the stopping rule runs 24 steps in all, well past one epoch once the last slice joined
RULE = ["optim.convergence.min_steps=24", "optim.convergence.max_steps=24"]
TINY = [f"experiment={EXP}", "debug=tiny", "sharding.n_slices=3", *RULE]


def test_final_steps_replace_the_last_slices_fixed_epochs():
    # slices [3, 2, 1], 2 epochs per slice, batch 4: 2*1 + 2*2 steps before the last slice joins
    assert schedule_cost([3, 2, 1], 2, 4, final_steps=7) == {
        "samples_fed": 2 * 3 + 2 * 5 + round(7 * 6 / 2),
        "optimizer_steps": 2 + 4 + 7,
    }
    # two ranks: each steps over its half (ceil) of the active slices
    assert schedule_cost([8, 8], 1, 2, world_size=2)["optimizer_steps"] == 2 + 4


def test_schedule_from_a_card_reads_the_steps_it_ran():
    m = SimpleNamespace(slices=[(0, 3), (3, 5), (5, 6)])  # a manifest's slice bounds
    card = {"config": {"optim": {"epochs_per_slice": 2, "batch_size": 4}}, "optimizer_steps": 13}
    schedule = JobSchedule.from_card(card, m)
    assert schedule.final_steps == 13 - (2 + 4)
    assert schedule.cost()["optimizer_steps"] == 13
    assert schedule.cost(start_slice=2)["optimizer_steps"] == 7


def test_a_heads_schedule_is_read_from_its_router_settings():
    # a compartmental head trains on router.epochs_per_slice / router.batch_size, not optim's
    m = SimpleNamespace(slices=[(0, 3), (3, 5), (5, 6)])
    config = {"optim": {"epochs_per_slice": 8, "batch_size": 32},
              "router": {"epochs_per_slice": 2, "batch_size": 4}}  # fmt: skip
    head = JobSchedule.from_card({"kind": "head", "config": config, "optimizer_steps": 13}, m)
    assert (head.epochs_per_slice, head.batch_size, head.final_steps) == (2, 4, 13 - (2 + 4))
    assert head.cost(start_slice=1)["optimizer_steps"] == 13 - 2
    adapter = JobSchedule.from_card({"kind": "shard", "config": config}, m)
    assert (adapter.epochs_per_slice, adapter.batch_size) == (8, 32)


def test_expected_forget_cost_is_the_mean_over_a_uniform_sample():
    # two equal one-slice shards that ran 10 steps each, a paragon that ran 30: every forget
    # retrains one shard (10 steps), so the ideal ratio is 3
    shard = JobSchedule((8,), 1, 4, final_steps=10)
    out = expected_forget_cost([shard, shard], JobSchedule((16,), 1, 4, final_steps=30))
    assert out["mean_forget"]["optimizer_steps"] == 10
    assert out["ratio_steps"] == 3.0
    # two slices of 4: half the samples restart after slice 0 and skip its 1 step
    sliced = JobSchedule((4, 4), 1, 4, final_steps=10)
    out = expected_forget_cost([sliced], JobSchedule((4, 4), 1, 4, final_steps=10))
    assert out["mean_forget"]["optimizer_steps"] == pytest.approx(0.5 * 11 + 0.5 * 10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits_2split, 3 slices: the backbone, shard 0 and the paragon."""
    root = tmp_path_factory.mktemp("limit")
    for stage in ("backbone", "shard", "paragon"):
        run_inprocess(*TINY, f"stage={stage}", artifacts=root)
    return root


def paragon_sha(root: Path) -> str:
    return sha256_file(
        ArtifactStore(root).adapter_dir(EXP, "paragon") / "adapter_model.safetensors"
    )


def test_stale_paragon_restarts_from_its_last_clean_slice(trained, tmp_path):
    root = Path(shutil.copytree(trained, tmp_path / "artifacts"))
    store = ArtifactStore(root)
    private = Manifest.from_json(store.load_manifest(EXP, "private"))
    shard0 = set(Manifest.from_json(store.load_manifest(EXP, "shard-00")).ids)
    (sid,) = [i for i in private.slice_ids(2) if i in shard0][:1]  # private slice 2: keep 0, 1

    forget(root, f"forget.ids=[{sid}]", "forget.retrain_router=false")
    run_inprocess(*TINY, "stage=paragon", artifacts=root)  # stale: trains again

    card = read_card(store.adapter_dir(EXP, "paragon"))
    assert card["restarted_from"]["kind"] == "slice_checkpoint"
    assert card["restarted_from"]["slice"] == 1
    fresh = tmp_path / "fresh"
    shutil.copytree(trained / "backbones", fresh / "backbones")
    add_forgotten_ids(ArtifactStore(fresh), EXP, [sid], "reference")
    run_inprocess(*TINY, "stage=paragon", artifacts=fresh)
    assert "restarted_from" not in read_card(ArtifactStore(fresh).adapter_dir(EXP, "paragon"))
    assert paragon_sha(root) == paragon_sha(fresh)


def test_forget_cost_counts_the_steps_the_retrain_ran(trained, tmp_path):
    root = Path(shutil.copytree(trained, tmp_path / "artifacts"))
    store = ArtifactStore(root)
    shard0 = Manifest.from_json(store.load_manifest(EXP, "shard-00"))
    restart = load_checkpoint(store.slice_checkpoint_path(EXP, "shard-00", 0))["global_step"]

    cert = forget(root, f"forget.ids=[{shard0.slice_ids(1)[0]}]", "forget.retrain_router=false")

    new_card = read_card(store.adapter_dir(EXP, "shard-00"))
    (retrained,) = cert["retrained"]
    # the convergence rule ran more than one epoch after the last slice joined: counted
    assert retrained["cost"]["optimizer_steps"] == new_card["optimizer_steps"] - restart
    assert retrained["cost_from_scratch"]["optimizer_steps"] == new_card["optimizer_steps"] == 24
    ideal = cert["cost"]["ideal_random_sample"]
    assert ideal is None  # shard 1 is untrained: no ideal without every shard's card


class _Strategy:
    def barrier(self, name: str) -> None:
        pass

    def broadcast(self, obj, src: int = 0):
        return obj


class _Trainer:
    """What SliceCheckpoint reads of a Trainer; records the checkpoints it writes."""

    sanity_checking, is_global_zero, strategy = False, True, _Strategy()

    def __init__(self) -> None:
        self.current_epoch, self.saved = 0, []

    def save_checkpoint(self, path, weights_only: bool = False) -> None:
        Path(path).write_text(f"state after epoch {self.current_epoch}")
        self.saved.append((self.current_epoch, Path(path).name.split(".tmp")[0].lstrip(".")))


def test_last_checkpoint_is_not_rewritten_every_short_epoch(tmp_path):
    from cdm.training.callbacks import SliceCheckpoint

    callback = SliceCheckpoint(tmp_path, epochs_per_slice=3, n_slices=2, last_every_s=3600)
    trainer = _Trainer()
    for epoch in range(9):  # 2 slices of 3 epochs, then 3 epochs of the stopping rule
        trainer.current_epoch = epoch
        callback.on_train_epoch_end(trainer, None)
    assert trainer.saved == [
        (0, "last.ckpt"),  # the first epoch: a kill can always resume
        (2, "slice-00.ckpt"),  # and last.ckpt as a byte copy of it (one serialization)
        (5, "slice-01.ckpt"),
    ]  # fmt: skip
    assert (tmp_path / "last.ckpt").read_bytes() == (tmp_path / "slice-01.ckpt").read_bytes()
    assert (tmp_path / "slice-00.ckpt").read_text() == "state after epoch 2"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    every = SliceCheckpoint(tmp_path / "every", epochs_per_slice=3, n_slices=2)  # every epoch
    trainer = _Trainer()
    for epoch in range(4):
        trainer.current_epoch = epoch
        every.on_train_epoch_end(trainer, None)
        assert (tmp_path / "every/last.ckpt").read_text() == f"state after epoch {epoch}"
    assert [name for _, name in trainer.saved].count("last.ckpt") == 3  # epoch 2: the copy
