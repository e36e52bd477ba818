"""Linear datamodels (Ilyas et al. 2022; Lin, Lu & Lee, eqs. 1-2): subsets, indicators, a ridge fit.

M subsets S_i of the training units are drawn (each of size ``round(alpha * N)``, alpha = 0.5 in
the paper), a model is retrained or unlearned on each, its global property gamma is measured, and a
linear model gamma ~ 1_S^T tau + b is fitted with ridge regression (regularisation chosen by
cross-validation). ``tau`` is the attribution score of each unit. A unit is one sample or one group
of samples (a class, a source, a line of a grouping file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import RidgeCV

DEFAULT_RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 17))


@dataclass(frozen=True)
class Units:
    """The attributed units: ``names[j]`` and the sample ids ``members[j]`` it stands for."""

    names: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.members):
            raise ValueError(f"Units: {len(self.names)} names but {len(self.members)} member lists")
        if len(set(self.names)) != len(self.names):
            raise ValueError("Units: unit names must be unique")
        if not self.names:
            raise ValueError("Units: need at least one unit")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_samples(cls, ids: Sequence[str]) -> Units:
        """One unit per sample id."""
        return cls(tuple(ids), tuple((i,) for i in ids))

    @classmethod
    def from_groups(cls, ids: Sequence[str], groups: Sequence[str]) -> Units:
        """One unit per distinct ``groups[k]`` (sorted), holding the ids whose group it is."""
        if len(ids) != len(groups):
            raise ValueError(f"Units.from_groups: {len(ids)} ids but {len(groups)} group labels")
        names = sorted({str(g) for g in groups})
        members: dict[str, list[str]] = {g: [] for g in names}
        for sample_id, g in zip(ids, groups, strict=True):
            members[str(g)].append(sample_id)
        return cls(tuple(names), tuple(tuple(members[g]) for g in names))

    def retained_ids(self, mask: np.ndarray) -> list[str]:
        """The sample ids of the units that ``mask`` (bool [N]) keeps, in unit order."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(self),):
            raise ValueError(f"retained_ids: mask shape {mask.shape}, expected ({len(self)},)")
        return [i for keep, ids in zip(mask, self.members, strict=True) if keep for i in ids]


def sample_subsets(
    n_units: int, n_subsets: int, *, alpha: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Indicator matrix 1_{S_i} (bool [M, N]): M subsets, each of exactly ``round(alpha * N)`` units.

    Uniform over subsets of that size (LDS protocol, Ilyas et al. 2022), drawn from
    ``np.random.default_rng(seed)``; row i depends only on (seed, i-th draw), so a prefix of a
    larger draw with the same seed is the smaller draw.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"sample_subsets: alpha must be in (0, 1), got {alpha}")
    if n_units < 1 or n_subsets < 1:
        raise ValueError(
            f"sample_subsets: need n_units, n_subsets >= 1 (got {n_units}, {n_subsets})"
        )
    size = round(alpha * n_units)
    if size < 1 or size >= n_units:
        raise ValueError(
            f"sample_subsets: alpha={alpha} of {n_units} units keeps {size}; use more units or "
            "another alpha so that a subset is neither empty nor everything"
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_units), dtype=bool)
    for i in range(n_subsets):
        masks[i, rng.permutation(n_units)[:size]] = True
    return masks


@dataclass(frozen=True, eq=False)
class Datamodel:
    """A fitted linear datamodel: gamma(S) ~ 1_S^T tau + intercept (``alpha``: the ridge penalty)."""

    tau: np.ndarray
    intercept: float
    alpha: float

    def predict(self, masks: np.ndarray) -> np.ndarray:
        """Predicted gamma of each subset: ``1_S^T tau + intercept``, [M]."""
        return np.asarray(masks, dtype=np.float64) @ self.tau + self.intercept


def fit_datamodel(
    masks: np.ndarray,
    gammas: Sequence[float] | np.ndarray,
    *,
    alphas: Sequence[float] = DEFAULT_RIDGE_ALPHAS,
    cv: int | None = None,
) -> Datamodel:
    """Ridge fit of gamma on 1_S (paper eq. 1 with squared error + L2), penalty chosen by CV.

    ``cv=None`` is scikit-learn's efficient leave-one-out (generalised) cross-validation; an int
    is k-fold. The attribution scores are the coefficients ``tau`` (the intercept is not a score).
    With fixed-size subsets (``sample_subsets``) sum_j 1_S[j] is constant, so tau is determined
    only up to a shared constant (the ridge penalty picks the smallest-norm one); rankings of
    1_S^T tau, hence the LDS, do not depend on it.
    """
    x = np.asarray(masks, dtype=np.float64)
    y = np.asarray(gammas, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"fit_datamodel: masks [M, N] and gammas [M]; got {x.shape}, {y.shape}")
    if not np.isfinite(y).all():
        raise ValueError("fit_datamodel: a gamma is NaN or inf; measure the property again")
    model = RidgeCV(alphas=tuple(alphas), cv=cv).fit(x, y)
    return Datamodel(tau=np.asarray(model.coef_, dtype=np.float64),
                     intercept=float(model.intercept_), alpha=float(model.alpha_))  # fmt: skip
