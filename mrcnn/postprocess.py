"""Turn the network's normalised, padded detections back into original-image results (numpy)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mrcnn.boxes import denorm_boxes, norm_boxes
from mrcnn.imaging import unmold_mask


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


def unmold_detections(detections: np.ndarray, mrcnn_mask: np.ndarray, original_image_shape: Sequence[int],
                      image_shape: Sequence[int], window: Sequence[int]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections [D, 6] and masks [D, mh, mw, C] -> (rois int32 [N, 4] (y1, x1, y2, x2),
    class_ids int32 [N], scores float32 [N], masks bool [H, W, N]) in original-image pixels.

    Padding rows and zero-area boxes are dropped; each mask is its detection's class channel,
    resized into its box and thresholded at 0.5. With N == 0 masks has shape (H, W, 0).
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
    if len(rois):
        full_masks = np.stack([unmold_mask(m, box, (height, width)) for m, box in zip(masks, rois, strict=True)], axis=-1)
    else:
        full_masks = np.zeros((height, width, 0), dtype=bool)
    return rois.astype(np.int32), class_ids, scores, full_masks
