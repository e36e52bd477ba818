"""Divergence of a vector field f: R^D -> R^D per sample, exactly or by Hutchinson's estimator.

``f`` maps a batch ``x`` [B, ...] to [B, ...] and must treat the samples independently (no
batch-norm in training mode, no mixing across the batch): then one vector-Jacobian product with a
batch of probes gives every sample's v^T J_b at once.

- exact: tr(J) = sum_d e_d^T J e_d, one VJP per dimension (small D only);
- Hutchinson (1990): tr(J) = E[v^T J v] for Rademacher v (+-1, E[v v^T] = I), averaged over
  ``n_probes`` probes; its variance is 2 (||J||_F^2 - sum_d J_dd^2) / n_probes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VectorField = Callable[[torch.Tensor], torch.Tensor]

MAX_EXACT_DIM = 4096


def vjp_with_graph(f: VectorField, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with grad enabled, f(x)): the leaf and output every VJP below differentiates."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(x)
    if y.shape != x.shape:
        raise ValueError(
            f"divergence: f must map [B, ...] to the same shape; {x.shape} -> {y.shape}"
        )
    return x, y


def exact_divergence(f: VectorField, x: torch.Tensor) -> torch.Tensor:
    """tr(df/dx) for each sample [B], from the full Jacobian diagonal (one VJP per dimension)."""
    dim = x[0].numel()
    if dim > MAX_EXACT_DIM:
        raise ValueError(
            f"exact_divergence: {dim} dimensions need {dim} backward passes; use "
            f"hutchinson_divergence beyond {MAX_EXACT_DIM}"
        )
    x, y = vjp_with_graph(f, x)
    batch = x.shape[0]
    total = torch.zeros(batch, dtype=y.dtype, device=y.device)
    for d in range(dim):
        probe = torch.zeros(batch, dim, dtype=y.dtype, device=y.device)
        probe[:, d] = 1.0
        (grad,) = torch.autograd.grad(y, x, probe.view_as(y), retain_graph=d < dim - 1)
        total = total + grad.reshape(batch, dim)[:, d]
    return total.detach()


def hutchinson_divergence(
    f: VectorField,
    x: torch.Tensor,
    *,
    n_probes: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hutchinson's estimate of tr(df/dx) per sample [B]: mean over Rademacher probes of v^T J v.

    Probes are drawn on the CPU from ``generator`` (then moved), so a seed gives the same probes
    on every device.
    """
    if n_probes < 1:
        raise ValueError(f"hutchinson_divergence: n_probes must be >= 1, got {n_probes}")
    x, y = vjp_with_graph(f, x)
    batch = x.shape[0]
    total = torch.zeros(batch, dtype=y.dtype, device=y.device)
    for k in range(n_probes):
        bits = torch.randint(0, 2, tuple(y.shape), generator=generator, dtype=torch.int64)
        probe = (2 * bits - 1).to(device=y.device, dtype=y.dtype)
        (grad,) = torch.autograd.grad(y, x, probe, retain_graph=k < n_probes - 1)
        total = total + (grad * probe).reshape(batch, -1).sum(1)
    return (total / n_probes).detach()


class Divergence:
    """A divergence method for ``cdm.attribution.credit``: ``div(f, x) -> [B]``."""

    name: str = "divergence"

    def __call__(self, f: VectorField, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class ExactDivergence(Divergence):
    """The full Jacobian trace (small dimensions)."""

    name: str = "exact"

    def __call__(self, f: VectorField, x: torch.Tensor) -> torch.Tensor:
        return exact_divergence(f, x)


@dataclass
class HutchinsonDivergence(Divergence):
    """Hutchinson's estimator with ``n_probes`` Rademacher probes from a generator seeded once
    with ``seed`` (so successive calls draw fresh probes, reproducibly)."""

    n_probes: int = 1
    seed: int = 0
    name: str = "hutchinson"

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, f: VectorField, x: torch.Tensor) -> torch.Tensor:
        return hutchinson_divergence(f, x, n_probes=self.n_probes, generator=self.generator)
