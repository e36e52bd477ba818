"""Image grids for looking at samples (torchvision's ``make_grid``)."""

from __future__ import annotations

import io
import math

import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from cdm.eval.features import to_uint8


def grid_png(images: torch.Tensor, ncol: int | None = None, min_size: int = 256) -> bytes:
    """A PNG grid of images [N, C, H, W] in [-1, 1], one per cell in order, ``ncol`` per row.

    Cells are separated by a 1-pixel black border (``make_grid(padding=1)``); one-channel
    images stay grayscale. The grid is enlarged by an integer factor (nearest neighbour) until
    its larger side is at least ``min_size`` pixels, so tiny samples stay visible.
    """
    if images.dim() != 4:
        raise ValueError(f"grid_png needs images [N, C, H, W], got shape {tuple(images.shape)}")
    ncol = ncol or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(to_uint8(images.detach().cpu()), nrow=ncol, padding=1, pad_value=0)
    if images.shape[1] == 1:  # make_grid repeats one channel into three
        grid = grid[:1]
    image = to_pil_image(grid)
    scale = max(1, min_size // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
