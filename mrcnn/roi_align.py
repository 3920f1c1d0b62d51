"""Pyramid ROI align: crop every box from the FPN level that matches its size.

Semantics of ``tf.image.crop_and_resize``: a regular grid of pool x pool bilinear samples whose
first and last points lie exactly on the box edges (y1*(H-1) ... y2*(H-1)); no bin averaging.
"""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf
from keras import layers as KL

from mrcnn import portable_ops

#: Pyramid levels the heads read (P2..P5).
MIN_LEVEL, MAX_LEVEL = 2, 5


def roi_pyramid_level(boxes: tf.Tensor, image_area: tf.Tensor, min_level: int = MIN_LEVEL) -> tf.Tensor:
    """Level min_level..5 of each normalised box [..., 4] for a molded image of ``image_area`` pixels.

    level = clip(4 + round_half_even(log2(sqrt(h*w) / (224 / sqrt(area)))), min_level, 5) -> int32 [...]
    (Matterport's rule with min_level 2). Zero (padding) boxes land on min_level.
    """
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    ratio = tf.sqrt(h * w) / (224.0 / tf.sqrt(image_area))
    level = 4.0 + tf.round(tf.math.log(ratio) / tf.math.log(2.0))
    return tf.cast(tf.clip_by_value(level, float(min_level), float(MAX_LEVEL)), tf.int32)


class PyramidROIAlign(KL.Layer):
    """ROI align over P2..P5.

    Inputs: [boxes [B, N, 4] normalised (y1, x1, y2, x2), image_meta [B, META], P2, P3, P4, P5].
    Output: [B, N, pool_h, pool_w, channels] in input box order (float32).
    The image area comes from the molded shape (meta[4:6]) of the first image. ``min_level``
    (2..5; 2 = Matterport) sends boxes that Matterport's rule puts on a finer level to that one.
    """

    def __init__(self, pool_shape: Sequence[int], min_level: int = MIN_LEVEL, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.pool_shape = tuple(int(s) for s in pool_shape)
        self.min_level = int(min_level)
        if not MIN_LEVEL <= self.min_level <= MAX_LEVEL:
            raise ValueError(f"min_level must be in {MIN_LEVEL}..{MAX_LEVEL}, got {min_level}")

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        boxes = tf.cast(inputs[0], tf.float32)
        image_meta = tf.cast(inputs[1], tf.float32)
        feature_maps = [tf.cast(p, tf.float32) for p in inputs[2:]]
        image_area = image_meta[0, 4] * image_meta[0, 5]
        batch, count = tf.shape(boxes)[0], tf.shape(boxes)[1]
        flat_boxes = tf.reshape(boxes, (-1, 4))
        box_image = tf.repeat(tf.range(batch), count)
        levels = roi_pyramid_level(flat_boxes, image_area, self.min_level)

        pooled, order = [], []
        for level, feature_map in zip(range(MIN_LEVEL, MAX_LEVEL + 1), feature_maps, strict=True):
            if level < self.min_level:
                continue
            ix = tf.reshape(tf.where(tf.equal(levels, level)), (-1,))
            crops = portable_ops.crop_and_resize(
                feature_map, tf.stop_gradient(tf.gather(flat_boxes, ix)),
                tf.cast(tf.gather(box_image, ix), tf.int32), self.pool_shape)
            pooled.append(crops)
            order.append(tf.cast(ix, tf.int32))
        pooled = tf.concat(pooled, axis=0)
        # Rows are grouped by level; put them back in input order.
        pooled = tf.gather(pooled, portable_ops.invert_permutation(tf.concat(order, axis=0)))
        channels = feature_maps[0].shape[-1]
        out = tf.reshape(pooled, tf.concat([[batch, count], self.pool_shape, [tf.shape(pooled)[-1]]], 0))
        return portable_ops.ensure_shape(out, (boxes.shape[0], boxes.shape[1]) + self.pool_shape + (channels,))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[0][:2]) + self.pool_shape + (input_shape[2][-1],)

    def get_config(self) -> dict:
        base = super().get_config()
        base.update(pool_shape=self.pool_shape, min_level=self.min_level)
        return base
