"""Training one shard's head of the compartmental router (``stage=head``).

``HeadTraining`` is fed shard i's samples by the same ``ManifestDataModule`` as the shard's
adapter (its SISA slices, epochs per slice, checkpoints, resume and forget restarts are the same
code, and the ArtifactWriter checks that the ids fed hash to the shard's manifest). Each batch
of positives gets as many negatives from the safe (public) split, drawn by (seed, step, rank)
alone, so a restart from a slice checkpoint continues bit for bit. Positives and negatives share
their timesteps (balanced at every t); the loss is the logistic loss, whose optimum is
h = log p_t^i(x) - log p_t^safe(x) (``cdm.models.compartmental``). Once the last slice joined,
``router.convergence`` stops training when the same loss on held-out images stops improving
(``cdm.jobs.train.build_convergence``, ``cdm.eval.head_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cdm.core.diffusion import q_sample, sample_noise_and_timesteps, step_generator
from cdm.models.compartmental import head_logit
from cdm.training.tracked import TrackedModule

_NEGATIVES_TAG = 7_368_787  # a (seed, step, rank) stream for the negatives, apart from the noise


def negative_indices(
    safe: Sequence[int], n: int, *, seed: int, step: int, rank: int = 0
) -> list[int]:
    """``n`` dataset indices drawn with replacement from the safe split, by (seed, step, rank)."""
    if not safe:
        raise ValueError(
            "stage=head needs a non-empty safe split (the negatives): set sharding.safe_fraction > 0"
        )
    generator = step_generator(seed + _NEGATIVES_TAG, step, rank)
    return [safe[j] for j in torch.randint(len(safe), (n,), generator=generator).tolist()]


class HeadTraining(TrackedModule):
    """Shard i's head h_i(x_t, t[, y]) against the safe split, logistic loss, balanced batches.

    Negatives of a class-conditional model carry the labels of the batch's positives (y drawn
    from shard i's label distribution), so h_i -> log p_t^i(x | y) - log p_t^safe(x).
    """

    loss_name = "head/loss"

    def __init__(
        self,
        head: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        *,
        negatives: Dataset,
        safe_indices: Sequence[int],
        head_config: Mapping[str, Any],
        dataset_size: int,
        lr: float,
        weight_decay: float = 0.0,
        conditional: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset_size)
        self.head = head
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone(), persistent=False)
        self.negatives = negatives
        self.safe_indices = [int(i) for i in safe_indices]
        self.head_config = dict(head_config)
        self.lr = lr
        self.weight_decay = weight_decay
        self.conditional = conditional
        self.seed = seed

    @property
    def model(self) -> torch.nn.Module:
        """The head: what the stopping rule (``Convergence``) evaluates."""
        return self.head

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def head_loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Logistic loss of shard samples (1) vs as many safe samples (0), both at the same t."""
        x0 = batch["image"]
        generator = step_generator(self.seed, step, self.global_rank, x0.device)
        noise, timesteps = sample_noise_and_timesteps(x0, self.num_train_timesteps, generator)
        picked = negative_indices(
            self.safe_indices, x0.shape[0], seed=self.seed, step=step, rank=self.global_rank
        )
        x_neg = torch.stack([self.negatives[i]["image"] for i in picked]).to(x0.device, x0.dtype)
        noise_neg = torch.randn(x_neg.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = torch.cat(
            [
                q_sample(x0, noise, timesteps, self.alphas_cumprod),
                q_sample(x_neg, noise_neg, timesteps, self.alphas_cumprod),
            ]
        )
        labels = torch.cat([batch["label"], batch["label"]]) if self.conditional else None
        logits = head_logit(self.head, x_t, torch.cat([timesteps, timesteps]), labels).float()
        targets = torch.cat(
            [torch.ones_like(logits[: len(x0)]), torch.zeros_like(logits[len(x0) :])]
        )
        return F.binary_cross_entropy_with_logits(logits, targets)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.head_loss(batch, self.global_step)
        self.track_step(batch, loss)  # records the positives only: the shard's own ids
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.head.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay,
            fused=self.device.type == "cuda" or None,
        )  # fmt: skip

    def copy_ema_to_model(self) -> None:
        """No EMA for heads (the ArtifactWriter's interface)."""
