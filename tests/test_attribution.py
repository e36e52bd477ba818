"""The attribution layer's core (issue 13): datamodels and LDS, shard values, eq. 6 credit,
Hutchinson divergence, sparsified unlearning, global properties. Analytic references only."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy.integrate import solve_ivp
from scipy.stats import spearmanr
from torch import nn

from cdm.attribution.credit import plot_credit, source_credit, vp_probability_flow_path
from cdm.attribution.datamodels import Units, fit_datamodel, sample_subsets
from cdm.attribution.divergence import (
    HutchinsonDivergence,
    exact_divergence,
    hutchinson_divergence,
)
from cdm.attribution.lds import lds_difference, linear_datamodeling_score
from cdm.attribution.properties import (
    ClassShareProperty,
    FrechetDistanceProperty,
    MeanRouterWeightProperty,
    MemorizedShareProperty,
    as_uint8_images,
)
from cdm.attribution.shapley import (
    CompositionGame,
    exact_banzhaf,
    exact_shapley,
    leave_one_out,
    msr_banzhaf,
    permutation_shapley,
)
from cdm.attribution.unlearning import (
    magnitude_prune,
    make_pruning_permanent,
    prunable_parameters,
    pruning_masks,
    sparsity,
    unlearn_by_finetuning,
)
from cdm.eval.frechet import frechet_distance, stats_from_features


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: with 2 intra-op threads on a loaded 2-core machine a reduction can take
    20 ms instead of 20 us; one thread keeps this file fast (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- datamodels and LDS


def test_subsets_have_the_alpha_size_and_follow_the_seed():
    masks = sample_subsets(11, 40, alpha=0.5, seed=3)
    assert masks.shape == (40, 11) and masks.dtype == bool
    assert (masks.sum(1) == round(0.5 * 11)).all()
    assert np.array_equal(masks, sample_subsets(11, 40, alpha=0.5, seed=3))
    assert not np.array_equal(masks, sample_subsets(11, 40, alpha=0.5, seed=4))
    assert np.array_equal(masks[:10], sample_subsets(11, 10, alpha=0.5, seed=3))
    # every unit is left out of some subsets and kept in others
    assert masks.any(0).all() and (~masks).any(0).all()


def test_group_units_map_a_mask_to_their_sample_ids():
    units = Units.from_groups(["s0", "s1", "s2", "s3"], ["b", "a", "b", "c"])
    assert units.names == ("a", "b", "c")
    assert units.retained_ids(np.array([False, True, True])) == ["s0", "s2", "s3"]
    with pytest.raises(ValueError, match="mask shape"):
        units.retained_ids(np.array([True, False]))


def test_ridge_datamodel_recovers_a_planted_linear_tau():
    rng = np.random.default_rng(0)
    n_units, planted = 20, rng.normal(size=20)
    masks = sample_subsets(n_units, 300, seed=1)
    gammas = masks @ planted + 3.0 + rng.normal(scale=0.01, size=300)
    model = fit_datamodel(masks, gammas)
    # every subset has 10 units, so tau is identified up to a shared constant (absorbed by the
    # intercept; ranks of 1_S^T tau, hence the LDS, do not see it): compare centred scores
    centred = planted - planted.mean()
    assert np.abs(model.tau - model.tau.mean() - centred).max() < 0.02
    assert np.abs(model.predict(masks) - gammas).max() < 0.05
    held_out = sample_subsets(n_units, 50, seed=2)
    lds = linear_datamodeling_score(held_out, held_out @ planted, model.tau)
    assert lds.value > 0.99


def test_diagnostics_find_a_planted_signal_and_a_class_count_effect(tmp_path, capsys):
    """cdm.attribution.diagnostics on a synthetic values.json: self-prediction is high for a linear
    gamma and about zero for noise; class-count correlations are those of the kept units."""
    from cdm.attribution.diagnostics import diagnose, group_count_correlation, main, self_prediction

    rng = np.random.default_rng(0)
    names = [f"c{c}-g{k:02d}" for c in (3, 9) for k in range(8)]  # 16 units of classes 3 and 9
    n, planted = len(names), rng.normal(size=len(names))
    masks = sample_subsets(n, 200, seed=4)
    assert self_prediction(masks, masks @ planted + rng.normal(scale=0.05, size=200)) > 0.95
    assert abs(self_prediction(masks, rng.normal(size=200))) < 0.25
    # gamma = the number of class-9 units kept: +1 with class 9's count, -1 with class 3's (fixed size)
    groups = {"c3": np.arange(n) < 8, "c9": np.arange(n) >= 8}
    corr = group_count_correlation(masks, masks[:, 8:].sum(1), groups)
    assert corr["c9"] == pytest.approx(1.0) and corr["c3"] == pytest.approx(-1.0)
    # a run's values.json: the unlearned subsets are redrawn from the seed, as removal.py draws them
    seed, unlearn = 7, sample_subsets(n, 64, alpha=0.5, seed=8)
    heldout, retrain = sample_subsets(n, 24, seed=10), sample_subsets(n, 8, seed=9)
    values = {
        "n_units": n, "alpha": 0.5, "seed": seed, "target": "shard-03", "property": "FD",
        "units": {u: 4 for u in names},
        "subsets": {"heldout": heldout.tolist(), "retrain": retrain.tolist()},
        "gamma_unlearn": (unlearn @ planted).tolist(),
        "gamma_heldout": (-heldout[:, 8:].sum(1)).tolist(),
        "gamma_retrain": (retrain @ planted).tolist(),
    }  # fmt: skip
    result = diagnose(values)
    assert result["unlearned_self_spearman"] > 0.95  # would fail with other unlearned subsets
    assert result["heldout_vs_class_count"]["c9"] == pytest.approx(-1.0)
    path = tmp_path / "values.json"
    path.write_text(json.dumps(values))
    assert main([str(tmp_path)]) == 0
    assert "c3 +1.00, c9 -1.00" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    del values["gamma_unlearn"]
    path.write_text(json.dumps(values))
    assert main([str(path)]) == 2
    assert "not the values.json of a datamodels run" in capsys.readouterr().err


def test_lds_is_spearman_of_gamma_and_the_linear_prediction_with_a_seeded_interval():
    rng = np.random.default_rng(5)
    masks = sample_subsets(12, 40, seed=0)
    tau = rng.normal(size=12)
    gammas = masks @ tau + rng.normal(scale=1.0, size=40)
    result = linear_datamodeling_score(masks, gammas, tau, n_bootstrap=300, seed=7)
    expected = spearmanr(gammas, masks @ tau).statistic
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert 0.2 < result.value < 0.99  # noisy, so neither trivial nor perfect
    assert result.low < result.value < result.high
    again = linear_datamodeling_score(masks, gammas, tau, n_bootstrap=300, seed=7)
    other = linear_datamodeling_score(masks, gammas, tau, n_bootstrap=300, seed=8)
    assert (again.low, again.high) == (result.low, result.high)
    assert (other.low, other.high) != (result.low, result.high)
    # ranks, not values: a monotone transform of gamma leaves the LDS unchanged
    assert linear_datamodeling_score(masks, np.exp(gammas), tau).value == pytest.approx(
        result.value
    )


def test_paired_lds_difference_cancels_the_draw_of_held_out_subsets():
    """LDS(tau) - LDS(baseline) with both scored on each bootstrap resample of the same subsets:
    the difference of the two LDS, zero for equal scores, and an interval that excludes zero for a
    clearly better tau even where the two unpaired intervals overlap."""
    rng = np.random.default_rng(3)
    masks = sample_subsets(16, 24, seed=1)
    true_tau = rng.normal(size=16)
    gammas = masks @ true_tau + rng.normal(scale=1.5, size=24)
    worse = true_tau + rng.normal(scale=1.5, size=16)
    diff = lds_difference(masks, gammas, true_tau, worse, n_bootstrap=500, seed=2)
    a = linear_datamodeling_score(masks, gammas, true_tau, n_bootstrap=500, seed=2)
    b = linear_datamodeling_score(masks, gammas, worse, n_bootstrap=500, seed=2)
    assert diff.value == pytest.approx(a.value - b.value, abs=1e-12)
    assert 0 < diff.low < diff.value < diff.high
    assert b.high > a.low  # unpaired, the two intervals overlap
    same = lds_difference(masks, gammas, true_tau, true_tau, n_bootstrap=50)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    flipped = lds_difference(masks, gammas, worse, true_tau, n_bootstrap=500, seed=2)
    assert flipped.value == pytest.approx(-diff.value)
    assert flipped.high < 0


# ---------------------------------------------------------------- shard values


def six_player_game():
    """v(T) with interactions; shards a and b are identical, f is a null player."""
    worth = {"a": 1.0, "b": 1.0, "c": 2.0, "d": -0.5, "e": 0.3, "f": 0.0}
    calls = []

    def property_of(shards: tuple) -> float:
        calls.append(shards)
        s = sum(worth[p] for p in shards)
        both = ("c" in shards) * ("d" in shards)
        return s**2 / 4 + 1.5 * both - 0.7 * ("a" in shards or "b" in shards)

    game = CompositionGame(property_of, tuple("abcdef"), empty_value=-1.0)
    return game, calls


def test_exact_shapley_is_efficient_symmetric_and_evaluates_each_coalition_once():
    game, calls = six_player_game()
    values = exact_shapley(game, game.players)
    v_all, v_none = game(frozenset("abcdef")), game(frozenset())
    assert values.values.sum() == pytest.approx(v_all - v_none, abs=1e-12)
    d = values.as_dict()
    assert d["a"] == pytest.approx(d["b"], abs=1e-12)
    assert d["c"] != pytest.approx(d["d"])
    assert (
        len(calls) == 2**6 - 1 == game.evaluations
    )  # the empty coalition is given, never composed
    assert len(set(calls)) == len(calls)
    assert all(list(c) == sorted(c) for c in calls)  # in players order
    banzhaf = exact_banzhaf(game, game.players).as_dict()
    assert banzhaf["a"] == pytest.approx(banzhaf["b"], abs=1e-12)
    assert len(calls) == 2**6 - 1  # Banzhaf reuses the cached coalitions


def test_on_an_additive_game_every_value_is_the_shard_worth():
    worth = {"x": 0.5, "y": -2.0, "z": 3.0}
    game = CompositionGame(lambda t: sum(worth[p] for p in t), tuple(worth), empty_value=0.0)
    for method in (exact_shapley, exact_banzhaf, leave_one_out):
        assert method(game, game.players).as_dict() == pytest.approx(worth)


def test_permutation_shapley_and_msr_banzhaf_converge_to_the_exact_values():
    game, _ = six_player_game()
    exact_s = exact_shapley(game, game.players).values
    exact_b = exact_banzhaf(game, game.players).values
    few = permutation_shapley(game, game.players, n_permutations=50, seed=0)
    many = permutation_shapley(game, game.players, n_permutations=3000, seed=0)
    assert np.all(np.abs(many.values - exact_s) <= 4 * many.stderr + 1e-9)
    assert np.abs(many.values - exact_s).max() < 0.05
    assert many.stderr.max() < few.stderr.max() / 4  # ~ 1 / sqrt(permutations)
    # each permutation's marginals sum to v(N) - v({}): efficiency holds per draw
    assert many.values.sum() == pytest.approx(exact_s.sum(), abs=1e-9)
    msr = msr_banzhaf(game, game.players, n_samples=40000, seed=0)
    assert np.all(np.abs(msr.values - exact_b) <= 4 * msr.stderr + 1e-9)
    assert np.abs(msr.values - exact_b).max() < 0.05
    assert np.array_equal(
        msr.values, msr_banzhaf(game, game.players, n_samples=40000, seed=0).values
    )


# ---------------------------------------------------------------- divergence and eq. 6


def gaussian_score(mu: torch.Tensor, cov: torch.Tensor):
    precision = torch.linalg.inv(cov)
    return precision, (lambda x: -(x - mu) @ precision.T)


def test_exact_and_hutchinson_divergence_of_a_gaussian_score():
    torch.manual_seed(0)
    dim = 5
    a = torch.randn(dim, dim, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(dim, dtype=torch.float64)
    precision, score = gaussian_score(torch.randn(dim, dtype=torch.float64), cov)
    x = torch.randn(4, dim, dtype=torch.float64)
    truth = -torch.trace(precision)  # div of -P (x - mu) is -tr(P), at every x
    assert torch.allclose(exact_divergence(score, x), truth.expand(4), atol=1e-10)
    n_probes = 4000
    gen = torch.Generator().manual_seed(1)
    estimate = hutchinson_divergence(score, x, n_probes=n_probes, generator=gen)
    jac = -precision
    variance = 2 * ((jac**2).sum() - (torch.diagonal(jac) ** 2).sum()) / n_probes
    assert torch.all((estimate - truth).abs() < 4 * variance.sqrt())
    assert not torch.allclose(estimate, truth.expand(4), atol=1e-6)  # an estimate, not the trace
    one = HutchinsonDivergence(n_probes=3, seed=2)
    assert torch.equal(one(score, x), HutchinsonDivergence(n_probes=3, seed=2)(score, x))


# the analytic mixture of the eq. 6 test: p_0 = sum_i lambda_i N(mu_i, s_i^2 I) in 2-D, VP-SDE
MUS = np.array([[2.0, 0.0], [-1.0, 1.5]])
S2 = np.array([0.3, 0.5])
LAMBDAS = np.array([0.3, 0.7])
BETA_MIN, BETA_MAX = 0.1, 8.0


def beta(t):
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def gamma_t(t):
    return math.exp(-0.5 * (BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t * t))


def mixture_numpy(x: np.ndarray, t: float):
    """(w [n], scores [n, D], variances [n]) of the noised components at x [D], in numpy."""
    g = gamma_t(t)
    var = g * g * S2 + (1 - g * g)
    diff = x[None] - g * MUS
    log_n = -0.5 * (diff**2).sum(1) / var - x.size / 2 * np.log(2 * np.pi * var)
    logw = np.log(LAMBDAS) + log_n
    w = np.exp(logw - logw.max())
    return w / w.sum(), -diff / var[:, None], var


def reference_eq6(x1: np.ndarray):
    """x_0 and L_i = int_0^1 div(w_i s_i) dt by scipy's ODE solver, with the closed form
    div(w_i s_i) = w_i [(s_i - s_bar) . s_i - D / v_i]."""

    def rhs(t, state):
        x = state[:2]
        w, s, var = mixture_numpy(x, t)
        s_bar = (w[:, None] * s).sum(0)
        dx = -0.5 * beta(t) * (x + s_bar)
        dl = w * (((s - s_bar) * s).sum(1) - 2 / var)
        return np.concatenate([dx, dl])

    sol = solve_ivp(rhs, (1.0, 0.0), np.concatenate([x1, [0.0, 0.0]]), rtol=1e-10, atol=1e-12)
    return sol.y[:2, -1], -sol.y[2:, -1]  # integrated from 1 down to 0: flip to int_0^1


def torch_mixture():
    mus = torch.tensor(MUS)
    s2 = torch.tensor(S2)
    lam = torch.tensor(LAMBDAS)

    def parts(x, t):
        g = torch.exp(-0.5 * (BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t * t))[:, None]
        var = g * g * s2 + (1 - g * g)  # [B, n]
        diff = x[:, None, :] - g[:, :, None] * mus  # [B, n, D]
        log_n = -0.5 * (diff**2).sum(-1) / var - torch.log(2 * math.pi * var)
        return torch.softmax(torch.log(lam) + log_n, dim=1), -diff / var[..., None]

    def weights(x, t):
        return parts(x, t)[0]

    def score_of(i):
        return lambda x, t: parts(x, t)[1][:, i]

    def mixture_score(x, t):
        w, s = parts(x, t)
        return (w[..., None] * s).sum(1)

    return weights, [score_of(0), score_of(1)], mixture_score


def test_eq6_credit_on_a_two_gaussian_mixture_matches_a_numerical_integral():
    weights, scores, mixture_score = torch_mixture()
    x1 = torch.tensor([[0.4, -0.3], [-1.2, 0.8], [1.5, 1.0]], dtype=torch.float64)
    times = torch.linspace(1.0, 0.0, 201, dtype=torch.float64)  # O(h^2) errors ~ 1e-4
    path = vp_probability_flow_path(mixture_score, x1, times, beta)
    result = source_credit(path, times, weights, scores, lambdas=torch.tensor(LAMBDAS))
    for b in range(x1.shape[0]):
        x0_ref, l_ref = reference_eq6(x1[b].numpy())
        np.testing.assert_allclose(path[-1, b].numpy(), x0_ref, rtol=0, atol=5e-4)
        np.testing.assert_allclose(result.contributions[b].numpy(), l_ref, rtol=0, atol=5e-4)
        c_ref = LAMBDAS * l_ref / (LAMBDAS * l_ref).sum()
        np.testing.assert_allclose(result.credit[b].numpy(), c_ref, rtol=0, atol=1e-3)
    assert result.weights.shape == result.step_credit.shape == (201, 3, 2)
    assert torch.allclose(result.weights.sum(-1), torch.ones(201, 3, dtype=torch.float64))
    assert torch.allclose(result.credit.sum(-1), torch.ones(3, dtype=torch.float64))
    # the weights start mixed at t = 1 and pick one component by t = 0
    assert float(result.weights[0].max()) < 0.9
    assert bool((result.weights[-1].max(-1).values > 0.95).all())
    fig = plot_credit(result, labels=["left", "right"])
    left, right = fig.axes
    assert len(left.lines) == len(right.lines) == 2
    assert [t.get_text().split(" ")[0] for t in right.get_legend().get_texts()] == ["left", "right"]
    np.testing.assert_allclose(left.lines[1].get_ydata(), result.weights[:, :, 1].mean(1).numpy())


# ---------------------------------------------------------------- sparsified unlearning


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.SiLU(), nn.Linear(16, 6))


def denoising_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(batch)  # the global RNG: seeded by unlearn_by_finetuning
    return ((model(batch + noise) - noise) ** 2).mean()


def retained_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    return [torch.randn(8, 6, generator=gen) for _ in range(3)]


def test_magnitude_pruning_zeroes_the_smallest_weights_of_each_layer():
    net = tiny_net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    names = magnitude_prune(net, ratio=0.3, scope="layer")
    assert names == ["0.weight", "3.weight"]  # biases and the LayerNorm scale are 1-D: kept
    masks = pruning_masks(net)
    for name in names:
        module = net[int(name.split(".")[0])]
        weight, mask = module.weight, masks[name]
        assert int((mask == 0).sum()) == round(0.3 * weight.numel())
        assert bool((weight[mask == 0] == 0).all())
        assert before[name].abs()[mask == 0].max() <= before[name].abs()[mask == 1].min()
    assert torch.equal(net[1].weight, before["1.weight"])
    assert sparsity(net) == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="already pruned"):
        magnitude_prune(net)
    glob = tiny_net()
    magnitude_prune(glob, ratio=0.3, scope="global")
    assert sparsity(glob) == pytest.approx(0.3, abs=0.01)
    per_layer = [float((m == 0).float().mean()) for m in pruning_masks(glob).values()]
    assert per_layer[0] != pytest.approx(per_layer[1], abs=0.01)  # global: layers differ


def test_unlearning_never_touches_a_pruned_weight_and_follows_the_seed():
    net = tiny_net()
    magnitude_prune(net, ratio=0.3)
    start = copy.deepcopy(net)
    masks = {k: v.clone() for k, v in pruning_masks(net).items()}
    rng_before = torch.get_rng_state()
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.5)  # noqa: E731
    losses = unlearn_by_finetuning(
        net, retained_batches(), denoising_loss, steps=7, optimizer=adamw, seed=4
    )
    assert len(losses) == 7
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    for name, mask in masks.items():
        module = net[int(name.split(".")[0])]
        assert bool((module.weight[mask == 0] == 0).all())
        assert bool((module.weight_orig[mask == 0] == 0).all())
        kept_before = start[int(name.split(".")[0])].weight[mask == 1]
        assert not torch.allclose(module.weight[mask == 1], kept_before)  # the rest did train
    again = copy.deepcopy(start)
    unlearn_by_finetuning(
        again, retained_batches(), denoising_loss, steps=7, optimizer=adamw, seed=4
    )
    other = copy.deepcopy(start)
    unlearn_by_finetuning(
        other, retained_batches(), denoising_loss, steps=7, optimizer=adamw, seed=5
    )
    for (name, a), b in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert any(
        not torch.equal(a, c) for a, c in zip(net.parameters(), other.parameters(), strict=True)
    )
    make_pruning_permanent(net)
    assert not pruning_masks(net) and sparsity(net) == 0.0
    assert float((net[0].weight == 0).float().mean()) == pytest.approx(0.3, abs=0.01)


def test_pruning_and_unlearning_a_lora_adapter_leave_the_backbone_alone():
    base = tiny_net()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["0", "3"]))
    with torch.no_grad():  # a trained adapter (lora_B starts at zero)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    targets = [name for name, _, _ in prunable_parameters(model)]
    assert targets and all("lora_" in name for name in targets)
    magnitude_prune(model, ratio=0.3)
    assert sparsity(model) == pytest.approx(0.3, abs=0.02)
    unlearn_by_finetuning(model, retained_batches(), denoising_loss, steps=3, seed=0,
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))  # fmt: skip
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    for name, mask in pruning_masks(model).items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert bool((module.weight[mask == 0] == 0).all())


# ---------------------------------------------------------------- properties


class PixelSpace:
    """A stand-in feature space: the flattened pixels in [0, 1]."""

    name, dim = "pixels", 12

    def __call__(self, images_uint8):
        return torch.as_tensor(images_uint8).reshape(len(images_uint8), -1).double().numpy() / 255


def test_properties_measure_what_their_name_says():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 2, 2), dtype=torch.uint8, generator=gen)
    space = PixelSpace()
    fd = FrechetDistanceProperty(space, stats_from_features(space(images)))
    assert fd.name == "FD_pixels"
    assert fd(images) == pytest.approx(0.0, abs=1e-6)
    shifted = (images.float() / 127.5 - 1 + 0.5).clamp(-1, 1)  # float input, quantised
    expected = frechet_distance(stats_from_features(space(as_uint8_images(shifted))), fd.reference)
    assert fd(shifted) == pytest.approx(expected) and expected > 0.05

    class ByBrightness:
        def predict(self, x):
            return (torch.as_tensor(x).double().mean((1, 2, 3)) > 127.5).long().numpy()

    share = ClassShareProperty(ByBrightness(), target=1)
    bright = (torch.as_tensor(images).double().mean((1, 2, 3)) > 127.5).double().mean()
    assert share(images) == pytest.approx(float(bright)) and 0 < share(images) < 1

    trace = torch.zeros(40, 5, 3)
    trace[..., 2] = 0.25
    trace[..., 0] = 0.75
    assert MeanRouterWeightProperty(shard=2)(images, trace) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="weight trace"):
        MeanRouterWeightProperty(shard=2)(images)

    train = space(images[:20])
    memorized = MemorizedShareProperty(space, train)
    assert memorized(images[:20]) == 1.0  # copies of training images
    assert memorized(images[20:]) < 0.5


def test_fd_property_is_named_as_cdm_eval_names_it():
    # FD in the digits classifier's features is FD_digits (cdm-eval's name), not the space's name
    from types import SimpleNamespace

    from cdm.attribution.properties import FrechetDistanceProperty
    from cdm.eval.frechet import FeatureStats

    space = SimpleNamespace(name="digits_net", metric_name="FD_digits", dim=2)
    stats = FeatureStats(mu=np.zeros(2), sigma=np.eye(2), n=10)
    assert FrechetDistanceProperty(space, stats).name == "FD_digits"
    space = SimpleNamespace(name="pixels", dim=2)
    assert FrechetDistanceProperty(space, stats).name == "FD_pixels"
