"""What every cdm training job records beyond Lightning's own state.

- ``fed_mask``: every dataset index the job was fed. A plain CPU tensor, not a buffer: DDP
  would broadcast a buffer from rank 0 to the other ranks. Artifact writers hash the ids it
  names (gathered over ranks) and refuse to write unless they equal the manifest. Each step
  keeps its batch's indices where they are; they reach the host at the next read (epoch end,
  checkpoint, artifact), so a step never waits for the device.
- the running loss, accumulated on the device and handed to Lightning only every
  ``log_every_n_steps`` steps plus the epoch mean (``self.log`` on every step costs ~1 ms on a
  CPU); the step value goes to the logger, not the progress bar, whose values Lightning reads
  back from the device at every batch end;
- wall time summed over interrupted runs, and the torch RNG state, saved in checkpoints.
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from cdm.core.logging import console_logging


class TrackedModule(pl.LightningModule):
    """Base of the training jobs: fed-id record, running loss, resumable wall time."""

    loss_name = "train/loss"

    def __init__(self, dataset_size: int) -> None:
        super().__init__()
        self.fed_mask = torch.zeros(dataset_size, dtype=torch.bool)
        self.elapsed_before_resume_s = 0.0
        self._epoch_loss: torch.Tensor | None = None
        self._epoch_steps = 0

    @property
    def fed_mask(self) -> torch.Tensor:
        """Which dataset indices this rank was fed (CPU, bool). The indices of the steps since the
        last read are moved to the host here, not in every step: on a GPU, reading them back
        waits for all queued work, so a read per step kept the host from running ahead."""
        self._read_indices()
        return self._fed_mask

    @fed_mask.setter
    def fed_mask(self, mask: torch.Tensor) -> None:
        self._fed_mask, self._unread_indices = mask, []

    def _read_indices(self) -> None:
        if self._unread_indices:
            fed = torch.cat([i.to("cpu") for i in self._unread_indices])
            self._unread_indices = []
            self._fed_mask[fed] = True

    def track_step(self, batch: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """Record the batch's dataset indices (read at the next ``fed_mask``) and accumulate the
        loss for logging."""
        self._unread_indices.append(batch["index"].detach())
        detached = loss.detach()
        self._epoch_loss = detached if self._epoch_loss is None else self._epoch_loss + detached
        self._epoch_steps += 1
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % max(every, 1) == 0:
            # not prog_bar: Lightning turns every progress-bar value into a Python number at every
            # batch end (a device sync per step on a GPU), and the bar shows the epoch loss only
            self.log(
                f"{self.loss_name}_step", detached, prog_bar=False, on_step=True, on_epoch=False
            )

    def on_train_epoch_start(self) -> None:
        self._epoch_loss, self._epoch_steps = None, 0

    def on_train_epoch_end(self) -> None:
        self._read_indices()  # one wait for the device an epoch, and the list stays short
        if self._epoch_steps:
            mean = self._epoch_loss / self._epoch_steps
            self.log(
                self.loss_name, mean, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True
            )

    def setup(self, stage: str) -> None:
        console_logging()  # a spawned DDP rank: Hydra configured logging in the parent only

    def on_fit_start(self) -> None:
        self._started_at = time.perf_counter()

    def elapsed_s(self) -> float:
        """Wall time spent training this job, summed over interrupted runs."""
        started = getattr(self, "_started_at", None)
        return self.elapsed_before_resume_s + (time.perf_counter() - started if started else 0.0)

    def fed_indices(self) -> torch.Tensor:
        """Sorted dataset indices fed on any rank (a collective call under DDP)."""
        mask = self.fed_mask
        if self.trainer is not None and self.trainer.world_size > 1:
            mask = self.all_gather(mask.to(self.device, torch.uint8)).bool().any(dim=0).cpu()
        return mask.nonzero().flatten()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cdm"] = {
            "fed_mask": self.fed_mask.detach().cpu().clone(),
            "torch_rng": torch.get_rng_state(),
            "elapsed_s": self.elapsed_s(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("cdm")
        if state is None:
            raise ValueError(
                "checkpoint has no 'cdm' state: it was not written by a cdm training job"
            )
        self.fed_mask = state["fed_mask"].clone()
        torch.set_rng_state(state["torch_rng"])
        self.elapsed_before_resume_s = float(state["elapsed_s"])
