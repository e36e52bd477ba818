"""The denoising training job shared by backbone pretraining, shard adapters and the paragon."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

from cdm.core.diffusion import (
    epsilon_loss,
    q_sample,
    sample_noise_and_timesteps,
    step_generator,
)
from cdm.models.adapters import trainable_parameters
from cdm.models.backbone import null_label, predict_epsilon


class DenoisingModule(pl.LightningModule):
    """Trains the trainable parameters of ``model`` with the epsilon objective (DDPM eq. 14).

    Noise, timesteps and label dropout come from a generator seeded by (seed, step, rank)
    alone, so a run resumed from a checkpoint continues bit for bit. Every dataset index the
    module is fed is recorded in ``fed_mask``: the card's data hash is computed from it, not
    copied from the manifest.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        *,
        dataset_size: int,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        ema_decay: float | None = None,
        conditional: bool = True,
        cond_drop_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model.train()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)
        # a plain CPU tensor, not a buffer: DDP would broadcast a buffer from rank 0 to the others
        self.fed_mask = torch.zeros(dataset_size, dtype=torch.bool)
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.ema_decay = ema_decay
        self.conditional = conditional
        self.cond_drop_prob = cond_drop_prob
        self.seed = seed
        self.null_label = null_label(model)
        self.ema: dict[str, torch.Tensor] | None = None
        self._epoch_loss: torch.Tensor | None = None
        self._epoch_steps = 0
        self.elapsed_before_resume_s = 0.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def forward(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None
    ):
        return predict_epsilon(self.model, x_t, timesteps, labels)

    def denoising_loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """One Monte-Carlo estimate of the epsilon objective on ``batch`` at optimizer step ``step``."""
        x0 = batch["image"]
        generator = step_generator(self.seed, step, self.global_rank, x0.device)
        noise, timesteps = sample_noise_and_timesteps(x0, self.num_train_timesteps, generator)
        labels = batch["label"] if self.conditional else None
        if labels is not None and self.cond_drop_prob > 0 and self.null_label is not None:
            drop = (
                torch.rand(x0.shape[0], generator=generator, device=x0.device) < self.cond_drop_prob
            )
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        x_t = q_sample(x0, noise, timesteps, self.alphas_cumprod)
        return epsilon_loss(self(x_t, timesteps, labels), noise)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.denoising_loss(batch, self.global_step)
        self.fed_mask[batch["index"].cpu()] = True
        # accumulate on the device; hand Lightning a value only every log_every_n_steps steps
        # (self.log on every step costs ~1 ms on CPU and a device sync for the progress bar)
        detached = loss.detach()
        self._epoch_loss = detached if self._epoch_loss is None else self._epoch_loss + detached
        self._epoch_steps += 1
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % max(every, 1) == 0:
            self.log("train/loss_step", detached, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_loss, self._epoch_steps = None, 0

    def on_train_epoch_end(self) -> None:
        if self._epoch_steps:
            mean = self._epoch_loss / self._epoch_steps
            self.log(
                "train/loss", mean, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for _, p in trainable_parameters(self.model)]
        if not params:
            raise ValueError(
                "the model has no trainable parameters: check adapter.kind / target_modules"
            )
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(
            params,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
            fused=fused or None,
        )

    # ---- EMA of the trainable parameters -------------------------------------------------
    def on_train_start(self) -> None:
        if self.ema_decay is not None and self.ema is None:
            self.ema = {n: p.detach().clone() for n, p in trainable_parameters(self.model)}
        elif self.ema is not None:
            self.ema = {n: v.to(self.device) for n, v in self.ema.items()}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is None:
            return
        with torch.no_grad():
            names = list(self.ema)
            params = dict(trainable_parameters(self.model))
            torch._foreach_lerp_(
                [self.ema[n] for n in names],
                [params[n].detach() for n in names],
                1 - self.ema_decay,
            )

    def copy_ema_to_model(self) -> None:
        """Replace the trainable weights by their EMA (done once, before the artifact is saved)."""
        if self.ema is None:
            return
        params = dict(trainable_parameters(self.model))
        with torch.no_grad():
            for name, value in self.ema.items():
                params[name].copy_(value)

    # ---- what a resumed run needs beyond Lightning's own state ---------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["cdm"] = {
            "fed_mask": self.fed_mask.detach().cpu().clone(),
            "ema": None
            if self.ema is None
            else {k: v.detach().cpu().clone() for k, v in self.ema.items()},
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
        self.ema = state["ema"]
        torch.set_rng_state(state["torch_rng"])
        self.elapsed_before_resume_s = float(state["elapsed_s"])

    def elapsed_s(self) -> float:
        """Wall time spent training this job, summed over interrupted runs."""
        started = getattr(self, "_started_at", None)
        return self.elapsed_before_resume_s + (time.perf_counter() - started if started else 0.0)

    def on_fit_start(self) -> None:
        self._started_at = time.perf_counter()

    def fed_indices(self) -> torch.Tensor:
        """Sorted dataset indices fed on any rank (a collective call under DDP)."""
        mask = self.fed_mask
        if self.trainer is not None and self.trainer.world_size > 1:
            mask = self.all_gather(mask.to(self.device, torch.uint8)).bool().any(dim=0).cpu()
        return mask.nonzero().flatten()
