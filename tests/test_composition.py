"""Unit tests of the pure composition core (Prop. 3.1 weights, gating, mixing, merging) and samplers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cdm.core.composition import (
    COMPOSITIONS,
    active_pairs,
    average_weights,
    fixed_weights,
    mask_weights,
    merge_lora_deltas,
    merge_lora_weights,
    mix_epsilons,
    mix_selected,
    normalize_priors,
    priors_from_sizes,
    random_selection_weights,
    router_posterior,
    topk_weights,
)
from cdm.core.sampling import eps_from_score, sample, score_from_eps, tweedie_x0

D64 = torch.float64


def _rows_are_distributions(w: torch.Tensor) -> None:
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(w.shape[0], dtype=w.dtype))


def _random_weights(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(batch, n, generator=g, dtype=D64), dim=1)


# ---------------------------------------------------------------- priors


def test_priors_from_sizes_is_proportional_to_sizes():
    lam = priors_from_sizes([10, 30, 60])
    torch.testing.assert_close(lam, torch.tensor([0.1, 0.3, 0.6], dtype=D64))
    assert lam.dtype == D64


def test_normalize_priors():
    torch.testing.assert_close(normalize_priors(torch.tensor([2.0, 2.0])), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(
        normalize_priors([1, 0, 3]), torch.tensor([0.25, 0, 0.75], dtype=D64)
    )


@pytest.mark.parametrize(
    "bad, match",
    [([0, 0], "all be zero"), ([1, -1], "non-negative"), ([], "non-empty"), ([[1, 2]], "1-D")],
)
def test_priors_reject_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_priors(torch.tensor(bad, dtype=D64))
    with pytest.raises(ValueError, match=match):
        priors_from_sizes(bad)


def test_compositions_constant():
    assert COMPOSITIONS == (
        "classifier",
        "compartmental",
        "knn",
        "average",
        "random",
        "fixed",
        "topk",
        "weight_merge",
    )


# ---------------------------------------------------------------- router posterior


def test_router_posterior_prior_correction_is_bayes_rule():
    """A classifier trained with class frequencies pi, re-targeted to the mixture prior lambda."""
    g = torch.Generator().manual_seed(0)
    log_lik = torch.randn(5, 3, generator=g, dtype=D64)  # log p_t^i(x) for 5 samples
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=D64)  # label frequencies seen by the classifier
    lam = torch.tensor([0.2, 0.2, 0.6], dtype=D64)  # the mixture we want to sample
    # The classifier's output at convergence: P_pi(z | x), given as logits up to a row constant.
    classifier_logits = torch.log(torch.softmax(log_lik + pi.log(), dim=1)) + 7.0
    w = router_posterior(classifier_logits, log_prior=lam.log(), train_log_prior=pi.log())
    # Bayes' rule by hand: lambda_i p_i / sum_j lambda_j p_j.
    joint = lam * log_lik.exp()
    torch.testing.assert_close(w, joint / joint.sum(dim=1, keepdim=True))


def test_router_posterior_defaults_are_uniform():
    logits = torch.tensor([[0.0, 1.0, 2.0]], dtype=D64)
    torch.testing.assert_close(router_posterior(logits), torch.softmax(logits, dim=1))
    uniform = torch.full((3,), math.log(1 / 3), dtype=D64)
    torch.testing.assert_close(
        router_posterior(logits, log_prior=uniform, train_log_prior=uniform),
        torch.softmax(logits, dim=1),
    )


def test_router_posterior_zero_prior_excludes_shard():
    logits = torch.tensor([[5.0, 0.0, 0.0]], dtype=D64)
    w = router_posterior(logits, log_prior=torch.tensor([-math.inf, 0.0, 0.0], dtype=D64))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 0.5]], dtype=D64))


def test_router_posterior_errors():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"logits must be \[B, n\]"):
        router_posterior(torch.zeros(3))
    with pytest.raises(ValueError, match="train_log_prior must be"):
        router_posterior(logits, train_log_prior=torch.zeros(2))
    with pytest.raises(ValueError, match="train_log_prior must be finite"):
        router_posterior(logits, train_log_prior=torch.tensor([0.0, -math.inf, 0.0]))
    with pytest.raises(ValueError, match="log_prior must be"):
        router_posterior(logits, log_prior=torch.zeros(4))
    with pytest.raises(ValueError, match="zero prior to every shard"):
        router_posterior(logits, log_prior=torch.full((3,), -math.inf))


# ---------------------------------------------------------------- masking


def test_mask_weights_renormalises_and_never_weights_disallowed():
    w = _random_weights(64, 5)
    allowed = torch.tensor([True, False, True, False, True])
    m = mask_weights(w, allowed)
    _rows_are_distributions(m)
    assert (m[:, ~allowed] == 0).all()
    expected = w[:, allowed] / w[:, allowed].sum(dim=1, keepdim=True)
    torch.testing.assert_close(m[:, allowed], expected)


def test_mask_weights_equals_posterior_of_the_allowed_sub_mixture():
    """Masking after the softmax == Bayes with lambda restricted to the allowed shards."""
    g = torch.Generator().manual_seed(1)
    log_lik = torch.randn(8, 4, generator=g, dtype=D64)
    lam = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D64)
    allowed = torch.tensor([True, True, False, True])
    masked = mask_weights(router_posterior(log_lik, lam.log()), allowed)
    lam_sub = torch.where(allowed, lam, torch.zeros_like(lam))
    direct = router_posterior(log_lik, lam_sub.log())
    torch.testing.assert_close(masked, direct)


def test_mask_weights_falls_back_to_uniform_over_allowed():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], dtype=D64)
    m = mask_weights(w, torch.tensor([False, True, True]))
    torch.testing.assert_close(m[0], torch.tensor([0.0, 0.5, 0.5], dtype=D64))
    torch.testing.assert_close(m[1], torch.tensor([0.0, 0.375, 0.625], dtype=D64))


def test_mask_weights_errors():
    w = _random_weights(2, 3)
    with pytest.raises(ValueError, match="no shard is allowed"):
        mask_weights(w, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        mask_weights(w, torch.ones(3))
    with pytest.raises(ValueError, match="bool tensor"):
        mask_weights(w, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-negative"):
        mask_weights(-w, torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------- top-k


def test_topk_keeps_the_k_largest():
    w = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]], dtype=D64)
    out = topk_weights(w, k=2)
    expected = torch.tensor(
        [[0, 0.5 / 0.75, 0, 0.25 / 0.75], [0.4 / 0.7, 0.3 / 0.7, 0, 0]], dtype=D64
    )
    torch.testing.assert_close(out, expected)


def test_topk_threshold_and_combined():
    w = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]], dtype=D64)
    out = topk_weights(w, threshold=0.2)
    torch.testing.assert_close(out[0], torch.tensor([0, 0.5 / 0.75, 0, 0.25 / 0.75], dtype=D64))
    torch.testing.assert_close(
        out[1], torch.tensor([0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0], dtype=D64)
    )
    both = topk_weights(w, k=2, threshold=0.3)  # at most 2, each >= 0.3
    torch.testing.assert_close(both[0], torch.tensor([0, 1.0, 0, 0], dtype=D64))
    torch.testing.assert_close(both[1], torch.tensor([0.4 / 0.7, 0.3 / 0.7, 0, 0], dtype=D64))


def test_topk_always_keeps_the_argmax():
    w = torch.tensor([[0.3, 0.35, 0.35 - 1e-3, 1e-3]], dtype=D64)
    out = topk_weights(w, threshold=0.9)
    torch.testing.assert_close(out, torch.tensor([[0, 1.0, 0, 0]], dtype=D64))


def test_topk_full_is_identity_and_errors():
    w = _random_weights(16, 4)
    torch.testing.assert_close(topk_weights(w, k=4), w)
    _rows_are_distributions(topk_weights(w, k=1))
    with pytest.raises(ValueError, match="k and/or threshold"):
        topk_weights(w)
    with pytest.raises(ValueError, match=r"k must be in \[1, n=4\]"):
        topk_weights(w, k=0)
    with pytest.raises(ValueError, match=r"k must be in \[1, n=4\]"):
        topk_weights(w, k=5)
    with pytest.raises(ValueError, match="threshold must be non-negative"):
        topk_weights(w, threshold=-0.1)


# ---------------------------------------------------------------- baselines


def test_average_and_fixed_weights():
    lam = torch.tensor([0.2, 0.8], dtype=D64)
    torch.testing.assert_close(average_weights(3, lam), lam.expand(3, 2))
    torch.testing.assert_close(fixed_weights(3, lam), lam.expand(3, 2))
    with pytest.raises(ValueError, match="must sum to 1"):
        fixed_weights(3, torch.tensor([0.3, 0.3]))
    with pytest.raises(ValueError, match="non-negative"):
        fixed_weights(3, torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="must sum to 1"):
        average_weights(3, torch.tensor([1.0, 1.0]))


def test_random_selection_frequencies_match_the_prior():
    lam = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=D64)
    g = torch.Generator().manual_seed(0)
    n_draws = 20_000
    w = random_selection_weights(n_draws, lam, generator=g)
    assert ((w == 0) | (w == 1)).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(n_draws, dtype=D64))
    freq = w.mean(dim=0)
    se = (lam * (1 - lam) / n_draws).sqrt()
    assert ((freq - lam).abs() < 4 * se).all(), (freq, lam)
    # A fresh draw each call; the same seed gives the same draw.
    again = random_selection_weights(n_draws, lam, generator=g)
    assert not torch.equal(w, again)
    same = random_selection_weights(n_draws, lam, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, same)


def test_random_selection_never_picks_zero_prior_shard():
    lam = torch.tensor([0.5, 0.0, 0.5], dtype=D64)
    w = random_selection_weights(1000, lam, generator=torch.Generator().manual_seed(0))
    assert (w[:, 1] == 0).all()


# ---------------------------------------------------------------- mixing


def test_mix_epsilons_is_weighted_sum():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 4, 2, 5, 5, generator=g, dtype=D64)  # [n, B, C, H, W]
    w = _random_weights(4, 3)
    out = mix_epsilons(eps, w)
    expected = torch.stack([sum(w[b, i] * eps[i, b] for i in range(3)) for b in range(4)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mix_epsilons(list(eps), w), out)
    one_hot = torch.zeros(4, 3, dtype=D64)
    one_hot[:, 2] = 1
    torch.testing.assert_close(mix_epsilons(eps, one_hot), eps[2])


def test_mix_epsilons_shape_errors():
    with pytest.raises(ValueError, match=r"eps must be \[n=3, B=4"):
        mix_epsilons(torch.zeros(2, 4, 5), _random_weights(4, 3))
    with pytest.raises(ValueError, match=r"weights must be \[B, n\]"):
        mix_epsilons(torch.zeros(3, 4, 5), torch.ones(3))


def test_active_pairs_grouped_by_shard():
    w = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]], dtype=D64)
    sample_index, shard_index = active_pairs(w)
    assert shard_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert sample_index.tolist() == [0, 2, 1, 2, 0, 2]
    assert (w[sample_index, shard_index] > 0).all()
    assert int((w > 0).sum()) == sample_index.numel()


def test_mix_selected_equals_mix_epsilons():
    g = torch.Generator().manual_seed(0)
    n, batch = 4, 6
    eps = torch.randn(n, batch, 3, 2, generator=g, dtype=D64)
    w = _random_weights(batch, n)
    sample_index, shard_index = active_pairs(w)
    assert sample_index.numel() == n * batch  # all active
    out = mix_selected(eps[shard_index, sample_index], sample_index, shard_index, w, batch)
    torch.testing.assert_close(out, mix_epsilons(eps, w))
    # Sparse: after top-k only the kept pairs are evaluated, and the result is the same.
    wk = topk_weights(w, k=2)
    s_idx, i_idx = active_pairs(wk)
    assert s_idx.numel() == 2 * batch
    torch.testing.assert_close(
        mix_selected(eps[i_idx, s_idx], s_idx, i_idx, wk), mix_epsilons(eps, wk)
    )


def test_mix_selected_refuses_missing_pairs():
    w = _random_weights(3, 2)
    eps = torch.zeros(2, 3, 4, dtype=D64)
    s_idx, i_idx = active_pairs(w)
    keep = i_idx == 0
    with pytest.raises(ValueError, match="evaluate every pair with w > 0"):
        mix_selected(eps[i_idx[keep], s_idx[keep]], s_idx[keep], i_idx[keep], w)
    with pytest.raises(ValueError, match="batch=5 does not match"):
        mix_selected(eps[i_idx, s_idx], s_idx, i_idx, w, batch=5)
    with pytest.raises(ValueError, match="sample_index and shard_index must be"):
        mix_selected(eps[i_idx, s_idx], s_idx[:-1], i_idx, w)


# ---------------------------------------------------------------- weight merging


def _lora_sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "down.lora_A.weight": torch.randn(4, 16, generator=g),
        "down.lora_B.weight": torch.randn(8, 4, generator=g),
        "step": torch.tensor(3),
    }


def test_merge_of_one_adapter_is_identity():
    sd = _lora_sd(0)
    merged = merge_lora_weights([sd], [1.0])
    assert merged.keys() == sd.keys()
    for key in sd:
        assert merged[key].dtype == sd[key].dtype
        torch.testing.assert_close(merged[key], sd[key])
    delta = merge_lora_deltas([sd["down.lora_A.weight"]], [sd["down.lora_B.weight"]], [1.0])
    torch.testing.assert_close(
        delta, sd["down.lora_B.weight"].double() @ sd["down.lora_A.weight"].double()
    )


def test_merge_is_weighted_average_and_differs_from_delta_merge():
    sds = [_lora_sd(0), _lora_sd(1)]
    ws = [0.25, 0.75]
    merged = merge_lora_weights(sds, ws)
    for key in ("down.lora_A.weight", "down.lora_B.weight"):
        torch.testing.assert_close(merged[key], 0.25 * sds[0][key] + 0.75 * sds[1][key])
    As = [sd["down.lora_A.weight"] for sd in sds]
    Bs = [sd["down.lora_B.weight"] for sd in sds]
    delta = merge_lora_deltas(As, Bs, ws)
    expected = sum(w * b.double() @ a.double() for w, a, b in zip(ws, As, Bs, strict=True))
    torch.testing.assert_close(delta, expected)
    product_of_averages = (
        merged["down.lora_B.weight"].double() @ merged["down.lora_A.weight"].double()
    )
    assert (product_of_averages - delta).abs().max() > 1e-2  # the cross terms
    # The same delta in LoRA form with rank r_1 + r_2 (as documented).
    b_cat = torch.cat([w * b.double() for w, b in zip(ws, Bs, strict=True)], dim=1)
    torch.testing.assert_close(b_cat @ torch.cat([a.double() for a in As], dim=0), delta)


def test_merge_lora_deltas_conv_and_mixed_ranks():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(2, 3, 3, 3, generator=g), torch.randn(5, 3, 3, 3, generator=g)]
    Bs = [torch.randn(6, 2, 1, 1, generator=g), torch.randn(6, 5, 1, 1, generator=g)]
    delta = merge_lora_deltas(As, Bs, [0.5, 0.5])
    assert delta.shape == (6, 3, 3, 3)
    x = torch.randn(1, 3, 8, 8, generator=g, dtype=D64)
    conv = sum(
        0.5 * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a.double()), b.double())
        for a, b in zip(As, Bs, strict=True)
    )
    torch.testing.assert_close(torch.nn.functional.conv2d(x, delta), conv)


def test_merge_errors():
    sd = _lora_sd(0)
    with pytest.raises(ValueError, match="at least one state dict"):
        merge_lora_weights([], [])
    with pytest.raises(ValueError, match="2 state dicts but 1 weights"):
        merge_lora_weights([sd, sd], [1.0])
    with pytest.raises(ValueError, match="different keys"):
        merge_lora_weights([sd, {**sd, "extra": torch.zeros(1)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        merge_lora_weights([sd, {**sd, "down.lora_A.weight": torch.zeros(2, 16)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-floating tensor differs"):
        merge_lora_weights([sd, {**sd, "step": torch.tensor(4)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="rank mismatch"):
        merge_lora_deltas([torch.zeros(4, 16)], [torch.zeros(8, 3)], [1.0])
    with pytest.raises(ValueError, match="equally many"):
        merge_lora_deltas([torch.zeros(4, 16)], [], [1.0])


# ---------------------------------------------------------------- sampling helpers


def test_tweedie_and_score_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, generator=g, dtype=D64)
    eps = torch.randn(4, 2, 3, generator=g, dtype=D64)
    abar = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=D64)
    a = abar.view(-1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(tweedie_x0(x_t, eps, abar), x0)
    torch.testing.assert_close(tweedie_x0(x_t[:1], eps[:1], 0.9), x0[:1])
    sigma = (1 - abar).sqrt()
    score = score_from_eps(eps, sigma)
    torch.testing.assert_close(score, -eps / sigma.view(-1, 1, 1))
    torch.testing.assert_close(eps_from_score(score, sigma), eps)


class _RecordingScheduler:
    """A duck-typed scheduler: x <- x - 0.1 * eps at each of num_steps integer timesteps."""

    def __init__(self, prediction_type: str = "epsilon"):
        self.config = SimpleNamespace(prediction_type=prediction_type)
        self.init_noise_sigma = 2.0

    def set_timesteps(self, num_steps: int, device=None) -> None:
        self.timesteps = torch.arange(num_steps - 1, -1, -1, device=device)

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def step(self, eps, t, x, generator=None):
        return SimpleNamespace(prev_sample=x - 0.1 * eps)


def test_sample_drives_the_scheduler_and_calls_back():
    seen: list[tuple[int, int]] = []
    x_T = torch.ones(2, 3, dtype=D64)
    out = sample(
        lambda x, t: torch.ones_like(x),
        _RecordingScheduler(),
        x_T,
        5,
        callback=lambda i, t, x: seen.append((i, int(t))),
    )
    torch.testing.assert_close(out, torch.full((2, 3), 2.0 - 0.5, dtype=D64))
    assert seen == [(0, 4), (1, 3), (2, 2), (3, 1), (4, 0)]
    with pytest.raises(ValueError, match="prediction_type is 'v_prediction'"):
        sample(lambda x, t: x, _RecordingScheduler("v_prediction"), x_T, 5)
    with pytest.raises(ValueError, match="denoise returned shape"):
        sample(lambda x, t: x[:1], _RecordingScheduler(), x_T, 5)
