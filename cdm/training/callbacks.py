"""Callbacks: SISA slice checkpoints, the stopping rule, the artifact writer, compiling the
trained network, and fault injection for resume tests."""

from __future__ import annotations

import math
import os
import shutil
import time
import weakref
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

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
        n_slices: int | None = None,
        last_every_s: float = 0.0,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.epochs_per_slice = epochs_per_slice
        # last.ckpt only for resuming: written at the first epoch, every slice boundary, and then
        # once ``last_every_s`` seconds passed (0: every epoch). A resume from an older one ends
        # bit-identical, it only redoes more steps; small shards run many short epochs.
        self.last_every_s = last_every_s
        self.last_saved: float | None = None
        self.n_slices = n_slices  # epochs after the last slice's (convergence) write last.ckpt only
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

    def _save(self, trainer: pl.Trainer, name: str, also: str | None = None) -> None:
        """Write the checkpoint ``name`` (and a byte copy of it as ``also``) atomically."""
        final = self.dirpath / name
        tmp = self.dirpath / f".{name}.tmp-{os.getpid()}"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, final)
            if also is not None:  # after ``name``: a resume from ``also`` never skips it
                copy = self.dirpath / f".{also}.tmp-{os.getpid()}"
                shutil.copyfile(final, copy)
                os.replace(copy, self.dirpath / also)
        trainer.strategy.barrier("slice_checkpoint")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("slice_checkpoint_mkdir")
        epoch = trainer.current_epoch
        index = (epoch + 1) // self.epochs_per_slice - 1
        boundary = (epoch + 1) % self.epochs_per_slice == 0 and (
            self.n_slices is None or index < self.n_slices
        )
        now = time.monotonic()
        if boundary:
            # last.ckpt is the same state: a copy of the file, not a second serialization
            self._save(trainer, f"slice-{index:02d}.ckpt", also="last.ckpt")
            self.last_saved = now
            return
        due = self.last_saved is None or now - self.last_saved >= self.last_every_s
        due = trainer.strategy.broadcast(due, src=0)  # every rank saves, or none (barriers)
        if due:
            self._save(trainer, "last.ckpt")
            self.last_saved = now


class Convergence(pl.Callback):
    """The stopping rule of a training job: slices join on their schedule; once the last slice has
    joined (epoch ``first_epoch``), training goes on until the held-out loss stops improving.

    ``evaluate(model) -> float`` is the held-out denoising loss (deterministic noise, data no job
    trains on; None without held-out data: training stops at ``min_steps``), checked at the end of an epoch once ``check_every_steps`` optimizer steps passed
    since the last check. Training stops after at least ``min_steps`` steps when ``patience``
    checks in a row did not improve the best loss by the fraction ``min_improvement``, or at ``max_steps`` (counted
    only after one whole epoch with every slice, so every sample is fed). The rule sees nothing
    but the model and the held-out set, and nothing before the last slice joined: a SISA restart
    from ``slice-(s-1).ckpt`` runs the same rule on the same data as training from scratch. Its
    state is checkpointed, so a resumed run stops where an uninterrupted one does.
    """

    def __init__(
        self,
        evaluate: Callable[[Any], float] | None,
        *,
        first_epoch: int,
        min_steps: int,
        max_steps: int,
        patience: int,
        check_every_steps: int,
        min_improvement: float = 0.0,
        heldout_samples: int = 0,
    ) -> None:
        if not 0 <= min_steps <= max_steps or patience < 1 or check_every_steps < 1:
            raise ValueError(
                f"convergence: need 0 <= min_steps ({min_steps}) <= max_steps ({max_steps}), "
                f"patience ({patience}) >= 1 and check_every_steps ({check_every_steps}) >= 1"
            )
        self.evaluate = evaluate
        self.first_epoch = first_epoch
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.patience = patience
        self.check_every_steps = check_every_steps
        self.min_improvement = min_improvement
        self.heldout_samples = heldout_samples
        self.history: list[tuple[int, float]] = []  # (optimizer step, held-out loss) per check
        self.best: float | None = None
        self.wait = 0
        self.stopped_by: str | None = None

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history], "best": self.best, "wait": self.wait,
                "stopped_by": self.stopped_by}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self.best, self.wait = state_dict.get("best"), int(state_dict.get("wait", 0))
        self.stopped_by = state_dict.get("stopped_by")

    def summary(self) -> dict[str, Any]:
        """For the card: steps run, why training stopped, the last and best held-out loss."""
        last = self.history[-1][1] if self.history else None
        return {"stopped_by": self.stopped_by, "heldout_loss": last, "heldout_loss_best": self.best,
                "checks": len(self.history), "heldout_samples": self.heldout_samples,
                "min_steps": self.min_steps,
                "max_steps": self.max_steps, "patience": self.patience}  # fmt: skip

    def _stop(self, trainer: pl.Trainer, why: str) -> None:
        self.stopped_by = self.stopped_by or why  # the first reason: the epoch end may follow
        trainer.should_stop = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stopped_by is not None:  # resumed from the checkpoint written as it stopped
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch > self.first_epoch and trainer.global_step >= self.max_steps:
            self._stop(trainer, "max_steps")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch < self.first_epoch:
            return
        step = trainer.global_step
        last = self.history[-1][0] if self.history else -self.check_every_steps
        if self.evaluate is None:
            if step >= self.min_steps:
                self._stop(trainer, "min_steps")
        elif step - last >= self.check_every_steps or step >= self.max_steps:
            loss = self.evaluate(pl_module.model) if trainer.is_global_zero else None
            loss = float(trainer.strategy.broadcast(loss, src=0))  # one decision for every rank
            self.history.append((step, loss))
            pl_module.log("heldout_loss", loss, rank_zero_only=True)
            if self.best is None or loss < self.best * (1.0 - self.min_improvement):
                self.best, self.wait = loss, 0
            else:
                self.wait += 1
            if step >= self.min_steps and self.wait >= self.patience:
                self._stop(trainer, "patience")
        if self.stopped_by is None and step >= self.max_steps:
            self._stop(trainer, "max_steps")


class ValidationStopping(pl.callbacks.EarlyStopping):
    """The stopping rule of the router and feature-net stages: Lightning's early stopping on the
    validation loss (data the stage never trains on), with the stage's ``epochs`` as the budget.

    ``spec`` is the stage's ``convergence`` node (``patience``: validation checks without an
    improvement of ``min_delta``); its :meth:`summary` goes on the card. Lightning checkpoints its
    state, so a resumed run stops where an uninterrupted one does.
    """

    def __init__(self, monitor: str, spec: Mapping[str, Any], max_epochs: int) -> None:
        super().__init__(
            monitor=monitor,
            patience=int(spec["patience"]),
            min_delta=float(spec.get("min_delta", 0.0)),
            mode="min",
            check_finite=True,
            verbose=False,
        )
        self.max_epochs = max_epochs

    def summary(self, trainer: pl.Trainer) -> dict[str, Any]:
        """For the card: why training stopped, epochs run, the best validation loss."""
        best = self.best_score.item()
        return {"stopped_by": "patience" if self.stopped_epoch > 0 else "max_epochs",
                "epochs": trainer.current_epoch, "max_epochs": self.max_epochs,
                "monitor": self.monitor, "val_loss_best": best if math.isfinite(best) else None,
                "patience": self.patience, "min_delta": abs(self.min_delta)}  # fmt: skip


def validation_stopping(
    spec: Mapping[str, Any] | None,
    monitor: str,
    max_epochs: int,
    *,
    has_validation: bool,
    what: str,
) -> ValidationStopping | None:
    """The stage's ``convergence`` rule (null: exactly ``epochs``); without validation data it is
    off (a warning says so) and the budget decides."""
    if spec is None:
        return None
    if not has_validation:
        log.warning("%s: no validation data for the stopping rule: it trains all %s epochs",
                    what, max_epochs)  # fmt: skip
        return None
    return ValidationStopping(monitor, spec, max_epochs)


class CompileModel(pl.Callback):
    """``torch.compile`` the network a denoising job trains (``pl_module.model``), in place
    (``nn.Module.compile``), so state dicts, checkpoints and stored adapters keep their keys.

    ``callbacks=compile``. Inductor fuses the elementwise work and owns the layouts around the
    convolutions (on an H200 a compiled composed sampling step took 0.55x the uncompiled one,
    docs/benchmarks.md); the first steps compile (that sampling step: about a minute).
    ``channels_last`` puts the 4-d weights in NHWC; ``layout_opt`` forces inductor's channels-last
    buffers, which it otherwise skips for a UNet (both: the fastest shard step measured).
    Compiled kernels are not bit-identical to eager ones, so a compiled run is reproducible
    against compiled runs only. A job with no ``model`` (router, feature net) trains
    uncompiled, said in one log line.
    """

    def __init__(
        self,
        mode: str = "default",
        backend: str = "inductor",
        channels_last: bool = False,
        layout_opt: bool = False,
    ) -> None:
        self.mode, self.backend, self.channels_last = mode, backend, channels_last
        self.layout_opt = layout_opt
        self.compiled: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # compile once per model
        self.patches = ExitStack()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            log.info("compile: %s has no .model; it trains uncompiled", type(pl_module).__name__)
            return
        if self.channels_last:  # 4-d weights NHWC: the convs take and give channels-last
            model.to(memory_format=torch.channels_last)
        if self.layout_opt:
            # Inductor keeps its buffers channels-last around convs only if no conv narrows the
            # channels, and a UNet's up path and LoRA's A factors do; forced, the H200's B=512
            # step took 83 ms instead of 100 (docs/benchmarks.md). Read when a graph compiles,
            # i.e. during the run: set until teardown.
            import torch._inductor.config as inductor_config  # here: importing inductor takes seconds

            self.patches.enter_context(inductor_config.patch(force_layout_optimization=True))
        if model not in self.compiled:
            model.compile(mode=self.mode, backend=self.backend)
            self.compiled.add(model)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.patches.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception) -> None:
        self.patches.close()


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
    (or a shard's head, ``stage="head"``) there instead of its place in the store (cdm-forget
    stages a retrained shard before swapping).
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
        convergence: Convergence | None = None,
    ) -> None:
        self.convergence = convergence  # its summary goes on the card
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
            optimizer_steps=trainer.global_step,
            convergence=None if self.convergence is None else self.convergence.summary(),
        )
        store = ArtifactStore(self.store_root)
        model = getattr(pl_module, "model", None)
        if self.stage == "backbone":
            card["backbone_hash"] = backbone_hash(model)
            store.save_backbone(card["name"], model, card)
        elif self.stage == "head":  # a compartmental-router head (cdm.training.heads)
            card["backbone_hash"] = card["parents"][0]["hash"]
            store.save_head(
                self.experiment, card["manifest_name"], pl_module.head.state_dict(),
                pl_module.head_config, card, directory=self.target_dir,
            )  # fmt: skip
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
    log.info("%s: %s samples fed, id hash %s = manifest", what, len(fed), fed_hash[:12])
    return fed_hash, len(fed)


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The run's last logged scalars (epoch values, not per-step ones), step and epoch count."""
    metrics = {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if v.numel() == 1 and not k.endswith("_step")
    }
    return {**metrics, "global_step": trainer.global_step, "epochs": trainer.current_epoch}
