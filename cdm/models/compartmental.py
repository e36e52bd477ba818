"""The compartmentalized router: one binary head per shard, trained on that shard and public data.

Head i is a classifier h_i(x_t, t[, y]) -> one logit of "x_t is a noised sample of shard i"
(label 1) against "x_t is a noised sample of the safe split" (label 0), trained on balanced
batches with the logistic loss. Its optimum is the log density ratio (the logistic-regression
density-ratio trick)::

    h_i*(x, t) = log p_t^i(x) - log p_t^safe(x)

so with priors lambda_i the mixture posterior of Prop. 3.1 needs no joint classifier::

    softmax_i(h_i + log lambda_i) = lambda_i p_t^i / sum_j lambda_j p_t^j = w_i(x, t),

because the reference density p_t^safe(x) is the same factor in every term and cancels.

Class-conditional models: head i is trained on positives (x, y) ~ p^i(x, y) and negatives
(x_safe, y) with x_safe ~ p^safe(x) and y drawn from shard i's label distribution p^i(y),
independently. Then the optimum is

    h_i*(x, y, t) = log [p_t^i(x, y) / (p^i(y) p_t^safe(x))] = log p_t^i(x | y) - log p_t^safe(x),

and P(z = i | x, y) = P(z = i | y) p_t^i(x | y) / sum_j P(z = j | y) p_t^j(x | y)
= softmax_i(h_i + log P(z = i | y)) with P(z = i | y) ~ lambda_i p^i(y) = n_iy / N (shard sizes
times class shares; ``cdm.jobs.pipeline.shard_label_prior``): p_t^safe(x) cancels again.

Each head lives with its shard: forgetting, adding or serving a shard touches only its head.
The exactness of the identity is tested on an analytic Gaussian mixture
(``tests/test_compartmental.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn


def takes_labels(net: nn.Module) -> bool:
    """Whether a head network is class-conditional (its ``forward`` takes ``class_labels`` and it
    was built with a label embedding)."""
    return (
        "class_labels" in inspect.signature(net.forward).parameters
        and getattr(net, "label", None) is not None
    )


def head_logit(
    net: nn.Module,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """h(x_t, t[, y]) [B] of a one-output router network (any ``cdm.models.router`` class)."""
    if class_labels is not None and takes_labels(net):
        return net(x_t, timesteps, class_labels)[:, 0]
    return net(x_t, timesteps)[:, 0]


class CompartmentalRouter(nn.Module):
    """The logits [B, n] of n shard heads, in the order given: softmax(logits + log lambda) = w.

    Heads on one frozen backbone (``BackboneHeadRouter``, n_shards=1) share it: its features (a
    UNet's mid block, a DiT's transformer block) are computed once per call. ``takes_labels``
    tells the composed denoiser to pass the class labels of a class-conditional model.
    """

    takes_labels = True

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("a compartmental router needs at least one head")
        self.heads = nn.ModuleList(heads)

    def _shared_backbone(self) -> nn.Module | None:
        # one feature pass serves every head that reads the same backbone at the same block
        backbones = {
            (id(getattr(h, "backbone", None)), getattr(h, "block", None)) for h in self.heads
        }
        first = getattr(self.heads[0], "backbone", None)
        shared = len(backbones) == 1 and first is not None
        return first if shared and all(hasattr(h, "head_logits") for h in self.heads) else None

    def forward(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=x_t.device).expand(x_t.shape[0])
        conditional = {takes_labels(h) for h in self.heads}
        if self._shared_backbone() is None or len(conditional) > 1:
            return torch.stack([head_logit(h, x_t, timesteps, class_labels) for h in self.heads], 1)
        labels = class_labels if conditional == {True} else None
        feats = self.heads[0].features(x_t, timesteps, labels)
        return torch.stack([h.head_logits(feats, timesteps, labels)[:, 0] for h in self.heads], 1)
