"""Issue 13: the sign of TRAK with the training-loss output function, against exact refits.

A denoiser linear in its parameters, eps_theta(x_t) = W x_t + b, trained on fixed probes (the
(t, eps) pairs of ``make_probes``) with a ridge penalty, has a quadratic training objective: every
subset's model is a closed-form least-squares solution, so leave-group-out and the LDS's subsets
are retrained exactly. gamma is the FD (lower is better) of DDIM samples from fixed noise. TRAK goes
through the project's own path: ``per_sample_gradients(output="loss")`` -> ``property_gradient``
through ``ddim_sample_fn`` -> ``trak_scores`` -> ``group_scores`` -> ``linear_datamodeling_score``.
On this convex problem the scores must rank the groups as the refits do; a flipped sign anywhere on
the path (the minus of the Newton step, the target gradient, the group sums, the LDS's direction)
turns every correlation below negative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from scipy.stats import spearmanr
from torch import nn

from cdm.attribution import trak
from cdm.attribution.datamodels import fit_datamodel, sample_subsets
from cdm.attribution.lds import linear_datamodeling_score
from cdm.core.diffusion import q_sample
from cdm.eval.frechet import FeatureStats

SHAPE = (1, 2, 2)  # 4 pixels: a 4-D data set
DIM = 4
GROUPS, PER_GROUP = 8, 6
PROBES = 10  # fixed (t, eps) pairs: the training objective and TRAK's output function share them
RIDGE = 1e-2


class LinearDenoiser(nn.Module):
    """eps_theta(x_t, t) = W x_t + b: the training loss is quadratic in (W, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM, dtype=torch.float64)

    def forward(self, x_t, timesteps, class_labels=None, return_dict=False):
        return (self.lin(x_t.flatten(1).double()).view_as(x_t),)


class ConvexProblem:
    """Eight clusters of six points (the groups), their exact refits, gamma and TRAK's inputs."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        centres = torch.rand(GROUPS, DIM, generator=gen, dtype=torch.float64) * 1.6 - 0.8
        noise = 0.15 * torch.randn(GROUPS * PER_GROUP, DIM, generator=gen, dtype=torch.float64)
        points = (centres.repeat_interleave(PER_GROUP, 0) + noise).clamp(-1, 1)
        self.images = points.view(-1, *SHAPE)
        self.members = [list(range(g * PER_GROUP, (g + 1) * PER_GROUP)) for g in range(GROUPS)]
        self.scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False
        )
        self.abar = self.scheduler.alphas_cumprod
        self.probes = trak.make_probes(SHAPE, num_timesteps=PROBES, seed=0)
        x_T = torch.randn(64, *SHAPE, generator=gen, dtype=torch.float64)
        reference = FeatureStats(mu=points.mean(0).numpy(), sigma=np.cov(points.numpy().T), n=48)
        self.gamma_fn = trak.frechet_property_fn(lambda images: images.flatten(1), reference)
        self.sample_fn = trak.ddim_sample_fn(self.scheduler, x_T, 5)

    def fit(self, groups: list[int]) -> LinearDenoiser:
        """argmin_theta sum_j l_j(theta) + RIDGE/2 |theta|^2 over the groups' samples, exactly;
        l_j = mean over probes and pixels of (eps_theta(x_t) - eps)^2 (``loss_output``)."""
        rows = [i for g in groups for i in self.members[g]]
        k = self.probes.timesteps.shape[0]
        x_t = torch.stack(
            [
                q_sample(
                    self.images[j].expand(k, *SHAPE), self.probes.noise, self.probes.timesteps,
                    self.abar,
                )
                for j in rows
            ]
        ).reshape(-1, DIM)  # fmt: skip
        z = torch.cat([x_t.double(), torch.ones(len(x_t), 1, dtype=torch.float64)], dim=1)
        eps = self.probes.noise.double().reshape(1, k, DIM).expand(len(rows), k, DIM)
        c = 2.0 / (k * DIM)
        eye = torch.eye(DIM + 1, dtype=torch.float64)
        theta = torch.linalg.solve(c * z.T @ z + RIDGE * eye, c * z.T @ eps.reshape(-1, DIM))
        model = LinearDenoiser()
        with torch.no_grad():
            model.lin.weight.copy_(theta[:DIM].T)
            model.lin.bias.copy_(theta[DIM])
        return model

    def gamma(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(self.gamma_fn(self.sample_fn(model)))

    def trak_group_scores(self, model: nn.Module, output: str) -> np.ndarray:
        phi = trak.per_sample_gradients(
            model, self.images, None, alphas_cumprod=self.abar, output=output,
            num_timesteps=PROBES, seed=0,
        )  # fmt: skip
        target = trak.property_gradient(model, self.sample_fn, self.gamma_fn)
        return trak.group_scores(trak.trak_scores(phi, target, damping=1e-3), self.members).numpy()


@pytest.fixture(scope="module")
def problem() -> ConvexProblem:
    return ConvexProblem()


@pytest.fixture(scope="module")
def full(problem: ConvexProblem) -> LinearDenoiser:
    return problem.fit(list(range(GROUPS)))


def test_the_denoiser_is_at_its_minimum(problem, full):
    """TRAK's Newton step assumes theta* minimises the training objective: check it does."""
    params = dict(full.named_parameters())
    grads = trak.per_sample_gradients(
        full, problem.images, None, alphas_cumprod=problem.abar, output="loss",
        num_timesteps=PROBES, seed=0,
    )  # fmt: skip
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    total = grads.sum(0) + RIDGE * flat
    assert total.norm() < 1e-6 * grads.norm(dim=1).max()


def test_trak_loss_ranks_leave_group_out_as_exact_refits_do(problem, full):
    """Predicted effect of including group G (sum of its members' tau) vs
    gamma(theta*) - gamma(theta*_{-G}) by exact refit: same ranking, not the reverse."""
    predicted = problem.trak_group_scores(full, "loss")
    gamma_full = problem.gamma(full)
    actual = np.array(
        [
            gamma_full - problem.gamma(problem.fit([h for h in range(GROUPS) if h != g]))
            for g in range(GROUPS)
        ]
    )
    assert (actual > 0).any() and (actual < 0).any()  # some groups help the FD, some hurt it
    rho = spearmanr(predicted, actual).statistic
    assert rho > 0.7, (rho, predicted, actual)


def test_trak_loss_has_a_positive_lds_on_refitted_subsets(problem, full):
    """The LDS path of the removal experiment (half subsets, ``linear_datamodeling_score``), and
    agreement with a ridge datamodel fitted on the same exact refits."""
    masks = sample_subsets(GROUPS, 24, alpha=0.5, seed=1)
    gammas = np.array([problem.gamma(problem.fit(np.flatnonzero(mask).tolist())) for mask in masks])
    predicted = problem.trak_group_scores(full, "loss")
    lds = linear_datamodeling_score(masks, gammas, predicted)
    assert lds.value > 0.3, lds
    datamodel = fit_datamodel(masks, gammas)
    assert spearmanr(datamodel.tau, predicted).statistic > 0.7
