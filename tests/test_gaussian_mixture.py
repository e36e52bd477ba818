"""Exactness of the CDM composition on an analytic Gaussian mixture (Prop. 3.1), in float64.

Three isotropic Gaussians in d=2 with unequal priors lambda. Under the VP forward process
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, component i at time t is
N(sqrt(abar_t) mu_i, (abar_t s_i^2 + 1 - abar_t) I), so every shard's epsilon and the exact router
P(z = i | x_t) are closed-form. The composed epsilon must equal the mixture's epsilon computed
independently (autograd of log sum_i lambda_i N(...) via torch.distributions), sampling with it
must reproduce the mixture's moments and component shares, and naive averaging must fail both.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from cdm.core.composition import (
    average_weights,
    mask_weights,
    mix_epsilons,
    normalize_priors,
    random_selection_weights,
    router_posterior,
)
from cdm.core.sampling import eps_from_score, sample

D64 = torch.float64
MU = torch.tensor([[-3.0, 0.0], [2.5, 2.0], [1.0, -3.0]], dtype=D64)  # component means
STD = torch.tensor([0.4, 0.7, 1.0], dtype=D64)  # isotropic standard deviations
LAM = torch.tensor([0.5, 0.3, 0.2], dtype=D64)  # mixture priors, not uniform
DIM = 2
NUM_TRAIN_TIMESTEPS = 1000


@pytest.fixture(autouse=True)
def _one_thread():
    """Small float64 ops are faster (and timings steadier) on one thread on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _alphas_cumprod() -> torch.Tensor:
    sched = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2"
    )
    return sched.alphas_cumprod.to(D64)


# ---------------------------------------------------------------- per-shard closed forms


def shard_log_densities_and_eps(
    x: torch.Tensor, abar: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p_t^i(x) [B, n] and eps_i(x, t) = -sqrt(1 - abar) score_i(x, t) [n, B, d]."""
    abar = torch.as_tensor(abar, dtype=D64)
    mean = abar.sqrt() * MU  # [n, d]
    var = abar * STD**2 + 1 - abar  # [n]
    diff = x[:, None, :] - mean[None]  # [B, n, d]
    log_p = -0.5 * (diff**2).sum(-1) / var - 0.5 * DIM * torch.log(2 * math.pi * var)
    score = -diff / var[None, :, None]
    return log_p, eps_from_score(score, (1 - abar).sqrt()).permute(1, 0, 2)


def composed_eps(x: torch.Tensor, abar: float | torch.Tensor, lam: torch.Tensor = LAM):
    """Prop. 3.1 with the exact router: w = softmax(log p_t^i + log lambda)."""
    log_p, eps = shard_log_densities_and_eps(x, abar)
    return mix_epsilons(eps, router_posterior(log_p, log_prior=lam.log()))


def true_mixture_eps(x: torch.Tensor, abar: float | torch.Tensor, lam: torch.Tensor = LAM):
    """eps = -sqrt(1 - abar) grad_x log sum_i lambda_i N(x; sqrt(abar) mu_i, v_i I), by autograd."""
    abar = torch.as_tensor(abar, dtype=D64)
    var = abar * STD**2 + 1 - abar
    cov = var[:, None, None] * torch.eye(DIM, dtype=D64)
    keep = lam > 0
    mixture = MixtureSameFamily(
        Categorical(probs=lam[keep]), MultivariateNormal(abar.sqrt() * MU[keep], cov[keep])
    )
    x = x.detach().clone().requires_grad_(True)
    (score,) = torch.autograd.grad(mixture.log_prob(x).sum(), x)
    return -(1 - abar).sqrt() * score


def _points(num: int, seed: int) -> torch.Tensor:
    """Points spread over the data, the gaps between components and beyond (a wide box)."""
    g = torch.Generator().manual_seed(seed)
    return 8 * torch.rand(num, DIM, generator=g, dtype=D64) - 4 + 0.5 * MU.mean(0)


TIMESTEPS = [0, 1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 990, 999]


# ---------------------------------------------------------------- (1) exactness of eq. 5


def test_composed_epsilon_equals_mixture_epsilon():
    abars = _alphas_cumprod()
    x = _points(2000, seed=0)
    for t in TIMESTEPS:
        torch.testing.assert_close(
            composed_eps(x, abars[t]), true_mixture_eps(x, abars[t]), rtol=1e-9, atol=1e-10
        )
    # Also off the scheduler's grid, for any abar in (0, 1].
    for abar in torch.linspace(1e-6, 1.0, 23, dtype=D64):
        torch.testing.assert_close(
            composed_eps(x, abar), true_mixture_eps(x, abar), rtol=1e-9, atol=1e-10
        )


@pytest.mark.parametrize(
    "allowed", [[True, False, True], [False, True, True], [True, False, False]]
)
def test_masked_composition_is_the_exact_sub_mixture(allowed):
    """Forgetting / access rights: masking shards gives exactly the mixture of the rest."""
    allowed_t = torch.tensor(allowed)
    lam_sub = normalize_priors(torch.where(allowed_t, LAM, torch.zeros_like(LAM)))
    abars = _alphas_cumprod()
    x = _points(500, seed=1)
    for t in TIMESTEPS:
        log_p, eps = shard_log_densities_and_eps(x, abars[t])
        w = mask_weights(router_posterior(log_p, log_prior=LAM.log()), allowed_t)
        torch.testing.assert_close(
            mix_epsilons(eps, w), true_mixture_eps(x, abars[t], lam_sub), rtol=1e-9, atol=1e-10
        )


# ---------------------------------------------------------------- (3) naive averaging is wrong


def test_naive_averaging_is_not_the_mixture_epsilon():
    abars = _alphas_cumprod()
    x = _points(2000, seed=2)
    for t in [0, 50, 200, 400]:
        log_p, eps = shard_log_densities_and_eps(x, abars[t])
        naive = mix_epsilons(eps, average_weights(x.shape[0], LAM))
        err = (naive - true_mixture_eps(x, abars[t])).abs().max()
        assert err > 0.1, (t, err)
    # Only where the noised components have all merged into N(0, I) does averaging become right.
    log_p, eps = shard_log_densities_and_eps(x, abars[999])
    naive = mix_epsilons(eps, average_weights(x.shape[0], LAM))
    torch.testing.assert_close(naive, true_mixture_eps(x, abars[999]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- (2) sampling


def _mixture_moments(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = lam @ MU
    second = sum(
        lam[i] * (STD[i] ** 2 * torch.eye(DIM, dtype=D64) + torch.outer(MU[i], MU[i]))
        for i in range(len(lam))
    )
    return mean, second - torch.outer(mean, mean)


def _z_scores(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Deviations of sample mean, covariance and component shares from the mixture's, in SEs."""
    n = x.shape[0]
    mean, cov = _mixture_moments(LAM)
    z_mean = (x.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    centred = x - x.mean(0)
    pairs = [(0, 0), (0, 1), (1, 1)]
    prods = torch.stack([centred[:, a] * centred[:, b] for a, b in pairs], dim=1)
    emp_cov = torch.cov(x.T)
    z_cov = torch.stack(
        [
            (emp_cov[a, b] - cov[a, b]) / (prods[:, k].std() / math.sqrt(n))
            for k, (a, b) in enumerate(pairs)
        ]
    )
    # Assign each sample to the component with the highest posterior at t = 0. The components
    # are far apart, so the expected share of misassigned samples (< 1e-3) is well below the SE.
    log_p, _ = shard_log_densities_and_eps(x, 1.0)
    labels = router_posterior(log_p, log_prior=LAM.log()).argmax(dim=1)
    shares = torch.bincount(labels, minlength=len(LAM)).to(D64) / n
    z_share = (shares - LAM) / (LAM * (1 - LAM) / n).sqrt()
    return {"mean": z_mean, "cov": z_cov, "share": z_share}


def _sampler() -> DPMSolverMultistepScheduler:
    """A stochastic, second-order diffusers sampler (SDE-DPM-Solver++ 2M, 100 steps).

    With the exact epsilon, DDPM/DDIM at 100-200 steps under-disperse here (DDPM-200 gives the
    thin component's variance ~4% low; covariance biases of -1.2 SE for DDPM-200, -2.2 for
    DDIM-200, -4 for DDIM-100, in SEs of a 20k-sample run; DDPM-1000 about -0.6): their
    discretisation error, not the composition's. SDE-DPM-Solver++ 2M at 100 steps showed no
    bias beyond noise (|z| <= 0.3 at 200k samples), so the test can use tight bounds.
    """
    return DPMSolverMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        algorithm_type="sde-dpmsolver++",
        timestep_spacing="trailing",
    )


def _sample(weights_fn, num_samples: int, seed: int) -> torch.Tensor:
    scheduler = _sampler()
    abars = scheduler.alphas_cumprod.to(D64)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_p, eps = shard_log_densities_and_eps(x, abars[int(t)])
        return mix_epsilons(eps, weights_fn(log_p))

    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(num_samples, DIM, generator=g, dtype=D64)
    x_0 = sample(denoise, scheduler, x_T, 100, generator=g)
    assert x_0.dtype == D64 and torch.isfinite(x_0).all()
    return x_0


def test_sampling_with_composed_epsilon_reproduces_the_mixture():
    x = _sample(lambda log_p: router_posterior(log_p, log_prior=LAM.log()), 20_000, seed=0)
    z = _z_scores(x)
    assert (z["mean"].abs() < 4).all(), z
    assert (z["cov"].abs() < 4).all(), z
    assert (z["share"].abs() < 3).all(), z  # 3 sigma of the binomial


@pytest.mark.parametrize("composition", ["average", "random"])
def test_sampling_with_naive_averaging_or_random_selection_fails(composition):
    """The same check rejects the baselines: their sampler does not produce the mixture."""
    g = torch.Generator().manual_seed(1)

    def weights_fn(log_p: torch.Tensor) -> torch.Tensor:
        if composition == "average":
            return average_weights(log_p.shape[0], LAM)
        return random_selection_weights(log_p.shape[0], LAM, generator=g)

    z = _z_scores(_sample(weights_fn, 2_000, seed=0))
    worst = max(float(v.abs().max()) for v in z.values())
    assert worst > 10, z
