"""A domain feature network: a small CNN classifier whose penultimate layer is a feature space.

Trained on a dataset's own train split (``cdm-train stage=feature_net``), its ``features(x)`` give
a Frechet distance for small images where Inception is slow or meaningless. The metric in this
space is reported under its own name, ``FD_<dataset>`` (e.g. ``FD_digits``), never as FID.

Pure torch (+ numpy for ``DomainFeatures``' output).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

FEATURE_NET_ARCH = "convnet-gn-v1"


def _groups(channels: int, wanted: int) -> int:
    """The largest group count <= ``wanted`` that divides ``channels``."""
    return math.gcd(channels, max(1, wanted))


NORMS = ("group", "batch")


def _conv_block(c_in: int, c_out: int, stride: int, norm_groups: int, norm: str) -> nn.Sequential:
    layer = (
        nn.GroupNorm(_groups(c_out, norm_groups), c_out)
        if norm == "group"
        else nn.BatchNorm2d(c_out)
    )
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), layer, nn.SiLU())


def downsample_steps(resolution: int, target: int = 4) -> int:
    """How many stride-2 convs take ``resolution`` down to ``target`` or less (28 -> 14 -> 7 -> 4: 3)."""
    steps, size = 0, int(resolution)
    while size > target:
        size = (size + 1) // 2
        steps += 1
    return steps


def metric_name(dataset: str) -> str:
    """The name of the Frechet distance in a dataset's feature-net space: ``FD_digits``."""
    return f"FD_{dataset}"


def feature_space_name(dataset: str) -> str:
    """The name of a dataset's feature-net space: ``digits_net``."""
    return f"{dataset}_net"


class FeatureNet(nn.Module):
    """Conv-GN-SiLU classifier for ``[B, C, R, R]`` images in ``[-1, 1]`` (R from 4 to 64 or more).

    A stem conv at full resolution, then stride-2 stages (conv stride 2 + conv) down to ~4x4, a
    global mean pool, a ``feature_dim`` linear + SiLU layer (the features) and a linear layer to
    ``n_classes`` logits. Stage ``i`` has ``widths[min(i, len(widths) - 1)]`` channels. No
    dropout. ``norm="group"`` (the default: train and eval mode compute the same function) or
    ``"batch"``: sparse canvases (a few small objects on a flat background, ``data=captioned``) leave a
    GroupNorm net at chance (test accuracy 0.067 on captioned_3band's canvases), a BatchNorm one
    learns them; its features are computed in eval mode (running statistics), so they are a fixed
    function of the image too.
    """

    def __init__(
        self,
        *,
        channels: int,
        resolution: int,
        n_classes: int,
        widths: Sequence[int] = (32, 64, 128),
        feature_dim: int = 128,
        norm_groups: int = 8,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"FeatureNet norm={norm!r}: choose one of {list(NORMS)}")
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1 or n_classes < 2 or feature_dim < 1:
            raise ValueError(
                f"FeatureNet needs widths >= 1, n_classes >= 2 and feature_dim >= 1; got "
                f"widths={widths}, n_classes={n_classes}, feature_dim={feature_dim}"
            )
        if channels < 1 or resolution < 1:
            raise ValueError(f"bad input shape: channels={channels}, resolution={resolution}")
        self.channels = int(channels)
        self.resolution = int(resolution)
        self.n_classes = int(n_classes)
        self.feature_dim = int(feature_dim)
        self.widths = widths
        self.norm_groups = int(norm_groups)
        self.norm = norm
        n_down = downsample_steps(self.resolution)
        width = [widths[min(i, len(widths) - 1)] for i in range(n_down + 1)]
        stages: list[nn.Module] = [_conv_block(self.channels, width[0], 1, norm_groups, norm)]
        for i in range(n_down):
            stages.append(
                nn.Sequential(
                    _conv_block(width[i], width[i + 1], 2, norm_groups, norm),
                    _conv_block(width[i + 1], width[i + 1], 1, norm_groups, norm),
                )
            )
        self.body = nn.Sequential(*stages)
        self.embed = nn.Sequential(nn.Linear(width[-1], self.feature_dim), nn.SiLU())
        self.head = nn.Linear(self.feature_dim, self.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feature_dim]`` of images ``[B, C, R, R]`` in ``[-1, 1]``."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"FeatureNet takes [B, {self.channels}, H, W] images, got {tuple(x.shape)}"
            )
        h = self.body(x).mean(dim=(2, 3))  # a plain mean: deterministic, any input size
        return self.embed(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, n_classes]``."""
        return self.head(self.features(x))

    def config(self) -> dict[str, Any]:
        """The JSON config that rebuilds this network (see ``feature_net_from_config``)."""
        return {
            "arch": FEATURE_NET_ARCH,
            "channels": self.channels,
            "resolution": self.resolution,
            "n_classes": self.n_classes,
            "widths": list(self.widths),
            "feature_dim": self.feature_dim,
            "norm_groups": self.norm_groups,
            "norm": self.norm,
        }


def feature_net_from_config(config: Mapping[str, Any]) -> FeatureNet:
    """A fresh ``FeatureNet`` from its stored config."""
    config = dict(config)
    arch = config.pop("arch", FEATURE_NET_ARCH)
    if arch != FEATURE_NET_ARCH:
        raise ValueError(f"unknown feature net arch {arch!r}: this code builds {FEATURE_NET_ARCH}")
    return FeatureNet(**config)


class DomainFeatures:
    """The ``FeatureSpace`` (``cdm.eval.features``) of a trained feature net's penultimate layer.

    ``name`` is ``<dataset>_net`` (e.g. ``digits_net``); the Frechet distance in it is
    ``metric_name`` = ``FD_<dataset>``, never FID. ``__call__`` takes uint8 ``[N, C, R, R]`` images
    (0..255), maps them to ``x / 127.5 - 1`` exactly as the datasets do, and returns float64
    ``[N, dim]`` features computed in eval mode, in batches, under ``torch.inference_mode``.
    """

    def __init__(
        self,
        net: FeatureNet,
        dataset: str,
        *,
        batch_size: int = 512,
        device: str | torch.device | None = None,
        card: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net = net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.dataset = dataset
        self.name = feature_space_name(dataset)
        self.metric_name = metric_name(dataset)
        self.dim = int(net.feature_dim)
        self.channels = int(net.channels)
        self.resolution = int(net.resolution)
        self.batch_size = int(batch_size)
        self.card = dict(card) if card is not None else {}

    def __repr__(self) -> str:
        return (
            f"DomainFeatures(name={self.name!r}, dim={self.dim}, "
            f"input=[N, {self.channels}, {self.resolution}, {self.resolution}] uint8)"
        )

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        """``[N, C, R, R]`` uint8 images -> ``[N, dim]`` float64 features."""
        images = torch.as_tensor(images_uint8)
        expected = (self.channels, self.resolution, self.resolution)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{self.name} takes uint8 images [N, {', '.join(map(str, expected))}], got dtype "
                f"{images.dtype} shape {tuple(images.shape)} (convert float images in [-1, 1] "
                "with cdm.eval.features.to_uint8; resize to the net's resolution first)"
            )
        return self._run(images, self.net.features, self.dim).astype(np.float64)

    def predict(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        """The classifier's label of each uint8 image (for the label accuracy of samples)."""
        self(images_uint8[:1])  # same input checks as the features
        n_classes = int(self.net.n_classes)
        logits = self._run(torch.as_tensor(images_uint8), self.net, n_classes)
        return logits.argmax(axis=1)

    @property
    def parents(self) -> list[dict[str, Any]]:
        """The feature net as a card parent of statistics computed in this space."""
        return [
            {
                "kind": "feature_net",
                "name": self.card.get("name"),
                "hash": self.card.get("weights_sha256"),
            }
        ]

    def _run(self, images: torch.Tensor, fn, width: int) -> np.ndarray:
        out = np.empty((images.shape[0], width), dtype=np.float64)
        self.net.eval()
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                chunk = images[start : start + self.batch_size].to(self.device)
                x = chunk.float() / 127.5 - 1.0  # as ArrayDataset: (x / 127.5 - 1).clamp(-1, 1)
                out[start : start + len(chunk)] = fn(x).double().cpu().numpy()
        return out
