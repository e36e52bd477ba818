"""Held-out denoising loss: the epsilon objective (DDPM eq. 14) on images a model never saw."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cdm.core.diffusion import (
    per_sample_epsilon_loss,
    q_sample,
    sample_noise_and_timesteps,
    step_generator,
)
from cdm.models.backbone import predict_epsilon


@torch.no_grad()
def heldout_denoising_loss(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    indices: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    conditional: bool = True,
    repeats: int = 4,
    seed: int = 1234,
    batch_size: int = 256,
) -> float:
    """Mean epsilon-prediction error over ``indices``, ``repeats`` noise draws each.

    Noise and timesteps depend only on (seed, repeat, batch), so two models evaluated with the
    same arguments see exactly the same (x_t, t) pairs: their losses compare without sampling noise.
    """
    if len(indices) == 0:
        raise ValueError("no held-out samples to evaluate")
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for r in range(repeats):
        for b, start in enumerate(range(0, len(indices), batch_size)):
            items = [dataset[i] for i in indices[start : start + batch_size]]
            x0 = torch.stack([it["image"] for it in items])
            labels = torch.stack([it["label"] for it in items]) if conditional else None
            generator = step_generator(seed, r * 100_003 + b)
            noise, timesteps = sample_noise_and_timesteps(
                x0, int(alphas_cumprod.shape[0]), generator
            )
            x_t = q_sample(x0, noise, timesteps, alphas_cumprod)
            x_t, timesteps, noise = x_t.to(device), timesteps.to(device), noise.to(device)
            labels = None if labels is None else labels.to(device)
            losses = per_sample_epsilon_loss(predict_epsilon(model, x_t, timesteps, labels), noise)
            total += float(losses.sum())
            count += len(losses)
    model.train(was_training)
    return total / count
