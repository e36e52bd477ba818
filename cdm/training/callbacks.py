"""Callbacks: SISA slice checkpoints, the artifact writer, and fault injection for resume tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from cdm.core.hashing import hash_ids
from cdm.core.identity import refusal
from cdm.core.logging import get_logger
from cdm.models.backbone import backbone_hash
from cdm.store import ArtifactStore

log = get_logger(__name__)


class SliceCheckpoint(pl.Callback):
    """Saves ``slice-SS.ckpt`` at every slice boundary and ``last.ckpt`` after every epoch.

    A checkpoint holds weights, optimizer, step, RNG state and the fed-id record: a forget
    request for a sample first seen in slice s resumes from ``slice-(s-1).ckpt``. Files are
    written to a temporary name and renamed, so a kill never leaves a half-written checkpoint.
    """

    def __init__(
        self,
        dirpath: str | Path,
        epochs_per_slice: int,
        signature: str = "",
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.epochs_per_slice = epochs_per_slice
        self.signature = signature  # the job's identity hash; ``identity``: its sections
        self.identity = dict(identity or {})

    def state_dict(self) -> dict:
        return {"signature": self.signature, "identity": self.identity}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("signature") != self.signature:
            raise RuntimeError(
                refusal(
                    f"the checkpoint in {self.dirpath}", state_dict.get("identity"), self.identity,
                    "resume it with the same config, or start over with retrain=true",
                )
            )  # fmt: skip

    def _save(self, trainer: pl.Trainer, name: str) -> None:
        final = self.dirpath / name
        tmp = self.dirpath / f".{name}.tmp-{os.getpid()}"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, final)
        trainer.strategy.barrier("slice_checkpoint")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("slice_checkpoint_mkdir")
        epoch = trainer.current_epoch
        if (epoch + 1) % self.epochs_per_slice == 0:
            self._save(trainer, f"slice-{(epoch + 1) // self.epochs_per_slice - 1:02d}.ckpt")
        self._save(trainer, "last.ckpt")


class KillAtStep(pl.Callback):
    """Fault injection: the process dies abruptly (no cleanup) once ``step`` optimizer steps ran."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os._exit(17)


class ArtifactWriter(pl.Callback):
    """At the end of training, hashes the ids actually fed and writes the artifact with its card.

    The card's ``manifest_hash`` is computed from the module's record of fed dataset indices
    (gathered over ranks), never copied from the manifest; a mismatch with the manifest means the
    job saw other data or missed some, and nothing is written. ``target_dir`` writes the adapter
    there instead of its place in the store (cdm-forget stages a retrained shard before swapping).
    """

    def __init__(
        self,
        store_root: str,
        experiment: str,
        job: str,
        stage: str,
        expected_hash: str,
        card: dict,
        adapter_kind: str | None,
        target_dir: str | None = None,
    ) -> None:
        self.store_root = store_root
        self.experiment = experiment
        self.job = job
        self.stage = stage
        self.expected_hash = expected_hash
        self.card = card
        self.adapter_kind = adapter_kind
        self.target_dir = target_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        checked = checked_fed_hash(trainer, pl_module, self.expected_hash, self.job)
        if checked is None:  # not rank zero
            return
        fed_hash, n_fed = checked
        pl_module.copy_ema_to_model()
        card = dict(self.card)
        card.update(
            manifest_hash=fed_hash,
            n_samples_fed=n_fed,
            metrics=final_metrics(trainer),
            wall_time_s=round(pl_module.elapsed_s(), 3),
            world_size=trainer.world_size,
            wandb_run_id=wandb_run_id(trainer),
        )
        store = ArtifactStore(self.store_root)
        model = pl_module.model
        if self.stage == "backbone":
            card["backbone_hash"] = backbone_hash(model)
            store.save_backbone(card["name"], model, card)
        else:
            card["backbone_hash"] = card["parents"][0]["hash"]
            store.save_adapter(
                self.experiment, self.job, model, card, kind=self.adapter_kind,
                directory=self.target_dir,
            )  # fmt: skip


def wandb_run_id(trainer: pl.Trainer) -> str | None:
    """The id of the trainer's W&B run, for the card (None without a WandbLogger)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment.id
    return None


def checked_fed_hash(
    trainer: pl.Trainer, pl_module, expected_hash: str, what: str
) -> tuple[str, int] | None:
    """(hash, count) of the ids the job was fed, on rank zero (None elsewhere); raises unless
    the hash equals ``expected_hash``. A collective call: every rank must make it."""
    fed = pl_module.fed_indices().tolist()
    if not trainer.is_global_zero:
        return None
    dataset = trainer.datamodule.dataset
    fed_hash = hash_ids([dataset.ids[i] for i in fed], [dataset.content_hashes[i] for i in fed])
    if fed_hash != expected_hash:
        raise RuntimeError(
            f"{what}: the {len(fed)} samples fed hash to {fed_hash[:12]} but the manifest is "
            f"{expected_hash[:12]}; the job saw other data or missed some. Nothing was written."
        )
    log.info(
        "%s: fed %s samples, id hash %s == manifest %s",
        what,
        len(fed),
        fed_hash[:12],
        expected_hash[:12],
    )
    return fed_hash, len(fed)


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The run's last logged scalars (epoch values, not per-step ones), step and epoch count."""
    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if v.numel() == 1 and not k.endswith("_step")
    }
    return {**metrics, "global_step": trainer.global_step, "epochs": trainer.current_epoch}
