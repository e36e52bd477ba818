"""Memorization (paper Fig. 4B): how close generated samples come to their nearest training image.

For each generated sample, d1 and d2 are the distances to its nearest and second-nearest training
image in a stated feature space. A copy of a training image has d1 ~ 0 and d1/d2 << 1; Carlini et
al. (2023) call a sample memorized when d1/d2 < 1/3 (the ratio guards against dense regions).
"""

from __future__ import annotations

import numpy as np
import torch


def nearest_neighbours(
    generated: np.ndarray, train: np.ndarray, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d1, d2, index of the nearest) of each generated row among ``train`` rows (Euclidean, float64)."""
    g = torch.as_tensor(np.asarray(generated, dtype=np.float64))
    t = torch.as_tensor(np.asarray(train, dtype=np.float64))
    if g.ndim != 2 or t.ndim != 2 or g.shape[1] != t.shape[1]:
        raise ValueError(
            f"features must be [N, d] and [M, d]; got {tuple(g.shape)}, {tuple(t.shape)}"
        )
    if t.shape[0] < 2:
        raise ValueError("need at least 2 training images for the second-nearest distance")
    d1, d2, idx = [], [], []
    for start in range(0, g.shape[0], chunk):
        dist = torch.cdist(g[start : start + chunk], t)
        values, indices = dist.topk(2, dim=1, largest=False)
        d1.append(values[:, 0])
        d2.append(values[:, 1])
        idx.append(indices[:, 0])
    return torch.cat(d1).numpy(), torch.cat(d2).numpy(), torch.cat(idx).numpy()


def memorization_summary(d1: np.ndarray, d2: np.ndarray, threshold: float = 1 / 3) -> dict:
    """Mean/median nearest distance, mean d1/d2 ratio, and the share of samples with ratio < threshold."""
    ratio = d1 / np.maximum(d2, 1e-12)
    return {
        "nn_distance_mean": float(np.mean(d1)),
        "nn_distance_median": float(np.median(d1)),
        "nn_ratio_mean": float(np.mean(ratio)),
        "memorized_share": float(np.mean(ratio < threshold)),
        "memorized_threshold": float(threshold),
    }
