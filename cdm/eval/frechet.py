"""Frechet distance (FID) and kernel distance (KID) between two sets of image features.

Numpy/scipy only. The features come from a :class:`cdm.eval.features.FeatureSpace`; a number is called
"FID" / "KID" only when that space is :class:`cdm.eval.inception.InceptionFeatures` (clean-fid's protocol,
see ``docs/fid.md``). In any other space report it as a Frechet / kernel distance in that space.

- Frechet distance: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium" (the FID formula, section 3 / appendix), computed as clean-fid's
  ``cleanfid.fid.frechet_distance`` does (``scipy.linalg.sqrtm`` of the covariance product, an ``eps``
  offset on the diagonals when the product is singular).
- Kernel distance: Binkowski et al. 2018, "Demystifying MMD GANs" (KID, section 5 and eq. 2 / appendix):
  the unbiased MMD^2 estimator with the cubic polynomial kernel, averaged over random subsets, with the
  formula of ``cleanfid.fid.kernel_distance`` but a seeded generator.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from cdm.core.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class FeatureStats:
    """Gaussian summary of ``n`` feature vectors: mean ``mu`` [d] and covariance ``sigma`` [d, d].

    Stored as float64; ``n`` (the sample count) travels with the statistics so that a reported FID can
    state how many samples it came from.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", int(self.n))
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"FeatureStats needs mu [d] and sigma [d, d]; got mu {mu.shape}, sigma {sigma.shape}"
            )
        if self.n < 2:
            raise ValueError(f"FeatureStats needs n >= 2 samples, got n={self.n}")

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def to_npz_bytes(self) -> bytes:
        """Serialize to the bytes of an ``.npz`` (arrays ``mu``, ``sigma``, ``n``; no pickles)."""
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))
        return buf.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> FeatureStats:
        """Inverse of :meth:`to_npz_bytes` (loaded with ``allow_pickle=False``)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]))


def _as_feature_matrix(features: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what}: features must be a 2-D array [N, dim], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{what}: need at least 2 feature vectors, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or inf")
    return x


def stats_from_features(features: np.ndarray) -> FeatureStats:
    """Mean and unbiased covariance (``np.cov``, rows are samples) of ``[N, dim]`` features, in float64."""
    x = _as_feature_matrix(features, "stats_from_features")
    return FeatureStats(
        mu=x.mean(axis=0), sigma=np.atleast_2d(np.cov(x, rowvar=False)), n=int(x.shape[0])
    )


def frechet_distance(a: FeatureStats, b: FeatureStats, *, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu_a, S_a) and N(mu_b, S_b) (Heusel et al. 2017).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, computed exactly as clean-fid's
    ``frechet_distance``: ``sqrtm`` of the product; if that is not finite, ``eps`` is added to both
    diagonals (also when scipy reports the product singular, which constant pixels give);
    an imaginary part above 1e-3 on the diagonal is an error, a smaller one is dropped.
    """
    mu1, mu2, s1, s2 = a.mu, b.mu, a.sigma, b.sigma
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(
            f"frechet_distance: feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}); "
            "both statistics must come from the same feature space"
        )
    diff = mu1 - mu2
    covmean = _sqrtm_or_none(s1 @ s2)
    if (
        covmean is None
    ):  # singular (e.g. constant pixels): the eps offset of clean-fid / pytorch-fid
        log.debug("frechet_distance: singular covariance product; adding %s to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _sqrtm_or_none(matrix: np.ndarray) -> np.ndarray | None:
    """``scipy.linalg.sqrtm(matrix)``, or None when scipy finds it singular or the root is not
    finite (then the caller retries with an offset instead of printing scipy's warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)
        try:
            root = linalg.sqrtm(matrix)
        except linalg.LinAlgWarning:
            return None
    return root if np.isfinite(root).all() else None


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets with k(u, v) = (u.v / d + 1)^3 (Binkowski et al. 2018)."""
    m, d = x.shape
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off_diag = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
    return float(off_diag / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kernel_distance(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    *,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): mean and std (ddof=0) of the unbiased MMD^2 over random subsets.

    Each subset draws ``m = min(len(a), len(b), max_subset_size)`` rows of each set without replacement
    from ``np.random.default_rng(seed)``; the kernel is ``(x.y / dim + 1)^3``. The per-subset value is
    the one ``cleanfid.fid.kernel_distance`` averages (which draws from the global ``np.random``).
    """
    a = _as_feature_matrix(feats_a, "kernel_distance (a)")
    b = _as_feature_matrix(feats_b, "kernel_distance (b)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"kernel_distance: feature dimensions differ ({a.shape[1]} vs {b.shape[1]}); "
            "both sets must come from the same feature space"
        )
    if num_subsets < 1:
        raise ValueError(f"kernel_distance: num_subsets must be >= 1, got {num_subsets}")
    if max_subset_size < 2:
        raise ValueError(f"kernel_distance: max_subset_size must be >= 2, got {max_subset_size}")
    m = min(a.shape[0], b.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        x = b[rng.choice(b.shape[0], m, replace=False)]
        y = a[rng.choice(a.shape[0], m, replace=False)]
        values[i] = _mmd2_unbiased_poly(x, y)
    return float(values.mean()), float(values.std())
