"""The compartmentalized model: shards composed by router weights at every denoising step.

``ComposedDenoiser`` turns a ``MultiShardUNet`` and a weighting method into the ``denoise(x_t, t)``
callable of Prop. 3.1 (eps = sum_i w_i(x_t, t) eps_i(x_t, t)); only (sample, shard) pairs with a
non-zero weight are evaluated, all in ONE batched forward. ``sample_composed`` runs a diffusers
scheduler over it and records every sample's weights at every step (the trace).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from cdm.core import composition as C
from cdm.core.sampling import sample as run_sampler
from cdm.models.multi_adapter import MultiShardUNet

DENSE = ("average", "classifier", "knn", "fixed")  # methods a dense step may serve (topk skips)
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


def build_sampling_scheduler(name: str, scheduler_kwargs: dict):
    """A diffusers scheduler for sampling with the backbone's training noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {sorted(SCHEDULERS)}")
    kwargs = dict(scheduler_kwargs)
    if name == "dpm++":
        kwargs.update(algorithm_type="dpmsolver++", solver_order=2)
    return SCHEDULERS[name](**kwargs)


@dataclass
class ComposedDenoiser:
    """eps(x_t, t) of the CDM mixture (Prop. 3.1) over the allowed shards.

    method: classifier | knn | average | random | fixed | topk.
    ``router(x_t, t) -> logits [B, n]`` is needed by classifier/knn/topk; ``prior`` is lambda.
    ``label_prior`` [num_labels, n] is P(shard | label) for class-conditional sampling: the
    router's posterior then uses it in place of lambda, P(z | x_t, y) ~ P(z | x_t) P(z | y) / P(z)
    (exact when each label lives in one shard, as with by-class shards).
    """

    model: MultiShardUNet
    method: str
    prior: torch.Tensor
    allowed: torch.Tensor | None = None
    router: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    train_log_prior: torch.Tensor | None = None
    fixed: torch.Tensor | None = None
    topk: int | None = None
    threshold: float | None = None
    label_prior: torch.Tensor | None = None
    guidance_scale: float = 1.0
    null_label: int | None = None
    generator: torch.Generator | None = None
    dense: Callable | None = None  # e.g. GraphedDense(model): every pair in one CUDA graph replay
    trace: list[torch.Tensor] = field(default_factory=list)
    evaluated_pairs: int = 0

    def __post_init__(self) -> None:
        n = self.model.n_shards
        self.prior = C.normalize_priors(self.prior.double()).float()
        if self.allowed is None:
            self.allowed = torch.ones(n, dtype=torch.bool)
        if self.method in ("classifier", "topk", "knn") and self.router is None:
            raise ValueError(
                f"composition={self.method} needs a router (train one: cdm-train stage=router)"
            )
        if self.method == "fixed" and self.fixed is None:
            raise ValueError("composition=fixed needs weights: fixed_weights=[w_0, ..., w_n-1]")

    def weights(
        self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """w [B, n] for this step, zero on disallowed shards, rows summing to one."""
        batch = x_t.shape[0]
        prior = C.mask_weights(self.prior[None], self.allowed)[0]
        if self.method == "average":
            w = C.average_weights(batch, prior)
        elif self.method == "random":
            w = C.random_selection_weights(batch, prior, self.generator)
        elif self.method == "fixed":
            w = C.fixed_weights(batch, self.fixed)
        else:  # classifier, knn, topk: the router's posterior under the mixture prior lambda
            # weights live on the CPU ([B, n] is tiny; the trace is kept there anyway)
            logits = self.router(x_t, t).float().cpu()
            if self.label_prior is not None and labels is not None:
                log_prior = torch.log(self.label_prior[labels.cpu()])  # -inf: label not in shard
            else:
                log_prior = torch.log(self.prior.clamp_min(1e-30))
            w = C.router_posterior(logits, log_prior, self.train_log_prior)
        w = C.mask_weights(w, self.allowed)
        if self.method == "topk":
            w = C.topk_weights(w, k=self.topk, threshold=self.threshold)
        return w

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
            and self.method in DENSE
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


def sample_composed(
    denoiser: ComposedDenoiser,
    scheduler,
    *,
    num_samples: int,
    shape: Sequence[int],
    steps: int,
    labels: torch.Tensor | None,
    seed: int,
    batch_size: int,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples [N, C, H, W] in [-1, 1], trace [N, steps, n]), both on the CPU: reverse process of the CDM.

    Noise is drawn on the CPU from the seeded generator and moved to ``device``, so a seed gives
    the same x_T on every device.
    """
    from tqdm.auto import tqdm

    images, traces = [], []
    starts = range(0, num_samples, batch_size)
    bar = tqdm(total=len(starts) * steps, desc="sampling (batches x steps)", disable=not progress)
    for start in starts:
        stop = min(start + batch_size, num_samples)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        denoiser.generator = generator
        denoiser.trace = []
        x_T = torch.randn((stop - start, *shape), generator=generator).to(device)
        y = None if labels is None else labels[start:stop].to(device)
        x0 = run_sampler(
            lambda x, t, y=y: denoiser(x, t, y), scheduler, x_T, steps, generator=generator,
            callback=lambda *_: bar.update(1),
        )  # fmt: skip
        images.append(x0.clamp(-1, 1).cpu())
        traces.append(torch.stack(denoiser.trace, dim=1).cpu())
    bar.close()
    return torch.cat(images), torch.cat(traces)
