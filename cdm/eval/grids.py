"""Image grids for looking at samples (torchvision's ``make_grid``), with a title line."""

from __future__ import annotations

import io
import math

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from cdm.eval.features import to_uint8

TITLE_MARGIN = 4  # pixels around the title text


def by_class_layout(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``images`` re-ordered row by row so that column k holds the samples of class k, in the
    order drawn; cells a class has no sample for are black. Returns (cells, number of columns)."""
    labels = labels.to(torch.long).cpu()
    if labels.shape != (images.shape[0],) or (labels < 0).any():
        raise ValueError(
            f"grid_png: labels must be [N] class indices >= 0, got shape {tuple(labels.shape)}"
        )
    ncol = int(labels.max()) + 1
    nrow = int(torch.bincount(labels, minlength=ncol).max())
    cells = torch.full((nrow * ncol, *images.shape[1:]), -1.0, dtype=images.dtype)
    for k in range(ncol):
        members = images[labels == k]
        cells[torch.arange(len(members)) * ncol + k] = members
    return cells, ncol


def draw_title(image: Image.Image, title: str) -> Image.Image:
    """``image`` under a black band holding ``title`` in white (PIL's default font); the canvas
    widens when the title is wider than the grid."""
    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), title, font=font)
    band = bottom + 2 * TITLE_MARGIN
    width = max(image.width, right - left + 2 * TITLE_MARGIN)
    canvas = Image.new(image.mode, (width, image.height + band), 0)
    canvas.paste(image, (0, band))
    white = 255 if image.mode == "L" else (255, 255, 255)
    ImageDraw.Draw(canvas).text((TITLE_MARGIN - left, TITLE_MARGIN), title, fill=white, font=font)
    return canvas


def grid_png(
    images: torch.Tensor,
    ncol: int | None = None,
    min_size: int = 256,
    *,
    labels: torch.Tensor | None = None,
    title: str | None = None,
    min_cell: int = 48,
) -> bytes:
    """A PNG grid of images [N, C, H, W] in [-1, 1], ``ncol`` per row (default: a square).

    With ``labels`` (class-conditional samples) column k holds class k's samples instead
    (``by_class_layout``). Cells are separated by a 1-pixel black border (``make_grid(padding=1)``);
    one-channel images stay grayscale. The grid is enlarged by an integer factor (nearest
    neighbour) until each cell is at least ``min_cell`` pixels and its larger side at least
    ``min_size``; ``title`` is then drawn in a band above it.
    """
    if images.dim() != 4:
        raise ValueError(f"grid_png needs images [N, C, H, W], got shape {tuple(images.shape)}")
    images = images.detach().cpu()
    if labels is not None:
        images, ncol = by_class_layout(images, labels)
    ncol = ncol or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(to_uint8(images), nrow=ncol, padding=1, pad_value=0)
    if images.shape[1] == 1:  # make_grid repeats one channel into three
        grid = grid[:1]
    image = to_pil_image(grid)
    cell = max(images.shape[2:])
    scale = max(1, min_size // max(image.size), math.ceil(min_cell / cell))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if title:
        image = draw_title(image, title)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
