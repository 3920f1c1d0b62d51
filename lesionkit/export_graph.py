"""The deployable detector: one RGB uint8 image of any size in, original-pixel results out, in TF ops.

:class:`DeployableDetector` wraps the inference Keras model with the pre- and post-processing that
``MaskRCNN.detect`` does in numpy, as TensorFlow ops, so that SavedModel, TFLite and ONNX files
carry them: resize (scikit-image's order-1 "constant" resampling, as ``mrcnn.imaging.resize``),
truncation to uint8, square padding, COLOUR_CONSTANCY, mean subtraction, image_meta, the constant
anchors of the square molded size, box unmolding and mask pasting (``mrcnn.postprocess``,
thresholded at ``DETECTION_MASK_THRESHOLD``).

Outputs of :meth:`DeployableDetector.detect` (N kept detections, by score):
boxes int32 [N, 4] (y1, x1, y2, x2, original pixels, y2/x2 exclusive), class_ids int32 [N],
scores float32 [N], masks uint8 [N, H, W] (1 = instance).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from mrcnn.imaging import SHADES_OF_GRAY_MAX_GAIN, SHADES_OF_GRAY_POWER

#: Output names of every exported format, in this order.
OUTPUT_NAMES = ("boxes", "class_ids", "scores", "masks")


def linear_taps(n_in: tf.Tensor, n_out: tf.Tensor, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """1-D order-1 resampling of n_in samples to n_out on the pixel-centre grid, zeros outside
    (as ``mrcnn.postprocess._linear_taps``): output i reads (i + 0.5) * n_in / n_out - 0.5.

    Returns (lower, upper, upper_weight) [n_out]: indices into the input zero-padded by one sample
    on each side, and the weight of ``upper`` (``dtype``).
    """
    n_in_f, n_out_f = tf.cast(n_in, dtype), tf.cast(n_out, dtype)
    coords = (tf.range(n_out_f) + 0.5) * (n_in_f / n_out_f) - 0.5
    floor = tf.floor(coords)
    lower = tf.cast(floor, tf.int32) + 1
    return lower, lower + 1, coords - floor


def resize_like_numpy(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """Image [h, w, C] -> [height, width, C] with the values of ``mrcnn.imaging.resize`` (order 1,
    zeros outside, clipped to the input's range), in the image's dtype. The four corner terms are
    multiplied and summed in scipy's order (value * wy * wx): in float64 the result is
    bit-identical, so truncating it to uint8 gives numpy's pixels."""
    lo, hi = tf.reduce_min(image), tf.reduce_max(image)
    padded = tf.pad(image, [[1, 1], [1, 1], [0, 0]])
    y_lower, y_upper, wy = linear_taps(tf.shape(image)[0], height, image.dtype)
    x_lower, x_upper, wx = linear_taps(tf.shape(image)[1], width, image.dtype)
    wy, wx = wy[:, None, None], wx[None, :, None]
    total = tf.zeros([height, width, tf.shape(image)[2]], image.dtype)
    for rows, row_weight in ((y_lower, 1.0 - wy), (y_upper, wy)):
        picked = tf.gather(padded, rows)
        for cols, col_weight in ((x_lower, 1.0 - wx), (x_upper, wx)):
            total = total + tf.gather(picked, cols, axis=1) * row_weight * col_weight
    return tf.clip_by_value(total, lo, hi)


def square_scale(height: tf.Tensor, width: tf.Tensor, config: Any, dtype: tf.DType) -> tf.Tensor:
    """The scale of ``mrcnn.imaging._resize_scale`` in "square" mode for an h x w image."""
    h, w = tf.cast(height, dtype), tf.cast(width, dtype)
    scale = tf.constant(1.0, dtype)
    if config.IMAGE_MIN_DIM:
        scale = tf.maximum(scale, float(config.IMAGE_MIN_DIM) / tf.minimum(h, w))
    if config.IMAGE_MIN_SCALE:
        scale = tf.maximum(scale, float(config.IMAGE_MIN_SCALE))
    max_dim = float(config.IMAGE_MAX_DIM)
    too_big = tf.round(tf.maximum(h, w) * scale) > max_dim
    return tf.where(too_big, max_dim / tf.maximum(h, w), scale)


def shades_of_gray_graph(image: tf.Tensor) -> tf.Tensor:
    """``mrcnn.imaging.shades_of_gray`` in the graph: RGB [H, W, 3] (0..255, float) -> the same
    dtype, channels scaled by mean(e) / e_c with e_c the 6-norm of channel c, gains clipped to
    [1/3, 3], values to 0..255."""
    x = image / 255.0
    illuminant = tf.reduce_mean(x ** SHADES_OF_GRAY_POWER, axis=[0, 1], keepdims=True) ** (1.0 / SHADES_OF_GRAY_POWER)
    gains = tf.reduce_mean(illuminant, axis=-1, keepdims=True) / tf.maximum(illuminant, 1e-12)
    gains = tf.clip_by_value(gains, 1.0 / SHADES_OF_GRAY_MAX_GAIN, SHADES_OF_GRAY_MAX_GAIN)
    return tf.clip_by_value(image * gains, 0.0, 255.0)


class DeployableDetector(tf.Module):
    """uint8 RGB image [H, W, 3] -> boxes, class_ids, scores, masks (see module docstring).

    ``model``: an inference ``MaskRCNN`` whose config uses IMAGE_RESIZE_MODE "square" and
    BATCH_SIZE 1 (so the molded size, and the anchors, are constants). ``wide``: the float type of
    the resizing, box and mask arithmetic that numpy does in float64 (float64 reproduces numpy's
    pixels exactly; TFLite's builtin ops have float32 only).
    """

    def __init__(self, model: Any, wide: tf.DType = tf.float64) -> None:
        super().__init__(name="lesion_detector")
        config = model.config
        self.model = model  # not tracked (a plain object): the Keras model below carries the weights
        self.keras_model = model.keras_model
        self.config = config
        self.size = int(config.IMAGE_MAX_DIM)
        self.wide = wide
        # numpy, not tf.constant: traced into each graph as a constant (a captured tensor would become
        # an extra input of the ONNX model)
        self.mean_pixel = np.asarray(config.MEAN_PIXEL, wide.as_numpy_dtype).reshape(1, 1, 3)
        self.anchors = model.get_anchors((self.size, self.size))[np.newaxis].astype(np.float32)
        self.num_classes = int(config.NUM_CLASSES)
        self.threshold = float(config.DETECTION_MASK_THRESHOLD)

    def mold(self, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """uint8 [H, W, 3] -> (molded float32 [1, S, S, 3], image_meta [1, META], window int32 [4])."""
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        scale = square_scale(height, width, self.config, self.wide)
        new_h = tf.cast(tf.round(tf.cast(height, self.wide) * scale), tf.int32)
        new_w = tf.cast(tf.round(tf.cast(width, self.wide) * scale), tf.int32)
        resized = resize_like_numpy(tf.cast(image, self.wide), new_h, new_w)
        resized = tf.cast(tf.cast(resized, tf.uint8), self.wide)  # numpy's astype(uint8) truncates
        top, left = (self.size - new_h) // 2, (self.size - new_w) // 2
        padded = tf.pad(resized, [[top, self.size - new_h - top], [left, self.size - new_w - left], [0, 0]])
        if self.config.COLOUR_CONSTANCY == "shades_of_gray":
            padded = shades_of_gray_graph(padded)
        molded = tf.reshape(tf.cast(padded - tf.constant(self.mean_pixel), tf.float32), (1, self.size, self.size, 3))
        window = tf.stack([top, left, top + new_h, left + new_w])
        meta = tf.concat([[0.0, tf.cast(height, tf.float32), tf.cast(width, tf.float32), 3.0,
                           float(self.size), float(self.size), 3.0], tf.cast(window, tf.float32),
                          [tf.cast(scale, tf.float32)], tf.zeros([self.num_classes])], axis=0)
        return molded, meta[tf.newaxis], window

    def boxes_to_original(self, boxes: tf.Tensor, window: tf.Tensor, height: tf.Tensor, width: tf.Tensor
                          ) -> tf.Tensor:
        """Normalised molded boxes [N, 4] -> int32 original pixel boxes [N, 4], with the float32 /
        float64 steps of ``mrcnn.postprocess.boxes_to_original`` (so the same pixel after rounding)."""
        last = tf.constant(float(self.size - 1), self.wide)
        win = tf.cast((tf.cast(window, self.wide) - tf.constant([0.0, 0.0, 1.0, 1.0], self.wide)) / last, tf.float32)
        shift = tf.stack([win[0], win[1], win[0], win[1]])
        extent = tf.stack([win[2] - win[0], win[3] - win[1], win[2] - win[0], win[3] - win[1]])
        h, w = tf.cast(height, self.wide), tf.cast(width, self.wide)
        pixels = (tf.cast((boxes - shift) / extent, self.wide) * tf.stack([h - 1.0, w - 1.0, h - 1.0, w - 1.0])
                  + tf.constant([0.0, 0.0, 1.0, 1.0], self.wide))
        return tf.cast(tf.round(pixels), tf.int32)

    def paste(self, masks: tf.Tensor, boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
        """float masks [N, mh, mw] -> uint8 [N, H, W]: each resized into its box, clipped to its own
        range (``mrcnn.postprocess.resize_mask``) and kept where >= DETECTION_MASK_THRESHOLD."""
        masks = tf.cast(masks, self.wide)
        rows = self._paste_matrix(boxes[:, 0], boxes[:, 2], height, tf.shape(masks)[1])   # [N, H, mh]
        cols = self._paste_matrix(boxes[:, 1], boxes[:, 3], width, tf.shape(masks)[2])    # [N, W, mw]
        values = tf.matmul(tf.matmul(rows, masks), cols, transpose_b=True)                  # [N, H, W]
        values = tf.clip_by_value(values, tf.reduce_min(masks, axis=[1, 2])[:, None, None],
                                  tf.reduce_max(masks, axis=[1, 2])[:, None, None])
        ys, xs = tf.range(height)[None, :, None], tf.range(width)[None, None, :]
        inside = ((ys >= boxes[:, 0, None, None]) & (ys < boxes[:, 2, None, None])
                  & (xs >= boxes[:, 1, None, None]) & (xs < boxes[:, 3, None, None]))
        return tf.cast(inside & (values >= self.threshold), tf.uint8)

    def _paste_matrix(self, start: tf.Tensor, stop: tf.Tensor, size: tf.Tensor, mask_size: tf.Tensor) -> tf.Tensor:
        """[N, size, mask_size] resampling weights: row p reads the mask at
        (p - start + 0.5) * mask_size / (stop - start) - 0.5, zero outside the mask."""
        local = tf.cast(tf.range(size)[None, :] - start[:, None], self.wide)               # [N, size]
        extent = tf.cast(stop - start, self.wide)[:, None]
        coords = (local + 0.5) * (tf.cast(mask_size, self.wide) / extent) - 0.5
        floor = tf.floor(coords)
        lower, weight = tf.expand_dims(tf.cast(floor, tf.int32), -1), tf.expand_dims(coords - floor, -1)
        taps = tf.range(mask_size)                                       # one-hot by comparison (ONNX, TFLite)
        return (tf.cast(tf.equal(lower, taps), self.wide) * (1.0 - weight)
                + tf.cast(tf.equal(lower + 1, taps), self.wide) * weight)

    def detect(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
        """uint8 image [H, W, 3] -> {boxes, class_ids, scores, masks} (see module docstring)."""
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        molded, meta, window = self.mold(image)
        outputs = self.keras_model([molded, meta, tf.constant(self.anchors)], training=False)
        detections, mrcnn_mask = tf.cast(outputs[0][0], tf.float32), tf.cast(outputs[3][0], tf.float32)
        count = tf.reduce_sum(tf.cast(detections[:, 4] > 0, tf.int32))
        class_ids = tf.cast(detections[:count, 4], tf.int32)
        boxes = self.boxes_to_original(detections[:count, :4], window, height, width)
        scores = detections[:count, 5]
        chosen = tf.cast(tf.equal(class_ids[:, None], tf.range(self.num_classes)), tf.float32)   # [N, C]
        masks = tf.reduce_sum(mrcnn_mask[:count] * chosen[:, None, None, :], axis=3)           # [N, mh, mw]
        nonempty = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0
        boxes, class_ids, scores, masks = (tf.boolean_mask(t, nonempty) for t in (boxes, class_ids, scores, masks))
        return {"boxes": boxes, "class_ids": class_ids, "scores": scores,
                "masks": self.paste(masks, boxes, height, width)}

    def detect_encoded(self, encoded: tf.Tensor) -> dict[str, tf.Tensor]:
        """JPEG/PNG/BMP/GIF bytes (scalar string) -> as :meth:`detect` (no EXIF rotation)."""
        image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        return self.detect(image)
