"""Turn the network's normalised, padded detections back into original-image results (numpy)."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from mrcnn.boxes import denorm_boxes, norm_boxes


def detection_count(detections: np.ndarray) -> int:
    """Rows before the first padding row (class id 0) of detections [D, 6]."""
    padding = np.where(detections[:, 4] == 0)[0]
    return int(padding[0]) if padding.size else detections.shape[0]


def boxes_to_original(boxes: np.ndarray, window: Sequence[int], molded_shape: Sequence[int],
                      original_shape: Sequence[int]) -> np.ndarray:
    """Normalised boxes [N, 4] in the molded image -> int32 pixel boxes [N, 4] in the original image.

    ``window`` (y1, x1, y2, x2) is the original image's place in the molded image (pixels).
    """
    wy1, wx1, wy2, wx2 = norm_boxes(np.asarray(window), molded_shape[:2])
    shift = np.array([wy1, wx1, wy1, wx1])
    scale = np.array([wy2 - wy1, wx2 - wx1, wy2 - wy1, wx2 - wx1])
    return denorm_boxes(np.divide(boxes - shift, scale), original_shape[:2])


@lru_cache(maxsize=4096)
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D linear resampling of n_in samples to n_out on the pixel-centre grid, zeros outside the
    input (scipy's zoom with grid_mode=True, order 1, mode "grid-constant" = scikit-image's resize
    order 1, mode "constant"): output i reads coordinate (i + 0.5) * n_in / n_out - 0.5.

    Returns (lower, upper, upper_weight) with indices into the input zero-padded by one sample
    on each side; output i = (1 - w) * padded[lower] + w * padded[upper].
    """
    coords = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    floor = np.floor(coords)
    lower = floor.astype(np.int64) + 1
    taps = (lower, lower + 1, coords - floor)
    for array in taps:
        array.flags.writeable = False  # cached: shared by every call
    return taps


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float mask [mh, mw] -> float64 [height, width], the values of ``mrcnn.imaging.resize``
    (scikit-image order-1 "constant" resize, clipped to the mask's range) by two linear passes."""
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape == (height, width):
        return mask.copy()
    padded = np.pad(mask, 1)
    lower, upper, w = _linear_taps(mask.shape[0], height)
    rows = padded[lower] * (1.0 - w)[:, None] + padded[upper] * w[:, None]          # [height, mw + 2]
    lower, upper, w = _linear_taps(mask.shape[1], width)
    out = rows[:, lower] * (1.0 - w) + rows[:, upper] * w                            # [height, width]
    return np.clip(out, mask.min(), mask.max(), out=out)


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_shape: Sequence[int],
                threshold: float = 0.5) -> np.ndarray:
    """Float masks [N, mh, mw] -> bool [H, W, N]: each resized into its box (y1, x1, y2, x2, pixels,
    y2/x2 exclusive, non-empty) and kept where >= ``threshold``.

    Same result as ``mrcnn.imaging.unmold_mask`` per mask (scikit-image's order-1 "constant"
    resize), computed with numpy gathers instead of one scipy zoom per mask: about 9x less CPU
    for 100 masks at 512 px (detect() pastes up to DETECTION_MAX_INSTANCES of them).
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    full = np.zeros((height, width, len(boxes)), dtype=bool)
    for k, (mask, (y1, x1, y2, x2)) in enumerate(zip(masks, np.asarray(boxes, dtype=np.int64), strict=True)):
        full[y1:y2, x1:x2, k] = resize_mask(mask, int(y2 - y1), int(x2 - x1)) >= threshold
    return full


def unmold_detections(detections: np.ndarray, mrcnn_mask: np.ndarray, original_image_shape: Sequence[int],
                      image_shape: Sequence[int], window: Sequence[int], mask_threshold: float = 0.5
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections [D, 6] and masks [D, mh, mw, C] -> (rois int32 [N, 4] (y1, x1, y2, x2),
    class_ids int32 [N], scores float32 [N], masks bool [H, W, N]) in original-image pixels.

    Padding rows and zero-area boxes are dropped; each mask is its detection's class channel,
    resized into its box and kept where >= ``mask_threshold``. With N == 0 masks has shape (H, W, 0).
    """
    n = detection_count(detections)
    boxes = detections[:n, :4]
    class_ids = detections[:n, 4].astype(np.int32)
    scores = detections[:n, 5].astype(np.float32)
    masks = mrcnn_mask[np.arange(n), :, :, class_ids]

    rois = boxes_to_original(boxes, window, image_shape, original_image_shape)
    nonempty = (rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]) > 0
    rois, class_ids, scores, masks = rois[nonempty], class_ids[nonempty], scores[nonempty], masks[nonempty]

    height, width = int(original_image_shape[0]), int(original_image_shape[1])
    full_masks = paste_masks(masks, rois, (height, width), mask_threshold)
    return rois.astype(np.int32), class_ids, scores, full_masks
