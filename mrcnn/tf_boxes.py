"""TensorFlow graph ops on boxes (float32, static-shape friendly, usable inside tf.function).

Boxes are (y1, x1, y2, x2); deltas are (dy, dx, log dh, log dw) in centre/size form.
Pixel boxes have exclusive y2/x2; normalised boxes use the (h-1, w-1) scale with a +1 shift on y2/x2.
"""

from __future__ import annotations

import math

import tensorflow as tf

#: Largest log size change applied by a delta (a box may grow at most 1000/16 = 62.5x per side),
#: as torchvision and detectron2 clamp: keeps exp() finite when an untrained head emits large
#: values, instead of inf/NaN boxes. Trained models stay far below it.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def _centre_size(boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """[N, 4] (y1, x1, y2, x2) -> (cy, cx, h, w), each [N]."""
    h = boxes[:, 2] - boxes[:, 0]
    w = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * h, boxes[:, 1] + 0.5 * w, h, w


def apply_box_deltas_graph(boxes: tf.Tensor, deltas: tf.Tensor) -> tf.Tensor:
    """Refine boxes [N, 4] (y1, x1, y2, x2) by deltas [N, 4] (dy, dx, log dh, log dw) -> [N, 4].

    log dh and log dw are capped at MAX_LOG_SCALE (Matterport does not cap: inf boxes there).
    """
    boxes = tf.cast(boxes, tf.float32)
    deltas = tf.cast(deltas, tf.float32)
    cy, cx, h, w = _centre_size(boxes)
    cy = cy + deltas[:, 0] * h
    cx = cx + deltas[:, 1] * w
    h = h * tf.exp(tf.minimum(deltas[:, 2], MAX_LOG_SCALE))
    w = w * tf.exp(tf.minimum(deltas[:, 3], MAX_LOG_SCALE))
    y1 = cy - 0.5 * h
    x1 = cx - 0.5 * w
    return tf.stack([y1, x1, y1 + h, x1 + w], axis=1, name="apply_box_deltas_out")


def clip_boxes_graph(boxes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """Clip boxes [N, 4] (y1, x1, y2, x2) into window [4] (wy1, wx1, wy2, wx2) -> [N, 4]."""
    boxes = tf.cast(boxes, tf.float32)
    wy1, wx1, wy2, wx2 = tf.split(tf.cast(window, tf.float32), 4)
    y1, x1, y2, x2 = tf.split(boxes, 4, axis=1)
    y1 = tf.maximum(tf.minimum(y1, wy2), wy1)
    x1 = tf.maximum(tf.minimum(x1, wx2), wx1)
    y2 = tf.maximum(tf.minimum(y2, wy2), wy1)
    x2 = tf.maximum(tf.minimum(x2, wx2), wx1)
    clipped = tf.concat([y1, x1, y2, x2], axis=1, name="clipped_boxes")
    clipped.set_shape((boxes.shape[0], 4))
    return clipped


def box_refinement_graph(box: tf.Tensor, gt_box: tf.Tensor) -> tf.Tensor:
    """Deltas [N, 4] (dy, dx, log dh, log dw) that turn box [N, 4] into gt_box [N, 4]."""
    box = tf.cast(box, tf.float32)
    gt_box = tf.cast(gt_box, tf.float32)
    cy, cx, h, w = _centre_size(box)
    gcy, gcx, gh, gw = _centre_size(gt_box)
    return tf.stack([(gcy - cy) / h, (gcx - cx) / w, tf.math.log(gh / h), tf.math.log(gw / w)], axis=1)


def overlaps_graph(boxes1: tf.Tensor, boxes2: tf.Tensor) -> tf.Tensor:
    """IoU matrix [N1, N2] of boxes1 [N1, 4] and boxes2 [N2, 4]; area = (y2 - y1)(x2 - x1)."""
    b1 = tf.cast(boxes1, tf.float32)[:, tf.newaxis, :]
    b2 = tf.cast(boxes2, tf.float32)[tf.newaxis, :, :]
    y1 = tf.maximum(b1[..., 0], b2[..., 0])
    x1 = tf.maximum(b1[..., 1], b2[..., 1])
    y2 = tf.minimum(b1[..., 2], b2[..., 2])
    x2 = tf.minimum(b1[..., 3], b2[..., 3])
    inter = tf.maximum(y2 - y1, 0.0) * tf.maximum(x2 - x1, 0.0)
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    return inter / (area1 + area2 - inter)


def _norm_scale_shift(shape: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Scale [h-1, w-1, h-1, w-1] and shift [0, 0, 1, 1] (float32) for an image shape [2] (h, w)."""
    h, w = tf.split(tf.cast(shape, tf.float32), 2)
    scale = tf.concat([h, w, h, w], axis=-1) - tf.constant(1.0)
    shift = tf.constant([0.0, 0.0, 1.0, 1.0])
    return scale, shift


def norm_boxes_graph(boxes: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Pixel boxes [..., 4] (y2/x2 exclusive) -> normalised boxes (y2/x2 inclusive) for shape (h, w)."""
    scale, shift = _norm_scale_shift(shape)
    return tf.math.divide(tf.cast(boxes, tf.float32) - shift, scale)


def denorm_boxes_graph(boxes: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Normalised boxes [..., 4] -> int32 pixel boxes (y2/x2 exclusive) for shape (h, w)."""
    scale, shift = _norm_scale_shift(shape)
    return tf.cast(tf.round(tf.math.multiply(tf.cast(boxes, tf.float32), scale) + shift), tf.int32)


def trim_zeros_graph(boxes: tf.Tensor, name: str = "trim_zeros") -> tuple[tf.Tensor, tf.Tensor]:
    """Drop all-zero rows of boxes [N, 4] -> (boxes [M, 4], non_zeros bool [N])."""
    non_zeros = tf.cast(tf.reduce_sum(tf.abs(boxes), axis=1), tf.bool)
    return tf.boolean_mask(boxes, non_zeros, name=name), non_zeros
