"""The denoising training job shared by backbone pretraining, shard adapters and the paragon."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from diffusers.training_utils import EMAModel
from peft.helpers import disable_input_dtype_casting

from cdm.core.diffusion import (
    epsilon_loss,
    q_sample,
    sample_noise_and_timesteps,
    step_generator,
)
from cdm.models.adapters import trainable_parameters
from cdm.models.backbone import null_label, predict_epsilon
from cdm.training.tracked import TrackedModule


class DenoisingModule(TrackedModule):
    """Trains the trainable parameters of ``model`` with the epsilon objective (DDPM eq. 14).

    Noise, timesteps and label dropout come from a generator seeded by (seed, step, rank)
    alone, so a run resumed from a checkpoint continues bit for bit. Every dataset index the
    module is fed is recorded in ``fed_mask``: the card's data hash is computed from it, not
    copied from the manifest.

    ``ema_decay``: an exponential moving average of the trainable parameters (diffusers'
    ``EMAModel``; checkpointed for bit-identical resume) replaces them before the artifact is
    saved. ``None`` (the default) leaves training untouched. Constructing the module calls
    ``save_hyperparameters``, so ``load_from_checkpoint(path, unet=..., alphas_cumprod=...)``
    rebuilds it from a checkpoint given the backbone and the noise schedule.
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
        super().__init__(dataset_size)
        self.model = model.train()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.ema_decay = ema_decay
        self.conditional = conditional
        self.cond_drop_prob = cond_drop_prob
        self.seed = seed
        self.null_label = null_label(model)
        self.ema: EMAModel | None = None
        self._ema_state: dict | None = None  # from a checkpoint, loaded at train start
        self._fit_scope = ExitStack()
        self.save_hyperparameters(ignore=["model", "unet", "alphas_cumprod"], logger=False)

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
        self.track_step(batch, loss)
        return loss

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

    # ---- mixed precision: autocast alone sets the LoRA factors' input dtype -------------------
    # peft casts a LoRA layer's input to its factors' dtype (fp32) and autocast casts it back to
    # bf16 for the conv/matmul: two full-size copies per adapted layer, forward and backward, for
    # bitwise the same result (bf16 -> fp32 -> bf16 is exact). peft's own switch turns that off
    # while a mixed-precision fit runs; every forward outside autocast then sees fp32 weights and
    # fp32 inputs, where there is nothing to cast. docs/benchmarks.md ("Goal 3 from the CPU")
    # counts what it saves.
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if str(self.trainer.precision).endswith("-mixed"):
            self._fit_scope.enter_context(disable_input_dtype_casting(self.model))

    def on_fit_end(self) -> None:
        self._fit_scope.close()

    # ---- EMA of the trainable parameters (diffusers' EMAModel) ----------------------------
    # A thin wrapper, not Lightning's EMAWeightAveraging: that one deep-copies the whole module
    # (the frozen backbone too) into every checkpoint; EMAModel averages only the trainable
    # tensors (a LoRA shard's checkpoint stays lean) and its state rides in checkpoint["cdm"].
    def on_train_start(self) -> None:
        if self.ema_decay is None:
            return
        decay = float(self.ema_decay)
        params = [p for _, p in trainable_parameters(self.model)]
        # min_decay=decay: a constant decay after the first update (which copies the weights)
        self.ema = EMAModel(params, decay=decay, min_decay=decay, foreach=True)
        if self._ema_state is not None:
            names = [n for n, _ in trainable_parameters(self.model)]
            if self._ema_state.get("names") != names:
                raise ValueError(
                    "the checkpoint's EMA state is for other trainable parameters (or an older "
                    "format): resume with the same adapter config, or start over with retrain=true"
                )
            self.ema.load_state_dict({k: v for k, v in self._ema_state.items() if k != "names"})
            self.ema.to(self.device)
            self._ema_state = None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.step([p for _, p in trainable_parameters(self.model)])

    def copy_ema_to_model(self) -> None:
        """Replace the trainable weights by their EMA (done once, before the artifact is saved)."""
        if self.ema is not None:
            self.ema.copy_to([p for _, p in trainable_parameters(self.model)])

    # ---- what a resumed run needs beyond TrackedModule's state ----------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        ema = None
        if self.ema is not None:
            state = self.ema.state_dict()
            state["shadow_params"] = [t.detach().cpu().clone() for t in state["shadow_params"]]
            ema = {"names": [n for n, _ in trainable_parameters(self.model)], **state}
        checkpoint["cdm"]["ema"] = ema

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._ema_state = checkpoint["cdm"].get("ema")
