"""The router job: a classifier of the shard a noised sample x_t came from (paper Sec. 3.4).

Pairs (x_t, k) are made as the paper describes: x_0 from shard k, t ~ U{0..T-1}, x_t from the
backbone's own forward process q(x_t | x_0); the router is trained with cross-entropy, so at
convergence softmax f(x_t, t) = P(z = k | x_t) = w_k(x_t, t) of Prop. 3.1.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from cdm.core.diffusion import q_sample, sample_noise_and_timesteps, step_generator
from cdm.store import ArtifactStore
from cdm.training.callbacks import (
    ValidationStopping,
    checked_fed_hash,
    final_metrics,
    wandb_run_id,
)
from cdm.training.tracked import TrackedModule

SAMPLINGS = ("balanced", "by_prior")
_SAMPLER_TAG = 104_729  # a stream of (seed, epoch) orders distinct from the slice sampler's
_VAL_TAG = 1_299_709  # the validation noise stream


# --------------------------------------------------------------------------------------------
# data


def timestep_bands(num_train_timesteps: int, bands: int) -> list[tuple[int, int]]:
    """``bands`` contiguous [lo, hi) ranges covering [0, T)."""
    if not 1 <= bands <= num_train_timesteps:
        raise ValueError(f"router.bands must be in [1, {num_train_timesteps}], got {bands}")
    edges = [round(i * num_train_timesteps / bands) for i in range(bands + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def band_name(lo: int, hi: int, num_train_timesteps: int) -> str:
    """``t000-199`` for the band [0, 200) of T=1000."""
    width = max(3, len(str(num_train_timesteps - 1)))
    return f"t{lo:0{width}d}-{hi - 1:0{width}d}"


def train_log_prior(sizes: Sequence[int], sampling: str) -> list[float]:
    """log P(z = k) under the training sampler: uniform if balanced, shard sizes if by_prior."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"router.sampling must be one of {SAMPLINGS}, got {sampling!r}")
    n, total = len(sizes), float(sum(sizes))
    if sampling == "balanced":
        return [-float(torch.log(torch.tensor(float(n))))] * n
    return [float(torch.log(torch.tensor(s / total))) for s in sizes]


class ShardSampler(Sampler[int]):
    """Dataset indices of every shard's router-training samples, shuffled by (seed, epoch).

    ``by_prior``: each sample once per epoch, so shard k is drawn with probability |D_k| / N.
    ``balanced``: each shard contributes max_k |D_k| draws per epoch (its samples in fresh
    permutations, cycled), so every shard is equally likely and every sample is seen at least
    once per epoch. Ranks take disjoint strided parts, padded by wrapping around.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        *,
        sampling: str,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"router.sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("every shard needs at least one router-training sample")
        generator = torch.Generator().manual_seed(seed * 7_919 + epoch + _SAMPLER_TAG)
        if sampling == "by_prior":
            pool = [i for g in groups for i in g]
        else:
            m = max(len(g) for g in groups)
            pool = []
            for g in groups:
                drawn: list[int] = []
                while len(drawn) < m:
                    drawn += [g[j] for j in torch.randperm(len(g), generator=generator).tolist()]
                pool += drawn[:m]
        order = torch.randperm(len(pool), generator=generator).tolist()
        permuted = [pool[i] for i in order]
        per_rank = -(-len(permuted) // world_size)
        repeats = -(-per_rank * world_size // len(permuted))
        self.indices = (permuted * repeats)[: per_rank * world_size][rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ShardLabelled(Dataset):
    """``dataset[i]`` with ``label`` replaced by the shard index of sample i (the router's target)."""

    def __init__(self, dataset: Dataset, shard_of: dict[int, int]) -> None:
        self.dataset = dataset
        self.shard_of = dict(shard_of)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i not in self.shard_of:
            raise IndexError(f"dataset index {i} is not a router sample")
        item = dict(self.dataset[i])
        item["label"] = torch.tensor(self.shard_of[i], dtype=torch.long)
        return item


class RouterDataModule(pl.LightningDataModule):
    """Router training pairs (x_0, shard k) from the shards' samples; a fixed validation set.

    ``train_groups[k]`` are the dataset indices shard k contributes to training; ``val_items``
    are (dataset index, shard) pairs never trained on. The train loader is rebuilt every epoch
    (``reload_dataloaders_every_n_epochs=1``) with the (seed, epoch) order of ``ShardSampler``.
    """

    def __init__(
        self,
        dataset: Dataset,
        train_groups: Sequence[Sequence[int]],
        val_items: Sequence[tuple[int, int]],
        *,
        batch_size: int,
        sampling: str,
        seed: int,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.train_groups = [list(g) for g in train_groups]
        self.val_items = [(int(i), int(k)) for i, k in val_items]
        self.batch_size = batch_size
        self.sampling = sampling
        self.seed = seed
        train_of = {i: k for k, g in enumerate(self.train_groups) for i in g}
        overlap = set(train_of) & {i for i, _ in self.val_items}
        if overlap:
            raise ValueError(f"{len(overlap)} router validation samples are also training samples")
        self.train_set = ShardLabelled(dataset, train_of)
        self.val_set = ShardLabelled(dataset, dict(self.val_items))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ShardSampler(
            self.train_groups,
            sampling=self.sampling,
            seed=self.seed,
            epoch=trainer.current_epoch if trainer is not None else 0,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        mine = [i for i, _ in self.val_items][rank::world]
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=mine)


# --------------------------------------------------------------------------------------------
# the module


def fixed_validation_noise(
    indices: torch.Tensor,
    shape: Sequence[int],
    band: tuple[int, int],
    draw: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, t) per validation sample from a CPU generator seeded by (seed, index, band, draw).

    Independent of batching, ranks and device, so every validation epoch (and every run with the
    same seed) scores the router on the very same noised samples.
    """
    noises, steps = [], []
    for i in indices.tolist():
        g = torch.Generator().manual_seed(
            (seed * 1_000_003 + _VAL_TAG + int(i) * 8_191 + band[0] * 131 + draw) % (2**63 - 1)
        )
        steps.append(int(torch.randint(band[0], band[1], (1,), generator=g)))
        noises.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(noises), torch.tensor(steps, dtype=torch.long)


class RouterTraining(TrackedModule):
    """Trains a router f(x_t, t) with cross-entropy over shards (paper Sec. 3.4, Prop. 3.1).

    Noise and timesteps come from ``step_generator(seed, step, rank)`` as in ``DenoisingModule``
    (a resumed run continues bit for bit); x_t uses the backbone's ``alphas_cumprod``. Each
    validation epoch scores the router on fixed noised held-out samples in ``bands`` timestep
    bands: ``router/acc_t000-199``, ...; the last scores are kept in ``band_accuracy``.
    """

    loss_name = "router/loss"

    def __init__(
        self,
        router: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        *,
        dataset_size: int,
        lr: float,
        weight_decay: float = 0.0,
        bands: int = 5,
        val_draws: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset_size)
        self.router = router
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed
        self.val_draws = int(val_draws)
        T = int(alphas_cumprod.shape[0])
        self.bands = timestep_bands(T, int(bands))
        self.band_names = [band_name(lo, hi, T) for lo, hi in self.bands]
        self.band_accuracy: dict[str, float] = {}
        self._val: torch.Tensor | None = None  # [bands, 3]: correct, count, summed loss
        self.save_hyperparameters(ignore=["router", "alphas_cumprod"], logger=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.router(x_t, timesteps)

    def router_loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Cross-entropy of the shard label given x_t ~ q(x_t | x_0), t ~ U{0..T-1}."""
        x0 = batch["image"]
        generator = step_generator(self.seed, step, self.global_rank, x0.device)
        noise, timesteps = sample_noise_and_timesteps(x0, self.num_train_timesteps, generator)
        x_t = q_sample(x0, noise, timesteps, self.alphas_cumprod)
        return F.cross_entropy(self(x_t, timesteps).float(), batch["label"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.router_loss(batch, self.global_step)
        self.track_step(batch, loss)
        return loss

    # ---- validation: accuracy per timestep band on fixed noise ---------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(len(self.bands), 3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x0, labels = batch["image"], batch["label"]
        for b, band in enumerate(self.bands):
            for draw in range(self.val_draws):
                noise, t = fixed_validation_noise(
                    batch["index"], x0.shape[1:], band, draw, self.seed
                )
                noise, t = noise.to(x0.device, x0.dtype), t.to(x0.device)
                logits = self(q_sample(x0, noise, t, self.alphas_cumprod), t).float()
                loss = F.cross_entropy(logits, labels, reduction="sum")
                correct = (logits.argmax(dim=1) == labels).sum()
                self._val[b] += torch.stack(
                    [correct.double(), x0.new_tensor(len(labels)).double(), loss.double()]
                )

    def on_validation_epoch_end(self) -> None:
        totals = self._val
        if self.trainer is not None and self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        if float(totals[:, 1].sum()) == 0:
            return
        acc = (totals[:, 0] / totals[:, 1].clamp(min=1)).float()
        self.band_accuracy = {n: float(a) for n, a in zip(self.band_names, acc, strict=True)}
        for name, a in zip(self.band_names, acc, strict=True):
            self.log(f"router/acc_{name}", a)
        self.log("router/val_acc", (totals[:, 0].sum() / totals[:, 1].sum()).float(), prog_bar=True)
        self.log("router/val_loss", (totals[:, 2].sum() / totals[:, 1].sum()).float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.router.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params,
            lr=self.lr,
            weight_decay=self.weight_decay,
            fused=self.device.type == "cuda" or None,
        )


# --------------------------------------------------------------------------------------------
# writing the artifact


class RouterWriter(pl.Callback):
    """At the end of training, checks the ids fed and saves the router's own weights + card.

    The card's ``manifest_hash`` is the hash of the ids the router was actually fed (gathered
    over ranks); it must equal ``expected_hash`` (the union of the shards' router-training
    samples), else nothing is written. The backbone is never part of the saved weights.
    """

    def __init__(
        self,
        store_root: str,
        experiment: str,
        name: str,
        expected_hash: str,
        card: dict,
        router_config: dict,
        stopping: ValidationStopping | None = None,
    ) -> None:
        self.stopping = stopping  # its summary goes on the card
        self.store_root = store_root
        self.experiment = experiment
        self.name = name
        self.expected_hash = expected_hash
        self.card = card
        self.router_config = router_config

    def on_train_end(self, trainer: pl.Trainer, pl_module: RouterTraining) -> None:
        checked = checked_fed_hash(trainer, pl_module, self.expected_hash, f"router {self.name}")
        if checked is None:  # not rank zero
            return
        fed_hash, n_fed = checked
        card = dict(self.card)
        card.update(
            manifest_hash=fed_hash,
            n_samples_fed=n_fed,
            metrics={**final_metrics(trainer), "band_accuracy": dict(pl_module.band_accuracy)},
            optimizer_steps=trainer.global_step,
            convergence=None if self.stopping is None else self.stopping.summary(trainer),
            wall_time_s=round(pl_module.elapsed_s(), 3),
            world_size=trainer.world_size,
            wandb_run_id=wandb_run_id(trainer),
        )
        state = pl_module.router.state_dict()
        ArtifactStore(self.store_root).save_router(
            self.experiment, state, self.router_config, card, name=self.name
        )
