"""The feature-net job: a classifier of the dataset's own classes, trained on its whole train split.

Cross-entropy on every train sample (labels = the dataset's class labels), accuracy on the test
split after every epoch. The data order comes from ``SliceSampler`` (seed, epoch) and nothing else
is random, so a run is bit-reproducible for a seed (at a fixed thread count) and resumes bit for
bit from ``last.ckpt``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, SumMetric

from cdm.data.datamodule import ManifestDataModule
from cdm.models.feature_net import FeatureNet
from cdm.store import ArtifactStore
from cdm.store.feature_nets import save_feature_net
from cdm.training.callbacks import (
    ValidationStopping,
    checked_fed_hash,
    final_metrics,
    wandb_run_id,
)
from cdm.training.tracked import TrackedModule


class FeatureNetDataModule(ManifestDataModule):
    """All train samples as one slice (shuffled by (seed, epoch)); the test split validates."""

    def __init__(
        self,
        dataset: Dataset,
        train_indices: Sequence[int],
        test_indices: Sequence[int],
        *,
        batch_size: int,
        epochs: int,
        seed: int,
    ) -> None:
        super().__init__(
            dataset,
            [list(train_indices)],
            batch_size=batch_size,
            epochs_per_slice=epochs,
            seed=seed,
        )
        self.test_indices = [int(i) for i in test_indices]
        overlap = set(self.slices[0]) & set(self.test_indices)
        if overlap:
            raise ValueError(f"{len(overlap)} feature-net test samples are also training samples")

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        mine = self.test_indices[rank::world]
        return DataLoader(self.dataset, batch_size=max(self.batch_size, 256), sampler=mine)


class FeatureNetTraining(TrackedModule):
    """Cross-entropy training of a ``FeatureNet``; logs ``feature_net/loss`` and ``feature_net/val_acc``.

    The last validation accuracy (on the test split, with the final weights) is kept in
    ``test_accuracy``. AdamW with a cosine learning-rate decay over all steps.
    """

    loss_name = "feature_net/loss"

    def __init__(
        self,
        net: FeatureNet,
        *,
        dataset_size: int,
        lr: float,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(dataset_size)
        self.net = net
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.label_smoothing = float(label_smoothing)
        self.test_accuracy: float | None = None
        # torchmetrics: accumulated over the epoch and synced over DDP ranks
        self.val_correct, self.val_count = SumMetric(), SumMetric()
        self.val_loss = MeanMetric()
        self.save_hyperparameters(ignore=["net"], logger=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"]).float()
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        self.track_step(batch, loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["image"]).float()
        labels = batch["label"]
        self.val_correct.update((logits.argmax(dim=1) == labels).sum())
        self.val_count.update(torch.tensor(float(len(labels)), device=logits.device))
        self.val_loss.update(F.cross_entropy(logits, labels, reduction="none"))

    def on_validation_epoch_end(self) -> None:
        correct, count = self.val_correct.compute(), self.val_count.compute()
        if float(count) == 0:
            return
        acc = correct.double() / count.double()  # exact: counts, not a float32 running mean
        self.test_accuracy = float(acc)
        self.log("feature_net/val_acc", acc.float(), prog_bar=True)
        self.log("feature_net/val_loss", self.val_loss.compute().float())
        for metric in (self.val_correct, self.val_count, self.val_loss):
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class FeatureNetWriter(pl.Callback):
    """At the end of training, checks the ids fed and saves the net, its config and its card.

    The card's ``train_ids_hash`` (and ``manifest_hash``) is the hash of the ids the net was
    actually fed (gathered over ranks); it must equal ``expected_hash`` (the dataset's train
    split), else nothing is written.
    """

    def __init__(
        self,
        store_root: str,
        key: str,
        expected_hash: str,
        card: Mapping[str, Any],
        stopping: ValidationStopping | None = None,
    ) -> None:
        self.stopping = stopping  # its summary goes on the card
        self.store_root = store_root
        self.key = key
        self.expected_hash = expected_hash
        self.card = dict(card)

    def on_train_end(self, trainer: pl.Trainer, pl_module: FeatureNetTraining) -> None:
        checked = checked_fed_hash(
            trainer, pl_module, self.expected_hash, f"feature net {self.key}"
        )
        if checked is None:  # not rank zero
            return
        fed_hash, n_fed = checked
        card = dict(self.card)
        card.update(
            train_ids_hash=fed_hash,
            manifest_hash=fed_hash,
            n_samples_fed=n_fed,
            test_accuracy=pl_module.test_accuracy,
            metrics={**final_metrics(trainer), "test_accuracy": pl_module.test_accuracy},
            optimizer_steps=trainer.global_step,
            convergence=None if self.stopping is None else self.stopping.summary(trainer),
            wall_time_s=round(pl_module.elapsed_s(), 3),
            world_size=trainer.world_size,
            wandb_run_id=wandb_run_id(trainer),
        )
        net = pl_module.net
        save_feature_net(
            ArtifactStore(self.store_root), self.key, net.state_dict(), net.config(), card
        )
