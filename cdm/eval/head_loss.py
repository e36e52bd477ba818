"""Held-out logistic loss of a compartmental-router head: the stopping rule of ``stage=head``.

The head's training objective (``cdm.training.heads.HeadTraining``) on images no job trains on:
positives are held-out images of the shard's distribution, negatives held-out images standing in
for the safe distribution, each pair noised at one shared timestep, as in a training batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cdm.core.diffusion import q_sample, sample_noise_and_timesteps, step_generator
from cdm.models.compartmental import head_logit

NEGATIVE_LABELS_TAG = 5_021_977  # the stream of the negatives' labels, apart from the noise


@torch.no_grad()
def heldout_head_loss(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    positives: Sequence[int],
    negatives: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    conditional: bool = False,
    repeats: int = 2,
    seed: int = 1234,
    batch_size: int = 256,
) -> float:
    """Mean logistic loss of h(x_t, t[, y]): label 1 on noised ``positives``, 0 on noised
    ``negatives`` (the first min of both counts, paired; a pair shares its timestep).

    Noise, timesteps and the negatives' labels depend only on (seed, repeat, batch), so two
    heads evaluated with the same arguments see exactly the same inputs. A class-conditional
    head gets the positives' own labels and, for the negatives, labels drawn from the positives'
    labels (the shard's held-out label distribution), as ``HeadTraining`` pairs them.
    """
    n = min(len(positives), len(negatives))
    if n == 0:
        raise ValueError("no held-out positives or negatives to evaluate the head on")
    pos_labels = torch.stack([dataset[i]["label"] for i in positives[:n]]).reshape(-1)
    picked = torch.randint(n, (n,), generator=step_generator(seed + NEGATIVE_LABELS_TAG, 0))
    neg_labels = pos_labels[picked]
    modes = {m: m.training for m in model.modules()}  # a frozen backbone inside keeps its mode
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for r in range(repeats):
        for b, start in enumerate(range(0, n, batch_size)):
            stop = min(start + batch_size, n)
            x_pos = torch.stack([dataset[i]["image"] for i in positives[start:stop]])
            x_neg = torch.stack([dataset[i]["image"] for i in negatives[start:stop]])
            generator = step_generator(seed, r * 100_003 + b)
            noise, timesteps = sample_noise_and_timesteps(
                x_pos, int(alphas_cumprod.shape[0]), generator
            )
            noise_neg = torch.randn(x_neg.shape, generator=generator, dtype=x_neg.dtype)
            x_t = torch.cat(
                [
                    q_sample(x_pos, noise, timesteps, alphas_cumprod),
                    q_sample(x_neg, noise_neg, timesteps, alphas_cumprod),
                ]
            ).to(device)
            labels = (
                torch.cat([pos_labels[start:stop], neg_labels[start:stop]]).to(device)
                if conditional
                else None
            )
            logits = head_logit(model, x_t, torch.cat([timesteps, timesteps]).to(device), labels)
            targets = torch.cat([torch.ones(stop - start), torch.zeros(stop - start)])
            losses = F.binary_cross_entropy_with_logits(
                logits.float().cpu(), targets, reduction="none"
            )
            total += float(losses.sum())
            count += len(losses)
    for m, mode in modes.items():
        m.training = mode
    return total / count
