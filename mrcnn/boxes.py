"""NumPy box and anchor helpers (Matterport semantics).

Boxes are (y1, x1, y2, x2). Pixel boxes have exclusive y2/x2; normalised boxes use the
(h-1, w-1) scale with a +1 shift on y2/x2, so pixel (0, 0, h, w) normalises to (0, 0, 1, 1).
Deltas are (dy, dx, log dh, log dw) in centre/size form. Areas are (y2 - y1)(x2 - x1), no +1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def extract_bboxes(mask: np.ndarray) -> np.ndarray:
    """Tight boxes of instance masks [H, W, N] -> int32 [N, 4] (y2/x2 exclusive; empty -> zeros)."""
    mask = np.asarray(mask).astype(bool)
    rows = np.any(mask, axis=1)  # [H, N]
    cols = np.any(mask, axis=0)  # [W, N]
    present = rows.any(axis=0)
    y1 = np.argmax(rows, axis=0)
    y2 = rows.shape[0] - np.argmax(rows[::-1], axis=0)
    x1 = np.argmax(cols, axis=0)
    x2 = cols.shape[0] - np.argmax(cols[::-1], axis=0)
    boxes = np.stack([y1, x1, y2, x2], axis=1).astype(np.int32)
    boxes[~present] = 0
    return boxes


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas [N] of boxes [N, 4]: (y2 - y1) * (x2 - x1)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def compute_iou(box: np.ndarray, boxes: np.ndarray, box_area: Any, boxes_area: np.ndarray) -> np.ndarray:
    """IoU [N] of one box [4] with boxes [N, 4], given their precomputed areas (0 where both are empty)."""
    y1 = np.maximum(box[0], boxes[:, 0])
    y2 = np.minimum(box[2], boxes[:, 2])
    x1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[3], boxes[:, 3])
    intersection = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    union = box_area + boxes_area - intersection
    iou = np.zeros(np.shape(union), np.result_type(intersection, union, np.float32))
    return np.divide(intersection, union, out=iou, where=union > 0)


def compute_overlaps(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU matrix float64 [N1, N2] of boxes1 [N1, 4] and boxes2 [N2, 4]."""
    boxes1 = np.asarray(boxes1)
    boxes2 = np.asarray(boxes2)
    area1 = box_areas(boxes1)[:, None]
    area2 = box_areas(boxes2)[None, :]
    b1 = boxes1[:, None, :]
    b2 = boxes2[None, :, :]
    h = np.maximum(np.minimum(b1[..., 2], b2[..., 2]) - np.maximum(b1[..., 0], b2[..., 0]), 0)
    w = np.maximum(np.minimum(b1[..., 3], b2[..., 3]) - np.maximum(b1[..., 1], b2[..., 1]), 0)
    intersection = w * h
    overlaps = intersection / (area2 + area1 - intersection)
    return overlaps.astype(np.float64, copy=False).reshape(len(boxes1), len(boxes2))


def compute_overlaps_masks(masks1: np.ndarray, masks2: np.ndarray) -> np.ndarray:
    """Mask IoU float32 [N1, N2] of masks [H, W, N1] and [H, W, N2] (thresholded > 0.5)."""
    n1, n2 = masks1.shape[-1], masks2.shape[-1]
    if n1 == 0 or n2 == 0:
        return np.zeros((n1, n2))
    m1 = np.reshape(masks1 > 0.5, (-1, n1)).astype(np.float32)
    m2 = np.reshape(masks2 > 0.5, (-1, n2)).astype(np.float32)
    area1 = m1.sum(axis=0)
    area2 = m2.sum(axis=0)
    intersections = m1.T @ m2
    union = area1[:, None] + area2[None, :] - intersections
    with np.errstate(invalid="ignore", divide="ignore"):
        return intersections / union


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS: int32 indices of kept boxes [N, 4], by descending score; drop IoU > threshold."""
    assert boxes.shape[0] > 0, "non_max_suppression needs at least one box"
    if boxes.dtype.kind != "f":
        boxes = boxes.astype(np.float32)
    areas = box_areas(boxes)
    order = np.asarray(scores).argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iou = compute_iou(boxes[i], boxes[rest], areas[i], areas[rest])
        order = rest[iou <= threshold]
    return np.array(keep, dtype=np.int32)


def _centre_size(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[N, 4] (y1, x1, y2, x2) -> (cy, cx, h, w), each [N]."""
    h = boxes[:, 2] - boxes[:, 0]
    w = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * h, boxes[:, 1] + 0.5 * w, h, w


def apply_box_deltas(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Refine boxes [N, 4] by deltas [N, 4] (dy, dx, log dh, log dw) -> float [N, 4]."""
    boxes = np.asarray(boxes).astype(np.float32)
    cy, cx, h, w = _centre_size(boxes)
    cy = cy + deltas[:, 0] * h
    cx = cx + deltas[:, 1] * w
    h = h * np.exp(deltas[:, 2])
    w = w * np.exp(deltas[:, 3])
    y1 = cy - 0.5 * h
    x1 = cx - 0.5 * w
    return np.stack([y1, x1, y1 + h, x1 + w], axis=1)


def box_refinement(box: np.ndarray, gt_box: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Deltas [N, 4] (dy, dx, log dh, log dw) turning box [N, 4] into gt_box [N, 4].

    Computed in ``dtype``: float32 as Matterport's ``utils.box_refinement``; the RPN targets
    (:func:`mrcnn.targets.build_rpn_targets`) use float64, as Matterport's ``build_rpn_targets``.
    """
    box = np.asarray(box).astype(dtype)
    gt_box = np.asarray(gt_box).astype(dtype)
    cy, cx, h, w = _centre_size(box)
    gcy, gcx, gh, gw = _centre_size(gt_box)
    return np.stack([(gcy - cy) / h, (gcx - cx) / w, np.log(gh / h), np.log(gw / w)], axis=1)


def _norm_scale_shift(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape[0], shape[1]
    return np.array([h - 1, w - 1, h - 1, w - 1]), np.array([0, 0, 1, 1])


def norm_boxes(boxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Pixel boxes [N, 4] (y2/x2 exclusive) -> float32 normalised boxes for image shape (h, w)."""
    scale, shift = _norm_scale_shift(shape)
    return np.divide(boxes - shift, scale).astype(np.float32)


def denorm_boxes(boxes: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Normalised boxes [N, 4] -> int32 pixel boxes (y2/x2 exclusive) for image shape (h, w)."""
    scale, shift = _norm_scale_shift(shape)
    return np.around(np.multiply(boxes, scale) + shift).astype(np.int32)


def trim_zeros(x: np.ndarray) -> np.ndarray:
    """Drop the all-zero rows of a 2-D array [N, C]."""
    assert len(x.shape) == 2, "trim_zeros expects a 2-D array"
    return x[~np.all(x == 0, axis=1)]


def generate_anchors(scales: Any, ratios: Any, shape: Sequence[int], feature_stride: int,
                     anchor_stride: int) -> np.ndarray:
    """Pixel anchors [H/as * W/as * len(ratios) * len(scales), 4] (y1, x1, y2, x2) for one level.

    ratio = width / height; centres at arange(0, H, anchor_stride) * feature_stride (no half-stride
    offset); order = row-major cells, then ratio, then scale (fastest). Not clipped.
    """
    scales, ratios = np.meshgrid(np.array(scales), np.array(ratios))
    scales, ratios = scales.flatten(), ratios.flatten()
    heights = scales / np.sqrt(ratios)
    widths = scales * np.sqrt(ratios)
    ys = np.arange(0, shape[0], anchor_stride) * feature_stride
    xs = np.arange(0, shape[1], anchor_stride) * feature_stride
    cx, cy = np.meshgrid(xs, ys)  # [Hs, Ws] each
    cy = np.repeat(cy.reshape(-1, 1), len(heights), axis=1)  # [cells, k]
    cx = np.repeat(cx.reshape(-1, 1), len(widths), axis=1)
    hh = np.broadcast_to(heights, cy.shape)
    ww = np.broadcast_to(widths, cx.shape)
    boxes = np.stack([cy - 0.5 * hh, cx - 0.5 * ww, cy + 0.5 * hh, cx + 0.5 * ww], axis=-1)
    return boxes.reshape(-1, 4)


def generate_pyramid_anchors(scales: Sequence[float], ratios: Sequence[float], feature_shapes: Any,
                             feature_strides: Sequence[int], anchor_stride: int) -> np.ndarray:
    """Concatenated pixel anchors [A, 4] over pyramid levels (scales[i] on level i, P2 first)."""
    levels = [generate_anchors(scales[i], ratios, feature_shapes[i], feature_strides[i], anchor_stride)
              for i in range(len(scales))]
    return np.concatenate(levels, axis=0)


def compute_backbone_shapes(config: Any, image_shape: Sequence[int]) -> np.ndarray:
    """[[ceil(H / s), ceil(W / s)] for s in BACKBONE_STRIDES] (int64 [5, 2]) for an image shape."""
    if callable(config.BACKBONE):
        return config.COMPUTE_BACKBONE_SHAPE(image_shape)
    assert config.BACKBONE in ("resnet50", "resnet101", "resnet18", "resnet34"), f"unknown BACKBONE {config.BACKBONE!r}"
    return np.array([[int(math.ceil(image_shape[0] / s)), int(math.ceil(image_shape[1] / s))]
                     for s in config.BACKBONE_STRIDES])
