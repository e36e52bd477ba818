"""Frechet distance and KID against independent computations (eigen-decompositions, loops, closed forms)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cdm.eval.frechet import FeatureStats, frechet_distance, kernel_distance, stats_from_features


def _random_features(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """Correlated, non-isotropic Gaussian features (so the covariances do not commute)."""
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.diag(rng.uniform(0.5, 2.0, size=d))
    return rng.normal(size=(n, d)) @ mix + shift + rng.normal(size=d)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fd_by_eigh(x: np.ndarray, y: np.ndarray) -> float:
    """Independent FD: Tr (S_a S_b)^{1/2} = sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2})), symmetric eigh only."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    sx = (x - mu_x).T @ (x - mu_x) / (len(x) - 1)
    sy = (y - mu_y).T @ (y - mu_y) / (len(y) - 1)
    r = _sqrt_psd(sx)
    eig = np.linalg.eigvalsh(r @ sy @ r)
    tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * tr_sqrt)


@pytest.mark.parametrize(
    ("d", "n_a", "n_b"), [(1, 30, 20), (3, 10, 50), (16, 40, 90), (64, 300, 200)]
)
def test_frechet_matches_independent_eigen_computation(d, n_a, n_b):
    rng = np.random.default_rng(1000 + d)
    a = _random_features(rng, n_a, d)
    b = _random_features(rng, n_b, d, shift=0.3)
    ours = frechet_distance(stats_from_features(a), stats_from_features(b))
    ref = _fd_by_eigh(a, b)
    assert ref > 0.1
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_matches_clean_fid_reference():
    from cleanfid.fid import frechet_distance as cleanfid_fd

    rng = np.random.default_rng(7)
    a, b = _random_features(rng, 120, 32), _random_features(rng, 80, 32, shift=-0.2)
    sa, sb = stats_from_features(a), stats_from_features(b)
    ref = cleanfid_fd(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert frechet_distance(sa, sb) == pytest.approx(float(ref), rel=1e-9)


def test_frechet_zero_on_itself_and_symmetric():
    rng = np.random.default_rng(3)
    sa = stats_from_features(_random_features(rng, 200, 20))
    sb = stats_from_features(_random_features(rng, 150, 20, shift=0.5))
    assert abs(frechet_distance(sa, sa)) < 1e-8 * np.trace(sa.sigma)
    ab, ba = frechet_distance(sa, sb), frechet_distance(sb, sa)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-8)


def test_frechet_closed_form_diagonal_gaussians():
    # For diagonal covariances: FD = ||mu1 - mu2||^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([2.25, 1.0, 0.25])
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert closed == pytest.approx(0.25 + 4.0 + 0.25 + 1.0)

    exact = frechet_distance(
        FeatureStats(mu1, np.diag(v1), n=10**6), FeatureStats(mu2, np.diag(v2), n=10**6)
    )
    assert exact == pytest.approx(closed, rel=1e-10)

    rng = np.random.default_rng(0)
    n = 200_000
    x = mu1 + rng.normal(size=(n, 3)) * np.sqrt(v1)
    y = mu2 + rng.normal(size=(n, 3)) * np.sqrt(v2)
    sampled = frechet_distance(stats_from_features(x), stats_from_features(y))
    assert sampled == pytest.approx(closed, rel=0.01)


def test_stats_from_features_and_npz_roundtrip():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    s = stats_from_features(x)
    assert s.n == 40 and s.dim == 6
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    xd = x.astype(np.float64)
    np.testing.assert_allclose(s.mu, xd.sum(0) / 40, rtol=1e-12)
    centered = xd - xd.mean(0)
    np.testing.assert_allclose(s.sigma, centered.T @ centered / 39, rtol=1e-10, atol=1e-14)

    back = FeatureStats.from_npz_bytes(s.to_npz_bytes())
    assert back.n == 40
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    assert frechet_distance(back, s) == pytest.approx(0.0, abs=1e-9)


def test_frechet_errors():
    with pytest.raises(ValueError, match="at least 2"):
        stats_from_features(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="2-D"):
        stats_from_features(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        stats_from_features(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="n >= 2"):
        FeatureStats(np.zeros(2), np.eye(2), n=1)
    with pytest.raises(ValueError, match="sigma"):
        FeatureStats(np.zeros(2), np.eye(3), n=5)
    rng = np.random.default_rng(0)
    a, b = (
        stats_from_features(rng.normal(size=(10, 4))),
        stats_from_features(rng.normal(size=(10, 5))),
    )
    with pytest.raises(ValueError, match=r"dimensions differ \(4 vs 5\)"):
        frechet_distance(a, b)


def _mmd2_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Binkowski et al. 2018, eq. 2) with k(u, v) = (u.v/d + 1)^3, written as loops."""
    m, d = x.shape

    def k(u, v):
        return (sum(ui * vi for ui, vi in zip(u, v, strict=True)) / d + 1.0) ** 3

    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (m * m)


def test_kid_equals_brute_force_on_full_sets():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.4
    mean, std = kernel_distance(a, b, num_subsets=1)
    # with m = len(a) = len(b) the subset is a permutation of each set and MMD^2 does not depend on order
    assert mean == pytest.approx(_mmd2_loops(b, a), rel=1e-10)
    assert std == 0.0


def test_kid_subsets_equal_brute_force_with_the_same_draws():
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(9, 4)), rng.normal(size=(6, 4)) * 1.5
    mean, std = kernel_distance(a, b, num_subsets=4, max_subset_size=5, seed=3)
    draws = np.random.default_rng(3)  # the documented order: b's rows, then a's rows, per subset
    values = []
    for _ in range(4):
        ib = draws.choice(6, 5, replace=False)
        ia = draws.choice(9, 5, replace=False)
        values.append(_mmd2_loops(b[ib], a[ia]))
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)
    assert std > 0


def test_kid_matches_clean_fid_formula():
    from cleanfid.fid import kernel_distance as cleanfid_kid

    rng = np.random.default_rng(13)
    a, b = rng.normal(size=(50, 16)), rng.normal(size=(50, 16)) + 0.2
    ours, _ = kernel_distance(a, b, num_subsets=1, max_subset_size=1000)
    ref = cleanfid_kid(a, b, num_subsets=1, max_subset_size=1000)
    assert ref > 0
    assert ours == pytest.approx(ref, rel=1e-10)


def test_kid_seeded_reproducible_and_discriminates():
    rng = np.random.default_rng(14)
    a, a2 = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    b = rng.normal(size=(300, 8)) + 0.5
    first = kernel_distance(a, b, num_subsets=20, max_subset_size=100, seed=5)
    assert kernel_distance(a, b, num_subsets=20, max_subset_size=100, seed=5) == first
    assert kernel_distance(a, b, num_subsets=20, max_subset_size=100, seed=6) != first
    same, _ = kernel_distance(a, a2, num_subsets=20, max_subset_size=100, seed=5)
    assert first[0] > 10 * abs(same)


def test_kid_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"dimensions differ \(3 vs 4\)"):
        kernel_distance(rng.normal(size=(5, 3)), rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_distance(rng.normal(size=(1, 3)), rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="num_subsets"):
        kernel_distance(rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), num_subsets=0)
