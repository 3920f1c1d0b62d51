"""Crop windows around a lesion box, crop + resize, and paste-back at full resolution.

Boxes and windows are (y1, x1, y2, x2) in original image pixels, y2/x2 exclusive (as
``MaskRCNN.detect``'s ``rois``). A window may reach outside the image: the crop is padded with
zeros (black, like a dermoscope's dark field) and paste-back drops what falls outside. Crops are
square arrays of ``size`` x ``size`` pixels whatever the window's aspect ratio; windows are kept
"square-ish" (long side at most :data:`MAX_ASPECT` times the short one), so a lesion is never
stretched more than that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

#: Longest side / shortest side of a crop window (the short side is grown to respect it).
MAX_ASPECT = 1.5


def limit_aspect(height: float, width: float, max_aspect: float = MAX_ASPECT) -> tuple[float, float]:
    """(height, width) with the shorter side grown so that long / short <= ``max_aspect``."""
    if height > width * max_aspect:
        width = height / max_aspect
    elif width > height * max_aspect:
        height = width / max_aspect
    return height, width


def window_at(center_y: float, center_x: float, height: float, width: float) -> tuple[int, int, int, int]:
    """Integer window (y1, x1, y2, x2) covering ``height`` x ``width`` around the centre (rounded outward)."""
    height, width = limit_aspect(max(height, 1.0), max(width, 1.0))
    return (math.floor(center_y - height / 2), math.floor(center_x - width / 2),
            math.ceil(center_y + height / 2), math.ceil(center_x + width / 2))


def crop_window(box: Sequence[float], margin: float) -> tuple[int, int, int, int]:
    """The inference window of ``box``: each side moved out by ``margin`` x the box's side.

    E.g. box (10, 20, 50, 60) with margin 0.1 -> a 48 x 48 window (6, 16, 54, 64).
    """
    y1, x1, y2, x2 = (float(v) for v in box)
    height, width = max(y2 - y1, 1.0), max(x2 - x1, 1.0)
    return window_at((y1 + y2) / 2, (x1 + x2) / 2, height * (1 + 2 * margin), width * (1 + 2 * margin))


def random_window(box: Sequence[float], rng: np.random.Generator, scale: tuple[float, float],
                  shift: float) -> tuple[int, int, int, int]:
    """A training window around ``box``: each side ``uniform(*scale)`` x the box's side, the centre
    moved by ``uniform(-shift, shift)`` x the box's side on each axis (an imperfect detector's box)."""
    y1, x1, y2, x2 = (float(v) for v in box)
    height, width = max(y2 - y1, 1.0), max(x2 - x1, 1.0)
    sy, sx = rng.uniform(scale[0], scale[1], size=2)
    dy, dx = rng.uniform(-shift, shift, size=2)
    return window_at((y1 + y2) / 2 + dy * height, (x1 + x2) / 2 + dx * width, height * sy, width * sx)


def _window_region(array: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """``array[y1:y2, x1:x2]`` of a window that may reach outside ``array``, padded with zeros."""
    y1, x1, y2, x2 = (int(v) for v in window)
    h, w = array.shape[:2]
    inside = array[max(y1, 0):min(y2, h), max(x1, 0):min(x2, w)]
    top, left = max(0, -y1), max(0, -x1)
    bottom = (y2 - y1) - top - inside.shape[0]
    right = (x2 - x1) - left - inside.shape[1]
    pad = [(top, max(bottom, 0)), (left, max(right, 0))] + [(0, 0)] * (array.ndim - 2)
    if top + left + bottom + right == 0:
        return inside
    if inside.size == 0:  # the window misses the image entirely
        return np.zeros((y2 - y1, x2 - x1) + array.shape[2:], dtype=array.dtype)
    return np.pad(inside, pad)


def crop_resize(array: np.ndarray, window: Sequence[int], size: int) -> np.ndarray:
    """The ``window`` of ``array`` [H, W] or [H, W, C] resized to [size, size(, C)] (area averaging
    when shrinking, bilinear when enlarging); bool input is returned as float32 in [0, 1]."""
    if array.dtype == bool:
        array = array.astype(np.float32)
    region = _window_region(array, window)
    shrinking = region.shape[0] > size or region.shape[1] > size
    resized = cv2.resize(np.ascontiguousarray(region), (size, size),
                         interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return resized.reshape((size, size) + array.shape[2:])


def paste_back(prob: np.ndarray, window: Sequence[int], image_shape: Sequence[int]) -> np.ndarray:
    """float32 [H, W]: the crop's probability map ``prob`` [S, S] resized (bilinear) onto ``window``
    of an image of ``image_shape``; 0 outside the window."""
    y1, x1, y2, x2 = (int(v) for v in window)
    h, w = int(image_shape[0]), int(image_shape[1])
    out = np.zeros((h, w), dtype=np.float32)
    top, left, bottom, right = max(y1, 0), max(x1, 0), min(y2, h), min(x2, w)
    if bottom <= top or right <= left:
        return out
    resized = cv2.resize(np.asarray(prob, dtype=np.float32), (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    out[top:bottom, left:right] = resized[top - y1:bottom - y1, left - x1:right - x1]
    return out


def probability_mask(prob: np.ndarray, threshold: float) -> np.ndarray:
    """bool mask where ``prob >= threshold`` (Matterport's rule for mask probabilities)."""
    return np.asarray(prob) >= threshold

