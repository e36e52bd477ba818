"""Samplers over a `denoise(x_t, t) -> eps` callable, in the manner of k-diffusion's sampling.py.

The scheduler is duck-typed on diffusers' interface (`set_timesteps`, `timesteps`,
`scale_model_input`, `step(...).prev_sample`, optionally `init_noise_sigma` and
`config.prediction_type`); this module imports nothing but torch. A composed CDM denoiser
(`cdm.core.composition`) is just another `denoise`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]


def _per_sample(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] coefficient as a tensor broadcastable against like ([B, ...])."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.dim() == 1 and like.dim() > 1:
        v = v.reshape(-1, *([1] * (like.dim() - 1)))
    return v


@torch.no_grad()
def sample(
    denoise: Denoiser,
    scheduler: Any,
    x_T: torch.Tensor,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Integrate the reverse process (paper eq. 2) with a diffusers scheduler from x_T ~ N(0, I).

    x_T is unit Gaussian noise and is scaled by `scheduler.init_noise_sigma` (1 for DDPM/DDIM),
    as diffusers pipelines do. At each timestep t of `scheduler.timesteps`:
    eps = denoise(scale_model_input(x, t), t), x = step(eps, t, x, generator).prev_sample;
    then callback(step_index, t, x) if given. The scheduler must predict epsilon.
    """
    config = getattr(scheduler, "config", None)
    prediction_type = getattr(config, "prediction_type", "epsilon")
    if prediction_type != "epsilon":
        raise ValueError(
            f"sample() feeds epsilon to the scheduler, but its prediction_type is {prediction_type!r}"
        )
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps, device=x_T.device)
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(scheduler.timesteps):
        eps = denoise(scheduler.scale_model_input(x, t), t)
        if eps.shape != x.shape:
            raise ValueError(f"denoise returned shape {tuple(eps.shape)} for x {tuple(x.shape)}")
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
        if callback is not None:
            callback(i, t, x)
    return x


def tweedie_x0(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor | float
) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Tweedie; DDPM eq. 15); abar: scalar or [B]."""
    abar = _per_sample(alpha_bar_t, x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_score(score: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """eps = -sigma_t * score, sigma_t = sqrt(1 - abar_t) for VP; sigma: scalar or [B]."""
    return -_per_sample(sigma, score) * score


def score_from_eps(eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """score = -eps / sigma_t, the inverse of `eps_from_score`; sigma: scalar or [B]."""
    return -eps / _per_sample(sigma, eps)
