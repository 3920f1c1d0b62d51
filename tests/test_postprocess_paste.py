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


def test_paste_threshold_by_hand():
    """A 2x2 mask pasted into a 2x2 box is not resampled: each threshold keeps the values >= it."""
    mask = np.array([[[0.2, 0.35], [0.5, 0.9]]], np.float32)
    box = np.array([[1, 1, 3, 3]])
    for threshold, kept in [(0.5, [[0, 0], [1, 1]]), (0.3, [[0, 1], [1, 1]]), (0.95, [[0, 0], [0, 0]])]:
        full = paste_masks(mask, box, (4, 4), threshold)[..., 0]
        np.testing.assert_array_equal(full[1:3, 1:3], np.array(kept, bool))
        assert not full[0].any() and not full[:, 0].any() and not full[3].any() and not full[:, 3].any()
        np.testing.assert_array_equal(unmold_mask(mask[0], box[0], (4, 4), threshold), full)


def test_detect_result_uses_config_mask_threshold():
    """MaskRCNN turns the head's probabilities into masks with config.DETECTION_MASK_THRESHOLD."""
    from types import SimpleNamespace

    from mrcnn.model import MaskRCNN

    detections = np.array([[0, 0, 1, 1, 1, 0.9]], np.float32)   # one box (normalised) filling the image
    probs = np.full((1, 4, 4, 2), 0.4, np.float32)               # class 1 probability 0.4 everywhere
    model = MaskRCNN.__new__(MaskRCNN)
    for threshold, expected in [(0.5, 0), (0.3, 16)]:
        model.config = SimpleNamespace(DETECTION_MASK_THRESHOLD=threshold)
        result = model._result(detections, probs, (4, 4, 3), (4, 4, 3), (0, 0, 4, 4))
        assert int(result["masks"].sum()) == expected
