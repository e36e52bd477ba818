"""The PNG grid of samples (torchvision's make_grid): one image per cell, in order."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cdm.eval.features import to_uint8
from cdm.eval.grids import grid_png


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.parametrize(("n", "channels", "ncol"), [(10, 1, None), (6, 3, 4), (2, 1, 1)])
def test_grid_holds_every_image_in_order_with_a_black_border(n, channels, ncol):
    images = torch.rand(n, channels, 5, 7, generator=torch.Generator().manual_seed(n)) * 2 - 1
    pixels = decode(grid_png(images, ncol=ncol, min_size=0, min_cell=0))  # no enlargement
    cols = ncol or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    assert pixels.shape[:2] == (rows * 6 + 1, cols * 8 + 1)
    assert pixels.ndim == (2 if channels == 1 else 3)  # grayscale stays grayscale
    expected = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        cell = pixels[1 + r * 6 : 1 + r * 6 + 5, 1 + c * 8 : 1 + c * 8 + 7]
        np.testing.assert_array_equal(
            cell, expected[i].squeeze(-1) if channels == 1 else expected[i]
        )
    assert not pixels[0].any() and not pixels[:, 0].any()  # the border is black
    for i in range(n, rows * cols):  # cells past the last image stay empty
        r, c = divmod(i, cols)
        assert not pixels[1 + r * 6 : 1 + r * 6 + 5, 1 + c * 8 : 1 + c * 8 + 7].any()


def test_small_grids_are_enlarged_by_an_integer_factor():
    images = torch.zeros(4, 1, 8, 8)
    small = decode(grid_png(images, min_size=0, min_cell=0))
    big = decode(grid_png(images, min_cell=0))  # at least 256 pixels on the larger side
    factor = 256 // max(small.shape)
    assert factor > 1 and big.shape == (small.shape[0] * factor, small.shape[1] * factor)
    np.testing.assert_array_equal(big[::factor, ::factor], small)


def test_class_conditional_grids_put_class_k_in_column_k_and_are_readable():
    """Issue 11 item 13: one column per class, cells of >= 48 px, whatever order samples came in."""
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 3, 1, 0, 3, 2])
    images = (labels.float() / 4 - 0.9).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    pixels = decode(grid_png(images, labels=labels, min_size=0))
    scale = 6  # ceil(48 / 8)
    step = 9 * scale  # 8 pixels and the 1-pixel border, enlarged
    assert pixels.shape == (4 * step + scale, 4 * step + scale)  # 4 classes, class 2 has 4 samples
    value = to_uint8(images[:, :, 0, 0]).squeeze(1)
    for k in range(4):
        count = int((labels == k).sum())
        for row in range(4):
            cell = pixels[scale + row * step : (row + 1) * step, scale + k * step : (k + 1) * step]
            if row < count:
                assert (cell == int(value[labels == k][0])).all(), (k, row)
            else:
                assert not cell.any(), (k, row)  # a class with fewer samples leaves black cells


def test_the_title_is_drawn_in_a_band_above_the_grid():
    images = torch.ones(4, 1, 8, 8) * -1  # black samples: only the title can light a pixel
    plain = decode(grid_png(images, min_size=0))
    titled = decode(grid_png(images, min_size=0, title="digits_4split: classifier, ddim 25 steps"))
    band = titled.shape[0] - plain.shape[0]
    assert band > 8 and titled.shape[1] >= plain.shape[1]  # wider than the grid: the canvas grows
    assert titled[:band].max() > 200 and (titled[:band] > 0).sum() > 50  # text pixels
    np.testing.assert_array_equal(titled[band:, : plain.shape[1]], plain)
    assert not plain.any()
