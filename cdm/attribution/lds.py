"""The linear datamodeling score (Ilyas et al. 2022; Lin, Lu & Lee, eq. 3) with a bootstrap interval.

LDS = Spearman rho({gamma(model_{S_k})}, {1_{S_k}^T tau}) over K held-out subsets whose models were
retrained from scratch (not the subsets the datamodel was fitted on).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    x = np.asarray(masks, dtype=np.float64)
    y = np.asarray(gammas, dtype=np.float64)
    tau = np.asarray(tau, dtype=np.float64)
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
    predicted = x @ tau
    value = float(spearmanr(y, predicted).statistic)
    rng = np.random.default_rng(seed)
    k = x.shape[0]
    boot = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, k, size=k)
        if np.ptp(y[idx]) == 0 or np.ptp(predicted[idx]) == 0:
            continue
        boot.append(float(spearmanr(y[idx], predicted[idx]).statistic))
    if boot:
        tail = 100 * (1 - confidence) / 2
        low, high = (float(v) for v in np.percentile(boot, [tail, 100 - tail]))
    else:
        low = high = float("nan")
    return LDSResult(value=value, low=low, high=high, confidence=confidence, n_subsets=k,
                     n_bootstrap=len(boot))  # fmt: skip
