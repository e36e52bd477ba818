"""Shard isolation and SISA slice order of the training dataloader."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cdm.data.datamodule import ManifestDataModule, active_slices
from cdm.data.loaders import load_digits_dataset
from cdm.data.manifest import slice_indices
from cdm.data.sharding import make_split


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture(scope="module")
def split(digits):
    return make_split(
        digits, strategy="by_class", n_shards=4, seed=0, safe_fraction=0.3, n_slices=3
    )


class FakeTrainer:
    def __init__(self, epoch: int, rank: int = 0, world_size: int = 1, device: str = "cpu"):
        self.current_epoch, self.global_rank, self.world_size = epoch, rank, world_size
        self.strategy = SimpleNamespace(root_device=torch.device(device))


def test_active_slices_walks_the_slices_in_order():
    assert [active_slices(e, 2, 3) for e in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]


@pytest.mark.parametrize("world_size", [1, 2])
def test_dataloader_of_shard_k_never_yields_another_shards_id(digits, split, world_size):
    for k, manifest in enumerate(split.shards):
        own = set(manifest.ids)
        slices = slice_indices(digits, manifest)
        dm = ManifestDataModule(digits, slices, batch_size=32, epochs_per_slice=2, seed=0)
        seen_by_epoch = []
        for epoch in range(dm.max_epochs):
            seen = set()
            for rank in range(world_size):
                dm.trainer = FakeTrainer(epoch, rank, world_size)
                for batch in dm.train_dataloader():
                    ids = {digits.ids[i] for i in batch["index"].tolist()}
                    assert ids <= own, (
                        f"shard {k} yielded ids of another shard: {sorted(ids - own)[:3]}"
                    )
                    seen |= ids
            seen_by_epoch.append(seen)
        # slice s joins at epoch 2*s; every id of the active slices is seen each epoch
        first = {digits.ids[i] for i in slices[0]}
        assert seen_by_epoch[0] == first == seen_by_epoch[1]
        assert seen_by_epoch[-1] == own
        assert first < seen_by_epoch[2]


def test_order_depends_only_on_seed_and_epoch(digits, split):
    slices = slice_indices(digits, split.shards[0])
    dm = ManifestDataModule(digits, slices, batch_size=16, epochs_per_slice=1, seed=4)
    dm.trainer = FakeTrainer(2)
    a = list(dm.train_dataloader().sampler)
    b = list(dm.train_dataloader().sampler)
    dm.trainer = FakeTrainer(1)
    c = list(dm.train_dataloader().sampler)
    assert a == b and a != c


def test_empty_slice_is_refused(digits):
    with pytest.raises(ValueError, match="at least one sample"):
        ManifestDataModule(digits, [[1, 2], []], batch_size=4, epochs_per_slice=1, seed=0)


def test_removing_ids_keeps_the_others_order_in_every_epoch(digits, split):
    """The dataloader of a shard minus some ids feeds the others in the same relative order
    (what makes a from-scratch run on the ids left equal cdm-forget's retrain)."""
    manifest = split.shards[1]
    drop = set(manifest.ids[::7])
    smaller = manifest.without(drop)

    def fed(m, epoch):
        dm = ManifestDataModule(
            digits, slice_indices(digits, m), batch_size=16, epochs_per_slice=1, seed=3
        )
        dm.trainer = FakeTrainer(epoch)
        return [digits.ids[i] for i in dm.train_dataloader().sampler]

    for epoch in range(3):
        assert fed(smaller, epoch) == [sid for sid in fed(manifest, epoch) if sid not in drop]


def test_batches_are_pinned_for_a_gpu_only(digits, split):
    """A GPU run's loader pins its batches (their copy to the device then waits for nothing);
    a CPU run's does not."""
    dm = ManifestDataModule(digits, [[0, 1, 2]], batch_size=2, epochs_per_slice=1, seed=0)
    dm.trainer = FakeTrainer(0)
    assert dm.train_dataloader().pin_memory is False
    dm.trainer = FakeTrainer(0, device="cuda")
    assert dm.train_dataloader().pin_memory is True
