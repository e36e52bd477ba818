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
    pixels = decode(grid_png(images, ncol=ncol, min_size=0))  # no enlargement
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
    small = decode(grid_png(images, min_size=0))
    big = decode(grid_png(images))  # at least 256 pixels on the larger side
    factor = 256 // max(small.shape)
    assert factor > 1 and big.shape == (small.shape[0] * factor, small.shape[1] * factor)
    np.testing.assert_array_equal(big[::factor, ::factor], small)
