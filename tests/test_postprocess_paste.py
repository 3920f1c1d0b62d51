"""postprocess.paste_masks (numpy gathers) gives exactly imaging.unmold_mask's masks (scipy zoom)."""

from __future__ import annotations

import numpy as np
import pytest

from mrcnn.imaging import unmold_mask
from mrcnn.postprocess import paste_masks


@pytest.mark.parametrize("kind", ["uniform", "blob", "all_above_half"])
def test_paste_masks_equals_unmold_mask(kind):
    rng = np.random.default_rng(len(kind))
    height, width, n = 300, 410, 40
    if kind == "uniform":
        masks = rng.random((n, 28, 28))
    elif kind == "blob":
        yy, xx = np.mgrid[:28, :28]
        masks = np.stack([1 / (1 + np.exp(-(8 - np.hypot(yy - 14 + rng.normal(), xx - 14)) * rng.uniform(0.3, 3)))
                          for _ in range(n)])
    else:  # every value >= 0.5: the clip to the mask's range decides the zero-blended border
        masks = rng.uniform(0.5, 1.0, (n, 28, 28))
    masks = masks.astype(np.float32)
    y1, x1 = rng.integers(0, height - 1, n), rng.integers(0, width - 1, n)
    y2 = np.minimum(height, y1 + rng.integers(1, 250, n))
    x2 = np.minimum(width, x1 + rng.integers(1, 250, n))
    boxes = np.stack([y1, x1, y2, x2], axis=1)
    boxes[0] = [5, 7, 33, 35]   # 28x28: no resampling
    boxes[1] = [0, 0, 1, 1]     # one pixel
    expected = np.stack([unmold_mask(m, b, (height, width)) for m, b in zip(masks, boxes, strict=True)], axis=-1)
    got = paste_masks(masks, boxes, (height, width))
    assert got.dtype == bool and got.shape == (height, width, n)
    np.testing.assert_array_equal(got, expected)


def test_paste_no_masks():
    assert paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), int), (5, 6)).shape == (5, 6, 0)
