"""Global properties gamma: a number measured on a model's (or a composition's) samples.

Each property is a plain callable ``prop(images, weights=None) -> float`` with a ``name`` that says
what was measured and in which feature space; ``images`` are a batch of samples (uint8
``[N, C, H, W]``, or floats in [-1, 1] which are quantised as ``samples.npz`` stores them) and
``weights`` the composition's weight trace ``[N, steps, n]`` (``CDMPipelineOutput.weights``).
Draw the samples with fixed seeds so that two models are compared on the same noise. Each class is
a Hydra ``_target_``; runtime objects (feature space, reference statistics, classifier) come in as
keyword arguments (``instantiate(cfg.property, feature_space=...)``). A user's own property is any
callable with this signature.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from cdm.eval.features import FeatureSpace, as_uint8_tensor, to_uint8
from cdm.eval.frechet import FeatureStats, frechet_distance, stats_from_features
from cdm.eval.memorization import memorization_summary, nearest_neighbours
from cdm.jobs.evaluate import metric_names


@runtime_checkable
class GlobalProperty(Protocol):
    """gamma: samples (and their weight trace) -> one number, named."""

    name: str

    def __call__(self, images: Any, weights: torch.Tensor | None = None) -> float: ...


def as_uint8_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` as is; a float tensor in [-1, 1] quantised by ``to_uint8``."""
    t = torch.as_tensor(images)
    if t.is_floating_point():
        t = to_uint8(t)
    return as_uint8_tensor(t)


class FrechetDistanceProperty:
    """Frechet distance of the samples to ``reference`` statistics in ``feature_space``
    (Heusel et al. 2017, via ``cdm.eval.frechet``). Named as ``cdm-eval`` names it (``FD_<dataset>``
    in the domain classifier's features, FID only for the clean-fid Inception protocol). Lower is
    better."""

    def __init__(self, feature_space: FeatureSpace, reference: FeatureStats) -> None:
        if reference.dim != feature_space.dim:
            raise ValueError(
                f"FrechetDistanceProperty: reference statistics have dim {reference.dim} but "
                f"feature space {feature_space.name} has dim {feature_space.dim}; compute them "
                "in the same space"
            )
        self.feature_space = feature_space
        self.reference = reference
        self.name = metric_names(feature_space)[
            0
        ]  # FD_<dataset>, FID only for Inception: as cdm-eval

    def __call__(self, images: Any, weights: torch.Tensor | None = None) -> float:
        feats = self.feature_space(as_uint8_images(images))
        return frechet_distance(stats_from_features(feats), self.reference)


class ClassShareProperty:
    """Share of samples that ``classifier.predict(uint8 images) -> labels`` assigns to ``target``
    (e.g. ``cdm.models.feature_net.DomainFeatures``, the domain classifier)."""

    def __init__(self, classifier: Any, target: int) -> None:
        if not callable(getattr(classifier, "predict", None)):
            raise TypeError(
                "ClassShareProperty: classifier needs predict(uint8 images) -> labels "
                "(e.g. cdm.models.feature_net.DomainFeatures)"
            )
        self.classifier = classifier
        self.target = int(target)
        self.name = f"class_share_{self.target}"

    def __call__(self, images: Any, weights: torch.Tensor | None = None) -> float:
        labels = np.asarray(self.classifier.predict(as_uint8_images(images)))
        return float(np.mean(labels == self.target))


class MeanRouterWeightProperty:
    """Mean composition weight of shard ``shard`` (a column of the weight trace ``[N, steps, n]``)
    over samples and steps."""

    def __init__(self, shard: int) -> None:
        self.shard = int(shard)
        self.name = f"mean_weight_{self.shard}"

    def __call__(self, images: Any, weights: torch.Tensor | None = None) -> float:
        if weights is None:
            raise ValueError(
                f"{self.name}: needs the weight trace [N, steps, n] of the samples "
                "(CDMPipelineOutput.weights)"
            )
        w = torch.as_tensor(weights)
        if w.ndim != 3 or not 0 <= self.shard < w.shape[-1]:
            raise ValueError(
                f"{self.name}: weights must be [N, steps, n] with n > {self.shard}, got "
                f"{tuple(w.shape)}"
            )
        return float(w[..., self.shard].double().mean())


class MemorizedShareProperty:
    """Share of samples whose nearest / second-nearest training distance ratio in
    ``feature_space`` is below ``threshold`` (Carlini et al. 2023, via ``cdm.eval.memorization``);
    ``train_features`` [M, dim] are the training images' features in that space."""

    def __init__(
        self, feature_space: FeatureSpace, train_features: np.ndarray, threshold: float = 1 / 3
    ) -> None:
        self.feature_space = feature_space
        self.train_features = np.asarray(train_features, dtype=np.float64)
        self.threshold = float(threshold)
        self.name = f"memorized_share_{feature_space.name}"

    def __call__(self, images: Any, weights: torch.Tensor | None = None) -> float:
        feats = self.feature_space(as_uint8_images(images))
        d1, d2, _ = nearest_neighbours(feats, self.train_features)
        return memorization_summary(d1, d2, self.threshold)["memorized_share"]
