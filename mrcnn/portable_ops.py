"""Ops with a "portable" form for graphs that leave TensorFlow (TFLite builtins, ONNX).

By default each function here is the TensorFlow op it names. Inside ``with portable_ops():``
(while a graph is traced for export) they are built from ops every converter knows: gathers,
arithmetic, scatter and reshape, instead of ``CropAndResize``, ``InvertPermutation`` and
``EnsureShape``, which TFLite has only as "select TF ops" (a Flex runtime that the pip
interpreter does not bundle); NMS becomes the padded form that TFLite runs correctly. The
results are the same values (float32 rounding aside).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import tensorflow as tf

_PORTABLE = contextvars.ContextVar("mrcnn_portable_ops", default=False)


@contextlib.contextmanager
def portable_ops(enabled: bool = True) -> Iterator[None]:
    """Graphs traced inside use the portable forms of the ops below."""
    token = _PORTABLE.set(enabled)
    try:
        yield
    finally:
        _PORTABLE.reset(token)


def is_portable() -> bool:
    """True inside :func:`portable_ops`."""
    return _PORTABLE.get()


def ensure_shape(x: tf.Tensor, shape: Sequence[int | None]) -> tf.Tensor:
    """``tf.ensure_shape``; portable: a reshape to the static shape (when at most one dim is unknown)."""
    if not is_portable():
        return tf.ensure_shape(x, shape)
    if sum(d is None for d in shape) > 1:
        return x
    return tf.reshape(x, [-1 if d is None else int(d) for d in shape])


def invert_permutation(permutation: tf.Tensor) -> tf.Tensor:
    """``tf.math.invert_permutation`` of an int32 vector; portable: a scatter."""
    if not is_portable():
        return tf.math.invert_permutation(permutation)
    size = tf.shape(permutation)
    return tf.scatter_nd(permutation[:, None], tf.range(size[0], dtype=permutation.dtype), size)


def non_max_suppression(boxes: tf.Tensor, scores: tf.Tensor, max_output_size: int, iou_threshold: float
                        ) -> tf.Tensor:
    """``tf.image.non_max_suppression`` -> int32 indices [K <= max_output_size]. Portable: the padded
    NonMaxSuppressionV4 cut to its valid count (TFLite's converter turns the unpadded op into a
    padded one and drops the count, so the indices would repeat index 0), and boxes of zero area
    moved apart: TensorFlow gives them IoU 0 with every box, TFLite's kernel selects index 0 again
    instead. A unit box far outside the image, one per index, has IoU 0 too."""
    if not is_portable():
        return tf.image.non_max_suppression(boxes, scores, max_output_size, iou_threshold)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    corner = 10.0 + 2.0 * tf.cast(tf.range(tf.shape(boxes)[0]), boxes.dtype)
    apart = tf.stack([corner, corner, corner + 1.0, corner + 1.0], axis=1)
    boxes = tf.where(tf.expand_dims(tf.abs(area) > 0, 1), boxes, apart)
    indices, valid = tf.raw_ops.NonMaxSuppressionV4(
        boxes=boxes, scores=scores, max_output_size=max_output_size, iou_threshold=iou_threshold,
        score_threshold=float("-inf"), pad_to_max_output_size=True)
    return indices[:valid]


def crop_and_resize(image: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor, crop_size: Sequence[int]
                    ) -> tf.Tensor:
    """``tf.image.crop_and_resize(..., method="bilinear")``: image [B, H, W, C], boxes [N, 4]
    normalised (y1, x1, y2, x2), box_indices int32 [N] -> [N, ch, cw, C]; samples outside the
    image are 0. Portable: the same sampling grid and interpolation by gathers (crop sizes > 1)."""
    if not is_portable() or min(crop_size) < 2:
        return tf.image.crop_and_resize(image, boxes, box_indices, crop_size, method="bilinear")
    height, width = tf.shape(image)[1], tf.shape(image)[2]
    top, bottom, y_lerp, y_ok = _sample_grid(boxes[:, 0], boxes[:, 2], height, crop_size[0])   # [N, ch]
    left, right, x_lerp, x_ok = _sample_grid(boxes[:, 1], boxes[:, 3], width, crop_size[1])    # [N, cw]
    shape = tf.stack([tf.shape(boxes)[0], crop_size[0], crop_size[1]])
    batch = tf.broadcast_to(box_indices[:, None, None], shape)

    def corner(rows: tf.Tensor, cols: tf.Tensor) -> tf.Tensor:
        index = tf.stack([batch, tf.broadcast_to(rows[:, :, None], shape), tf.broadcast_to(cols[:, None, :], shape)],
                         axis=-1)
        return tf.gather_nd(image, index)                                                      # [N, ch, cw, C]

    x_lerp = x_lerp[:, None, :, None]
    upper = corner(top, left) + (corner(top, right) - corner(top, left)) * x_lerp
    lower = corner(bottom, left) + (corner(bottom, right) - corner(bottom, left)) * x_lerp
    values = upper + (lower - upper) * y_lerp[:, :, None, None]
    inside = tf.expand_dims(tf.cast(y_ok[:, :, None] & x_ok[:, None, :], values.dtype), -1)
    return values * inside


def _sample_grid(start: tf.Tensor, stop: tf.Tensor, size: tf.Tensor, count: int
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """CropAndResize's sample positions along one axis: (floor index, ceil index (both clipped into
    the image), fraction, inside the image) [N, count] for normalised box edges start/stop [N]."""
    last = tf.cast(size - 1, tf.float32)
    step = (stop - start) * last / float(count - 1)
    coords = start[:, None] * last + tf.range(count, dtype=tf.float32)[None, :] * step[:, None]
    inside = (coords >= 0.0) & (coords <= last)
    floor, ceil = tf.floor(coords), tf.math.ceil(coords)
    clip = lambda v: tf.cast(tf.clip_by_value(v, 0.0, last), tf.int32)  # noqa: E731
    return clip(floor), clip(ceil), coords - floor, inside
