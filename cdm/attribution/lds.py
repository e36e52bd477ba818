"""The linear datamodeling score (Ilyas et al. 2022; Lin, Lu & Lee, eq. 3) with a bootstrap interval.

LDS = Spearman rho({gamma(model_{S_k})}, {1_{S_k}^T tau}) over K held-out subsets whose models were
retrained from scratch (not the subsets the datamodel was fitted on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr


@dataclass(frozen=True)
class LDSResult:
    """``value`` and its bootstrap percentile interval [``low``, ``high``] at ``confidence``."""

    value: float
    low: float
    high: float
    confidence: float
    n_subsets: int
    n_bootstrap: int


def linear_datamodeling_score(
    masks: np.ndarray,
    gammas: Sequence[float] | np.ndarray,
    tau: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """LDS of scores ``tau`` on K held-out subsets (``masks`` bool [K, N], measured ``gammas`` [K]).

    The interval resamples the K subsets with replacement (``np.random.default_rng(seed)``) and
    takes percentiles of rho; resamples whose predictions or gammas are constant are skipped.
    """
    y, (predicted,) = _predictions(masks, gammas, [tau], confidence)
    value = float(spearmanr(y, predicted).statistic)

    def resampled(idx: np.ndarray) -> float | None:
        if np.ptp(y[idx]) == 0 or np.ptp(predicted[idx]) == 0:
            return None
        return float(spearmanr(y[idx], predicted[idx]).statistic)

    return _with_bootstrap(value, resampled, len(y), n_bootstrap, confidence, seed)


def lds_difference(
    masks: np.ndarray,
    gammas: Sequence[float] | np.ndarray,
    tau: np.ndarray,
    baseline_tau: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """LDS(``tau``) - LDS(``baseline_tau``) on the same K held-out subsets, with a paired
    bootstrap interval: each resample of the subsets scores both, so the spread the two share
    (which subsets were drawn) cancels. An interval above 0 says ``tau`` ranks the held-out models
    better than the baseline."""
    y, (pred_a, pred_b) = _predictions(masks, gammas, [tau, baseline_tau], confidence)

    def difference(idx: np.ndarray) -> float | None:
        if np.ptp(y[idx]) == 0 or np.ptp(pred_a[idx]) == 0 or np.ptp(pred_b[idx]) == 0:
            return None
        return float(
            spearmanr(y[idx], pred_a[idx]).statistic - spearmanr(y[idx], pred_b[idx]).statistic
        )

    value = difference(np.arange(len(y)))
    value = float("nan") if value is None else value
    return _with_bootstrap(value, difference, len(y), n_bootstrap, confidence, seed)


def _predictions(
    masks: np.ndarray,
    gammas: Sequence[float] | np.ndarray,
    taus: Sequence[np.ndarray],
    confidence: float,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Checked ``gammas`` [K] and the linear predictions ``masks @ tau`` [K] of each score vector."""
    x = np.asarray(masks, dtype=np.float64)
    y = np.asarray(gammas, dtype=np.float64)
    taus = [np.asarray(tau, dtype=np.float64) for tau in taus]
    for tau in taus:
        if x.ndim != 2 or y.shape != (x.shape[0],) or tau.shape != (x.shape[1],):
            raise ValueError(
                f"linear_datamodeling_score: masks [K, N], gammas [K], tau [N]; got {x.shape}, "
                f"{y.shape}, {tau.shape}"
            )
    if x.shape[0] < 3:
        raise ValueError(
            f"linear_datamodeling_score: need K >= 3 held-out subsets, got {x.shape[0]}"
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(
            f"linear_datamodeling_score: confidence must be in (0, 1), got {confidence}"
        )
    return y, [x @ tau for tau in taus]


def _with_bootstrap(
    value: float,
    resampled: Callable[[np.ndarray], float | None],
    k: int,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> LDSResult:
    """``value`` with the percentile interval of ``resampled`` over ``n_bootstrap`` resamples of
    the K subsets with replacement (``np.random.default_rng(seed)``); None results are skipped."""
    rng = np.random.default_rng(seed)
    boot = [
        r for _ in range(n_bootstrap) if (r := resampled(rng.integers(0, k, size=k))) is not None
    ]
    if boot:
        tail = 100 * (1 - confidence) / 2
        low, high = (float(v) for v in np.percentile(boot, [tail, 100 - tail]))
    else:
        low = high = float("nan")
    return LDSResult(value=value, low=low, high=high, confidence=confidence, n_subsets=k,
                     n_bootstrap=len(boot))  # fmt: skip
