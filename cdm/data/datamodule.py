"""Lightning data for one training job: the ids of one manifest, walked slice by slice (SISA)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cdm.data.sharding import epoch_order


def active_slices(epoch: int, epochs_per_slice: int, n_slices: int) -> int:
    """How many slices are in play at ``epoch``: slice s is first seen at epoch s * epochs_per_slice."""
    return min(epoch // epochs_per_slice + 1, n_slices)


class SliceSampler(Sampler[int]):
    """Dataset indices of the active slices in epoch ``epoch``'s order, this rank's part only.

    The order is ``epoch_order`` of the samples' ids: each id's place is a hash of (seed, epoch,
    id) alone, so a resumed run sees the same order and removing ids (``cdm-forget``) keeps the
    relative order of every other id, as training from scratch on the ids left does.
    Ranks take disjoint strided parts of the order; it is padded by wrapping around so that
    every rank runs the same number of steps (padding repeats ids of the same shard only).
    """

    def __init__(
        self,
        indices: Sequence[int],
        *,
        ids: Sequence[str],
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(ids) != len(indices):
            raise ValueError(f"SliceSampler: {len(indices)} indices but {len(ids)} ids")
        permuted = [indices[i] for i in epoch_order(ids, seed, epoch)]
        per_rank = -(-len(permuted) // world_size)
        repeats = -(-per_rank * world_size // max(len(permuted), 1))
        self.indices = (permuted * repeats)[: per_rank * world_size][rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ManifestDataModule(pl.LightningDataModule):
    """Feeds one job exactly the samples of its manifest, slice by slice.

    ``slices`` are lists of dataset indices in the order they are first seen; the dataloader is
    rebuilt every epoch (``reload_dataloaders_every_n_epochs=1``) so a new slice joins at its
    boundary. Nothing outside ``slices`` can ever be yielded: this is the shard isolation.
    ``dataset.ids`` (the sample ids) set each epoch's order (``SliceSampler``).
    """

    def __init__(
        self,
        dataset: Dataset,
        slices: Sequence[Sequence[int]],
        *,
        batch_size: int,
        epochs_per_slice: int,
        seed: int,
    ) -> None:
        super().__init__()
        if not slices or any(len(s) == 0 for s in slices):
            raise ValueError("every slice of a training manifest must hold at least one sample")
        self.dataset = dataset
        self.slices = [list(s) for s in slices]
        self.batch_size = batch_size
        self.epochs_per_slice = epochs_per_slice
        self.seed = seed

    @property
    def max_epochs(self) -> int:
        """Epochs needed to walk every slice for ``epochs_per_slice`` epochs."""
        return self.epochs_per_slice * len(self.slices)

    def slice_boundary(self, epoch: int) -> int | None:
        """The slice whose training ends with ``epoch``, or None mid-slice."""
        if (epoch + 1) % self.epochs_per_slice == 0:
            return (epoch + 1) // self.epochs_per_slice - 1
        return None

    def indices_for_epoch(self, epoch: int) -> list[int]:
        """Dataset indices of every slice in play at ``epoch``, in first-seen order."""
        n = active_slices(epoch, self.epochs_per_slice, len(self.slices))
        return [i for s in self.slices[:n] for i in s]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        indices = self.indices_for_epoch(epoch)
        sampler = SliceSampler(
            indices,
            ids=[self.dataset.ids[i] for i in indices],
            seed=self.seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
        )
        # pinned on a GPU: the batch's copy then waits for nothing, where a pageable one waits
        # for the GPU's queue to drain each step (docs/benchmarks.md, goal 3)
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=0, pin_memory=pin
        )


class JobDataset(Dataset):
    """A dataset as a text or latent-space job feeds it (docs/text.md): sample i's ``label`` is
    ``rows[i]`` (the row of its caption in the job's context table) and its ``image`` is
    ``latents[i]`` (the codec's encoding, made once per job). Every other attribute (ids,
    content hashes, labels, splits, scores) is the wrapped dataset's."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        rows: Mapping[int, int] | None = None,
        latents: Mapping[int, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.dataset = dataset
        self.rows = rows
        self.latents = latents

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        if self.rows is not None:
            item["label"] = torch.tensor(self.rows[int(i)], dtype=torch.long)
        if self.latents is not None:
            item["image"] = self.latents[int(i)]
        return item

    def __getattr__(self, name: str):
        if name in ("dataset", "rows", "latents") or name.startswith("__"):
            raise AttributeError(name)  # not set yet (unpickling): no recursion
        return getattr(self.dataset, name)
