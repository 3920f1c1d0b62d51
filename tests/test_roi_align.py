"""PyramidROIAlign vs a small numpy reference of crop_and_resize + Matterport's level rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from mrcnn.roi_align import PyramidROIAlign, roi_pyramid_level

IMAGE = 1024  # molded image side in image_meta (drives the level rule)
MAPS = 128  # the feature maps are those of a 128-px image: P2..P5 are 32, 16, 8, 4


def bilinear_crop(feature: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """crop_and_resize of one box: size x size samples from y1*(H-1) to y2*(H-1), zeros outside."""
    height, width, channels = feature.shape
    y1, x1, y2, x2 = box
    out = np.zeros((size, size, channels), np.float64)
    for i in range(size):
        y = y1 * (height - 1) + i * (y2 - y1) * (height - 1) / (size - 1)
        for j in range(size):
            x = x1 * (width - 1) + j * (x2 - x1) * (width - 1) / (size - 1)
            if not (0 <= y <= height - 1 and 0 <= x <= width - 1):
                continue
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            yb, xb = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            dy, dx = y - y0, x - x0
            top = feature[y0, x0] * (1 - dx) + feature[y0, xb] * dx
            bottom = feature[yb, x0] * (1 - dx) + feature[yb, xb] * dx
            out[i, j] = top * (1 - dy) + bottom * dy
    return out


def numpy_level(box: np.ndarray, area: float) -> int:
    h, w = box[2] - box[0], box[3] - box[1]
    if h * w <= 0:
        return 2
    return int(np.clip(4 + np.round(np.log2(np.sqrt(h * w) / (224.0 / np.sqrt(area)))), 2, 5))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((2, MAPS // s, MAPS // s, 3)).astype(np.float32) for s in (4, 8, 16, 32)]
    boxes = np.array([
        [[0.1, 0.1, 0.2, 0.25], [0.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.7, 0.9], [0.0, 0.0, 0.0, 0.0]],
        [[0.5, 0.5, 0.52, 0.55], [0.2, 0.1, 0.45, 0.35], [-0.1, 0.3, 0.4, 1.05], [0.25, 0.25, 0.75, 0.75]],
    ], np.float32)
    meta = np.zeros((2, 14), np.float32)
    meta[:, 4:7] = [IMAGE, IMAGE, 3]
    return boxes, meta, maps


def test_levels_follow_matterport_rule(inputs):
    boxes, _, _ = inputs
    levels = roi_pyramid_level(tf.constant(boxes), tf.constant(float(IMAGE * IMAGE))).numpy()
    expected = np.array([[numpy_level(b, IMAGE * IMAGE) for b in row] for row in boxes])
    np.testing.assert_array_equal(levels, expected)
    assert set(expected.ravel()) == {2, 3, 4, 5}, "fixture covers every level"
    assert levels[0, 3] == 2, "zero padding boxes land on level 2"


@pytest.mark.parametrize("min_level", [2, 3, 4])
def test_roi_align_matches_numpy_reference(inputs, min_level):
    """Each box pooled from max(Matterport's level, min_level); 2 = Matterport's rule alone."""
    boxes, meta, maps = inputs
    layer = PyramidROIAlign((5, 5), min_level=min_level, name=f"roi_align_min{min_level}")
    out = layer([tf.constant(boxes), tf.constant(meta), *maps]).numpy()
    assert out.shape == (2, 4, 5, 5, 3)
    moved = 0
    for b in range(2):
        for n in range(4):
            rule = numpy_level(boxes[b, n], IMAGE * IMAGE)
            level = max(rule, min_level)
            moved += level != rule
            expected = bilinear_crop(maps[level - 2][b], boxes[b, n], 5)
            np.testing.assert_allclose(out[b, n], expected, atol=1e-5, err_msg=f"image {b} box {n} level {level}")
    assert (moved >= 2) == (min_level > 2), "the fixture has boxes below levels 3 and 4"
    assert PyramidROIAlign.from_config(layer.get_config()).min_level == min_level


def test_min_level_outside_the_pyramid_is_refused():
    with pytest.raises(ValueError, match="min_level must be in 2..5, got 6"):
        PyramidROIAlign((5, 5), min_level=6)
