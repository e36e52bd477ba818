"""The training progress bar: Lightning's rich bar, naming the job and showing the loss only."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class JobProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` with a readable title and one number.

    With a stopping rule the number of epochs is open (``max_epochs=-1``), which Lightning's own
    bar prints as ``Epoch 210/-2``; this one says ``shard-01 · epoch 211 · step 1470`` (and
    ``/N`` when N is fixed). Of the logged metrics it shows the epoch loss, not ``v_num`` or
    per-step values, so the last frame fits one line in a log file.
    """

    def __init__(self, job: str) -> None:
        super().__init__(leave=False)
        self.job = job

    def _get_train_description(self, current_epoch: int) -> str:  # Lightning's hook for the title
        total = self.trainer.max_epochs
        epochs = (
            f"{current_epoch + 1}/{total}"
            if total is not None and total > 0
            else f"{current_epoch + 1}"
        )
        return f"{self.job} · epoch {epochs} · step {self.trainer.global_step}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        return {k: v for k, v in items.items() if k != "v_num" and not k.endswith("_step")}
