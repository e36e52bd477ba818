"""The compartmentalized model: shards composed by router weights at every denoising step.

``ComposedDenoiser`` turns a ``MultiShardUNet`` (or ``MultiShardFull``, ``MultiShardPrompt``) and
a composition method (a ``cdm.core.composition.Composition``) into the ``denoise(x_t, t)``
callable of Prop. 3.1 (eps = sum_i w_i(x_t, t) eps_i(x_t, t)); only (sample, shard) pairs with
a non-zero weight are evaluated, all in ONE batched forward. ``draw`` runs a diffusers scheduler
over it for one batch and records every sample's weights at every step (the trace).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cdm.core import composition as C
from cdm.core.sampling import Callback
from cdm.core.sampling import sample as run_sampler
from cdm.models.multi_adapter import MultiShardFull, MultiShardUNet
from cdm.models.prompts import MultiShardPrompt


@dataclass
class ComposedDenoiser:
    """eps(x_t, t) of the CDM mixture (Prop. 3.1) over the allowed shards.

    ``composition`` forms the weights (average, router posterior, ...); ``prior`` is lambda.
    ``router(x_t, t) -> logits [B, n]`` is needed when ``composition.router`` is set (a router
    with ``takes_labels`` is called as ``router(x_t, t, labels)``).
    ``label_prior`` [num_labels, n] is P(shard | label) for class-conditional sampling: the
    router's posterior then uses it in place of lambda, P(z | x_t, y) ~ P(z | x_t) P(z | y) / P(z)
    (exact when each label lives in one shard, as with by-class shards).
    """

    # LoRA shards on one backbone | full copies | deep prompts on one DiT
    model: MultiShardUNet | MultiShardFull | MultiShardPrompt
    composition: C.Composition
    prior: torch.Tensor
    allowed: torch.Tensor | None = None
    router: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    train_log_prior: torch.Tensor | None = None
    label_prior: torch.Tensor | None = None
    guidance_scale: float = 1.0
    null_label: int | None = None
    generator: torch.Generator | None = None
    dense: Callable | None = None  # e.g. GraphedDense(model): every pair in one CUDA graph replay
    # e.g. GraphedPairs(model): a gated step (top-k, random) as ``capacity`` pairs per sample,
    # static shapes, mixed in one CUDA graph replay (MultiShardUNet.mixed_pairs eagerly)
    pairs: Callable | None = None
    trace: list[torch.Tensor] = field(default_factory=list)
    evaluated_pairs: int = 0

    def __post_init__(self) -> None:
        n = self.model.n_shards
        self.prior = C.normalize_priors(self.prior.double()).float()
        if self.allowed is None:
            self.allowed = torch.ones(n, dtype=torch.bool)
        if self.composition.router is not None and self.router is None:
            raise ValueError(
                f"composition={self.composition.name} needs a router "
                "(train one: cdm-train stage=router)"
            )

    def weights(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """w [B, n] for this step, zero on disallowed shards, rows summing to one."""
        logits = None
        if self.composition.router is not None:
            # weights live on the CPU ([B, n] is tiny; the trace is kept there anyway)
            if labels is not None and getattr(self.router, "takes_labels", False):
                logits = self.router(x_t, t, labels)  # per-shard heads of a conditional model
            else:
                logits = self.router(x_t, t)
            logits = logits.float().cpu()
        if self.label_prior is not None and labels is not None:
            log_prior = torch.log(self.label_prior[labels.cpu()])  # -inf: label not in shard
        else:
            log_prior = torch.log(self.prior.clamp_min(1e-30))
        step = C.Step(
            x_t, t, prior=C.mask_weights(self.prior[None], self.allowed)[0], log_prior=log_prior,
            logits=logits, train_log_prior=self.train_log_prior, generator=self.generator,
        )  # fmt: skip
        return self.composition.gate(C.mask_weights(self.composition.weights(step), self.allowed))

    def shard_epsilon(
        self, x_t: torch.Tensor, t: torch.Tensor, shard: int, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """eps_shard(x_t, t) [B, ...] of one loaded shard for every sample, with autograd on (the
        grad-enabled path of eq. 6 credit; ``weights`` is differentiable in x_t too)."""
        index = torch.full((x_t.shape[0],), int(shard), dtype=torch.long, device=x_t.device)
        return self.model(x_t, t, labels, index)

    @torch.no_grad()
    def __call__(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch = x_t.shape[0]
        t_batch = t.expand(batch) if t.dim() == 0 else t
        w = self.weights(x_t, t_batch, labels)  # on the CPU
        self.trace.append(w.detach())
        guided = labels is not None and self.guidance_scale != 1.0 and self.null_label is not None
        if (
            self.dense is not None
            and self.composition.dense
            and not guided
            and bool(self.allowed.all())
        ):
            eps_all = self.dense(x_t, t_batch, labels)  # [n, B, ...]: every pair, static shapes
            self.evaluated_pairs += int(eps_all.shape[0] * batch)
            mix = (
                w.t()
                .to(eps_all.device, eps_all.dtype)
                .reshape(*w.t().shape, *[1] * (eps_all.dim() - 2))
            )
            return (eps_all * mix).sum(0)
        if self.pairs is not None and not self.composition.dense and not guided:
            return self._static_pairs(x_t, t_batch, labels, w)
        sample_idx, shard_idx = (i.to(x_t.device) for i in C.active_pairs(w))
        x_pairs, t_pairs = x_t[sample_idx], t_batch[sample_idx]
        y_pairs = None if labels is None else labels[sample_idx]
        if guided:  # conditional and unconditional epsilons of every pair in the same forward
            x_pairs, t_pairs = torch.cat([x_pairs, x_pairs]), torch.cat([t_pairs, t_pairs])
            y_pairs = torch.cat([y_pairs, torch.full_like(y_pairs, self.null_label)])
            shard_pairs = torch.cat([shard_idx, shard_idx])
        else:
            shard_pairs = shard_idx
        eps = self.model(x_pairs, t_pairs, y_pairs, shard_pairs)
        self.evaluated_pairs += int(shard_pairs.numel())
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + self.guidance_scale * (cond - uncond)
        return C.mix_selected(eps, sample_idx, shard_idx, w.to(eps.device), batch)

    def _static_pairs(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, w: torch.Tensor
    ) -> torch.Tensor:
        """The gated step as ``capacity`` pairs per sample (static shapes): the kept shards of
        each row by weight, padded with the row's top shard at weight 0, so no shard outside
        the gate is ever evaluated (its weight would be 0, but a shard may not be allowed)."""
        n = w.shape[1]
        capacity = min(self.composition.capacity or n, n)
        weight, shard = w.topk(capacity, dim=1)
        shard = torch.where(weight > 0, shard, shard[:, :1])
        self.evaluated_pairs += int(shard.numel())
        return self.pairs(x_t, t, labels, shard.to(x_t.device), weight.to(x_t.device))


def draw(
    denoiser: ComposedDenoiser,
    scheduler,
    *,
    shape: Sequence[int],
    steps: int,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
    latents: torch.Tensor | None = None,
    clamp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0 [B, C, H, W] clamped to [-1, 1], trace [B, steps, n]), both on the CPU: one batch of
    the CDM's reverse process (paper eq. 2 with the eps of Prop. 3.1).

    ``shape`` is (B, C, H, W). x_T is drawn on the CPU from ``generator`` and moved to
    ``device``, so a seed gives the same x_T on every device; the same generator then serves the
    composition's draws (random selection) and the scheduler's noise, in that order per step.
    ``latents`` (shape ``shape``) replaces the x_T draw (e.g. one seed per request of a batch).
    ``clamp=False`` keeps x_0 as sampled: latents of a codec (an SD VAE) are not in [-1, 1].
    """
    denoiser.generator = generator
    denoiser.trace = []
    x_T = torch.randn(tuple(shape), generator=generator) if latents is None else latents
    x_T = x_T.to(device)
    y = None if labels is None else labels.to(device)
    x0 = run_sampler(
        lambda x, t: denoiser(x, t, y), scheduler, x_T, steps, generator=generator,
        callback=callback,
    )  # fmt: skip
    x0 = x0.clamp(-1, 1) if clamp else x0
    return x0.cpu(), torch.stack(denoiser.trace, dim=1).cpu()
