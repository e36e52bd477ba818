"""TRAK / D-TRAK baseline (cdm.attribution.trak): per-sample gradients, projection, scores, the
differentiable FD target through DDIM."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from cdm.attribution.trak import (
    Projector,
    ddim_sample_fn,
    differentiable_features,
    frechet_distance_torch,
    frechet_property_fn,
    group_scores,
    make_probes,
    per_sample_gradients,
    property_gradient,
    random_projection,
    symmetric_sqrt,
    trak_scores,
)
from cdm.eval.frechet import FeatureStats, frechet_distance, stats_from_features
from cdm.jobs.evaluate import PixelFeatures
from cdm.models.adapters import lora_adapter, trainable_parameters
from cdm.models.backbone import build_scheduler, build_unet
from cdm.models.feature_net import DomainFeatures, FeatureNet
from tests.conftest import TINY_ATTN_UNET

SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


@pytest.fixture(scope="module")
def lora_unet() -> torch.nn.Module:
    """A tiny class-conditional 8x8 UNet with random (non-zero) LoRA factors."""
    torch.manual_seed(0)
    unet = build_unet("unet2d", TINY_ATTN_UNET, sample_size=8, channels=1, num_classes=10)
    model = lora_adapter(unet, rank=2, alpha=2, target_modules=["to_q", "to_v", "conv1"])
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return model.eval()


def reference_gradients(model, images, labels, abar, output, num_timesteps, seed):
    """A plain autograd loop, written out without the module's helpers."""
    probes = make_probes(images.shape[1:], num_timesteps=num_timesteps, seed=seed)
    t, noise = probes.timesteps, probes.noise
    a = abar[t].float().view(-1, 1, 1, 1)
    params = [p for _, p in trainable_parameters(model)]
    rows = []
    for x, y in zip(images, labels, strict=True):
        x_t = a.sqrt() * x + (1 - a).sqrt() * noise
        eps = model(x_t, t, class_labels=y.repeat(len(t))).sample
        target = noise if output == "loss" else torch.zeros_like(noise)
        f = ((eps - target) ** 2).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("output", ["dtrak", "loss"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_per_sample_gradients_equal_an_autograd_loop(lora_unet, output, vectorize):
    abar = build_scheduler(SCHEDULE).alphas_cumprod
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(5, 1, 8, 8, generator=gen) * 2 - 1
    labels = torch.randint(0, 10, (5,), generator=gen)
    grads = per_sample_gradients(
        lora_unet, images, labels, alphas_cumprod=abar, output=output, num_timesteps=3, seed=7,
        chunk_size=2, vectorize=vectorize,
    )  # fmt: skip
    n_lora = sum(p.numel() for n, p in lora_unet.named_parameters() if "lora_" in n)
    assert grads.shape == (5, n_lora)  # LoRA factors only, the frozen UNet excluded
    expected = reference_gradients(lora_unet, images, labels, abar, output, 3, 7)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(grads, expected, rtol=1e-4, atol=1e-6)


def test_probes_are_seeded_and_evenly_spaced():
    a = make_probes((1, 8, 8), num_timesteps=10, seed=3)
    b = make_probes((1, 8, 8), num_timesteps=10, seed=3)
    assert a.timesteps.tolist() == list(range(0, 1000, 100))
    assert torch.equal(a.noise, b.noise)
    assert not torch.equal(a.noise, make_probes((1, 8, 8), num_timesteps=10, seed=4).noise)
    r = make_probes((1, 8, 8), num_timesteps=10, seed=3, spacing="random").timesteps
    assert len(set(r.tolist())) == 10 and torch.equal(r, r.sort()[0])
    with pytest.raises(ValueError, match="dtrak"):
        per_sample_gradients(
            torch.nn.Linear(2, 2), torch.zeros(1, 1, 2, 2), None, alphas_cumprod=torch.ones(10),
            output="margin",
        )  # fmt: skip


def test_projection_is_seeded_chunk_free_and_preserves_inner_products():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(20, 3000, generator=gen, dtype=torch.float64)
    proj = Projector(3000, 2048, seed=5, block_rows=700)
    out = proj(grads)
    assert out.shape == (20, 2048)
    torch.testing.assert_close(out, Projector(3000, 2048, seed=5, block_rows=700)(grads))
    assert not torch.allclose(out, Projector(3000, 2048, seed=6, block_rows=700)(grads))
    # blocks generated one at a time are the one matrix P; samples projected apart = together
    torch.testing.assert_close(out, grads @ proj.matrix().double() / 2048**0.5)
    torch.testing.assert_close(out, torch.cat([proj(grads[:7]), proj(grads[7:])]))
    torch.testing.assert_close(random_projection(grads, 64, seed=1), Projector(3000, 64, 1)(grads))
    # JL: <Pu, Pv> ~ <u, v> with error ~ |u||v| / sqrt(dim) (0.022 here)
    unit = grads / grads.norm(dim=1, keepdim=True)
    pu = proj(unit)
    err = (pu @ pu.T - unit @ unit.T).abs().max()
    assert err < 0.1, err


def test_trak_scores_are_the_newton_step_of_ridge_regression():
    """Least squares + ridge: tau_j / (1 - h_jj) is exactly gamma(theta*) - gamma(theta_{-j})."""
    gen = torch.Generator().manual_seed(0)
    n, d, lam = 30, 5, 0.7
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    v = torch.randn(d, generator=gen, dtype=torch.float64)  # gamma(theta) = v . theta

    def fit(rows):
        xs, ys = x[rows], y[rows]
        return torch.linalg.solve(xs.T @ xs + lam * torch.eye(d, dtype=x.dtype), xs.T @ ys)

    theta = fit(list(range(n)))
    effect = torch.stack(
        [v @ (theta - fit([i for i in range(n) if i != j])) for j in range(n)]
    )  # what including j does to gamma, by refitting
    residual = x @ theta - y
    hinv = torch.linalg.inv(x.T @ x + lam * torch.eye(d, dtype=x.dtype))
    leverage = torch.einsum("ij,jk,ik->i", x, hinv, x)
    damping = lam * d / float(torch.trace(x.T @ x))  # relative damping giving lambda = lam
    tau = trak_scores(x, v, damping=damping, loss_weights=residual)
    torch.testing.assert_close(tau / (1 - leverage), effect, rtol=1e-8, atol=1e-10)
    assert (effect > 0).any() and (effect < 0).any()
    with pytest.raises(ValueError, match="raise damping"):
        trak_scores(x[:3], v, damping=0.0)


def test_group_scores_sum_members():
    tau = torch.tensor([1.0, 2.0, -4.0, 8.0])
    assert group_scores(tau, [[0, 2], [1, 3], []]).tolist() == [-3.0, 10.0, 0.0]
    with pytest.raises(ValueError, match="outside"):
        group_scores(tau, [[4]])


def test_frechet_distance_torch_matches_numpy_and_finite_differences():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    ref = stats_from_features(rng.normal(size=(80, 6)) * 1.5 + 0.3)
    mean, cov = torch.tensor(ref.mu), torch.tensor(ref.sigma)
    ours = float(frechet_distance_torch(torch.tensor(feats), mean, cov))
    theirs = frechet_distance(stats_from_features(feats), ref)
    assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    root = symmetric_sqrt(cov)
    torch.testing.assert_close(root @ root, cov)
    x = torch.tensor(feats[:12, :3], requires_grad=True)
    sub_mean, sub_cov = mean[:3], cov[:3, :3]
    assert torch.autograd.gradcheck(
        lambda f: frechet_distance_torch(f, sub_mean, sub_cov), (x,), eps=1e-6, atol=1e-6
    )


@pytest.fixture(scope="module")
def domain_space() -> DomainFeatures:
    """A random domain feature net on 8x8 images, as cdm-eval wraps it (float32)."""
    torch.manual_seed(3)
    net = FeatureNet(
        channels=1, resolution=8, n_classes=10, widths=(8,), feature_dim=4, norm_groups=4
    )
    return DomainFeatures(net, "digits", device="cpu")


def float64_space(space: DomainFeatures) -> DomainFeatures:
    return DomainFeatures(copy.deepcopy(space.net).double(), "digits", device="cpu")


def test_differentiable_features_agree_with_the_uint8_space(domain_space):
    gen = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (6, 1, 8, 8), generator=gen, dtype=torch.uint8)
    on_grid = uint8.double() / 127.5 - 1
    ours = differentiable_features(domain_space)(on_grid)
    np.testing.assert_allclose(ours.detach().numpy(), domain_space(uint8), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="domain"):
        differentiable_features(PixelFeatures(1, 8))


def test_property_gradient_through_ddim_matches_finite_differences(lora_unet, domain_space):
    model = copy.deepcopy(lora_unet).double()
    scheduler = DDIMScheduler(**SCHEDULE)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(16, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (16,), generator=gen)
    ref = stats_from_features(np.random.default_rng(1).normal(size=(40, 4)))
    space = float64_space(domain_space)
    gamma_fn = frechet_property_fn(differentiable_features(space), ref)
    sample_fn = ddim_sample_fn(scheduler, x_T, 3, labels)
    g = property_gradient(model, sample_fn, gamma_fn)
    params = [p for _, p in trainable_parameters(model)]
    assert g.shape == (sum(p.numel() for p in params),) and g.abs().max() > 0
    direction = torch.randn(g.shape, generator=gen, dtype=torch.float64)

    def gamma_at(h: float) -> float:
        with torch.no_grad():
            offset = 0
            for p in params:
                p += h * direction[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            value = float(gamma_fn(sample_fn(model)))
            offset = 0
            for p in params:
                p -= h * direction[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        return value

    h = 1e-5
    fd = (gamma_at(h) - gamma_at(-h)) / (2 * h)
    assert abs(fd - float(g @ direction)) <= 1e-4 * abs(fd), (fd, float(g @ direction))
    # the value itself is the FD of cdm.eval on the same (float) samples
    with torch.no_grad():
        feats = differentiable_features(space)(sample_fn(model)).numpy()
    assert abs(gamma_at(0.0) - frechet_distance(stats_from_features(feats), ref)) < 1e-6 * abs(
        gamma_at(0.0)
    )


def test_property_gradient_with_checkpointing_is_the_same(lora_unet, domain_space):
    model = copy.deepcopy(lora_unet).double()
    gen = torch.Generator().manual_seed(2)
    x_T = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,), generator=gen)
    ref = FeatureStats(mu=np.zeros(4), sigma=np.eye(4), n=10)
    gamma_fn = frechet_property_fn(differentiable_features(float64_space(domain_space)), ref)
    plain = property_gradient(
        model, ddim_sample_fn(DDIMScheduler(**SCHEDULE), x_T, 2, labels), gamma_fn
    )
    ckpt = property_gradient(
        model, ddim_sample_fn(DDIMScheduler(**SCHEDULE), x_T, 2, labels, checkpoint=True), gamma_fn
    )
    torch.testing.assert_close(plain, ckpt)
