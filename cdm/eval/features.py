"""The interface every feature space used by the metrics implements.

A feature space maps a batch of images, stored the way samples are stored (``uint8``, ``[N, C, H, W]``,
0..255), to one feature vector per image. Generated samples are quantised to ``uint8`` before they
are saved (``samples.npz``), and dataset images are quantised the same way before their features are
taken, so both sides of a metric see the same kind of input (clean-fid's protocol does the same).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class FeatureSpace(Protocol):
    """``name`` identifies the space in cards and cached statistics; ``dim`` is the feature size."""

    name: str
    dim: int

    def __call__(self, images_uint8: torch.Tensor | np.ndarray) -> np.ndarray:
        """``[N, C, H, W]`` uint8 images -> ``[N, dim]`` float64 features."""
        ...


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` -> ``uint8`` 0..255, rounded exactly as ``samples.npz`` stores them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def as_uint8_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Check and convert an ``[N, C, H, W]`` uint8 batch (numpy or torch) to a torch tensor."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(
            f"feature spaces take uint8 images [N, C, H, W]; got dtype {t.dtype} shape "
            f"{tuple(t.shape)} (convert float images in [-1, 1] with cdm.eval.features.to_uint8)"
        )
    return t
