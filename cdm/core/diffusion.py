"""Forward process and the denoising objective (DDPM, Ho et al. 2020), pure torch."""

from __future__ import annotations

import torch


def step_generator(
    seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded by (seed, step, rank) alone, so noise never depends on RNG history.

    This is what makes a resumed run bit-identical to an uninterrupted one.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 9_973 + rank * 101) % (2**63 - 1))
    return generator


def sample_noise_and_timesteps(
    x0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw eps ~ N(0, I) and t ~ U{0, ..., T-1} for a batch."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    timesteps = torch.randint(
        0, num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device
    )
    return noise, timesteps


def q_sample(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    abar = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps]
    abar = abar.view(-1, *([1] * (x0.dim() - 1)))
    return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(x0.dtype)


def epsilon_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Simplified DDPM objective || eps - eps_theta(x_t, t) ||^2 (DDPM eq. 14), mean over all."""
    return torch.mean((eps_pred.float() - noise.float()) ** 2)


def per_sample_epsilon_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPM eq. 14 per sample (mean over pixels), for evaluation on held-out images."""
    return ((eps_pred.float() - noise.float()) ** 2).flatten(1).mean(dim=1)
