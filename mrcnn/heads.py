"""Second-stage heads: box classifier/regressor and mask predictor.

Matterport wraps every head layer in TimeDistributed; here the ROI axis is folded into the
batch axis instead ([B, N, ...] -> [B*N, ...]), which is faster and gives the same numbers.
The weighted layers keep Matterport's names and weight shapes (``mrcnn_class_conv1`` is a 7x7
valid Conv2D acting as an FC layer, kernel (7, 7, 256, 1024), ...), so HDF5 weights load by name.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf
from keras import layers as KL

from mrcnn import portable_ops
from mrcnn.backbone import batch_norm, conv_bn
from mrcnn.roi_align import PyramidROIAlign


class FoldRois(KL.Layer):
    """[B, N, ...] -> [B*N, ...] (ROIs folded into the batch axis)."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        b, n = input_shape[0], input_shape[1]
        return ((b * n) if b is not None and n is not None else None,) + tuple(input_shape[2:])


class UnfoldRois(KL.Layer):
    """([B*N, ...], reference [B, N, ...]) -> [B, N, *trailing_shape] (default: x's own trailing shape)."""

    def __init__(self, trailing_shape: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trailing_shape = tuple(trailing_shape) if trailing_shape is not None else None

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        x, reference = inputs
        trailing = list(self.trailing_shape) if self.trailing_shape is not None else tf.shape(x)[1:]
        return tf.reshape(x, tf.concat([tf.shape(reference)[:2], trailing], 0))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        x_shape, ref_shape = input_shape
        trailing = self.trailing_shape if self.trailing_shape is not None else tuple(x_shape[1:])
        return tuple(ref_shape[:2]) + tuple(trailing)

    def get_config(self) -> dict:
        base = super().get_config()
        base.update(trailing_shape=self.trailing_shape)
        return base


class RepeatPerRoi(KL.Layer):
    """(x [B, D], rois [B, N, 4]) -> [B*N, D]: each image's row once per ROI, in FoldRois order."""

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        x, rois = inputs
        return tf.repeat(x, tf.shape(rois)[1], axis=0)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        (b, d), (_, n, _) = input_shape
        return ((b * n) if b is not None and n is not None else None, d)


class SqueezeSpatial(KL.Layer):
    """[M, 1, 1, C] -> [M, C] (Matterport's "pool_squeeze")."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.squeeze(x, axis=[1, 2])

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], input_shape[3])


class MatmulConv2D(KL.Conv2D):
    """Conv2D whose kernel covers its whole (valid-padded, statically shaped) input, computed as
    one matrix product: Matterport's "FC as conv" head layers (``mrcnn_class_conv1``: 7x7 kernel
    on 7x7 ROI features, ``mrcnn_class_conv2``: 1x1 on 1x1). [M, kh, kw, C] -> [M, kh*kw*C] @
    kernel [kh*kw*C, F] -> [M, 1, 1, F]. Same weights (shape, names) as Conv2D, so HDF5 files load
    by name; the result equals Conv2D's up to float rounding; other inputs fall back to Conv2D.
    Why: oneDNN runs these convs far below its matmul rate on CPU (measured on 1000 ROIs: 1x1 on
    1x1 maps 10x slower, 7x7 on 7x7 1.6x slower); 1x1 kernels on larger maps stay convolutions
    (there oneDNN's conv is as fast or faster).
    """

    def _as_matmul(self, input_shape: Sequence[Any]) -> bool:
        if (self.data_format != "channels_last" or tuple(self.strides) != (1, 1)
                or tuple(self.dilation_rate) != (1, 1) or self.groups != 1):
            return False
        return self.padding == "valid" and tuple(input_shape[1:3]) == tuple(self.kernel_size)

    def call(self, inputs: Any) -> Any:
        if not self._as_matmul(inputs.shape):
            return super().call(inputs)
        kh, kw = self.kernel_size
        channels = int(inputs.shape[-1])
        flat = tf.reshape(inputs, (-1, kh * kw * channels))
        y = tf.matmul(flat, tf.reshape(keras.ops.convert_to_tensor(self.kernel), (kh * kw * channels, self.filters)))
        if self.use_bias:
            y = tf.nn.bias_add(y, keras.ops.convert_to_tensor(self.bias))
        if self.activation is not None:
            y = self.activation(y)
        return tf.reshape(y, (-1, 1, 1, self.filters))


class MatmulConv2DTranspose(KL.Conv2DTranspose):
    """Conv2DTranspose with kernel == strides and valid padding (Matterport's 2x2 stride-2 mask
    upsampler) computed as one matrix product plus depth_to_space: every input pixel writes its
    own non-overlapping kh x kw output patch, out[kh*i + a, kw*j + b, f] = x[i, j] @ kernel[a, b, f].
    Same weights as Conv2DTranspose; other settings fall back to it. (oneDNN's backward-data
    conv ran this at about 60% of the rate of the matrix product.)
    """

    def _as_matmul(self) -> bool:
        return (self.data_format == "channels_last" and tuple(self.kernel_size) == tuple(self.strides)
                and self.kernel_size[0] == self.kernel_size[1] and self.padding == "valid"
                and tuple(self.dilation_rate) == (1, 1))

    def call(self, inputs: Any) -> Any:
        if not self._as_matmul():
            return super().call(inputs)
        k = int(self.kernel_size[0])
        channels = int(inputs.shape[-1])
        kernel = keras.ops.convert_to_tensor(self.kernel)                 # [k, k, filters, channels]
        kernel = tf.reshape(tf.transpose(kernel, (3, 0, 1, 2)), (channels, k * k * self.filters))
        shape = tf.shape(inputs)
        y = tf.matmul(tf.reshape(inputs, (-1, channels)), kernel)          # columns (a, b, f)
        # Bias (tiled over the k*k patch positions) and activation before depth_to_space (a
        # permutation): grappler fuses them into the matmul instead of two passes after it.
        if self.use_bias:
            y = tf.nn.bias_add(y, tf.tile(keras.ops.convert_to_tensor(self.bias), [k * k]))
        if self.activation is not None:
            y = self.activation(y)
        y = tf.reshape(y, tf.concat([shape[:3], [k * k * self.filters]], 0))
        return tf.nn.depth_to_space(y, k)


class MaskPredictor(KL.Conv2D):
    """Matterport's ``mrcnn_mask`` layer: the per-class 1x1 sigmoid conv of the mask head, with
    its output in Matterport's shape [B, N, mh, mw, C].

    Inputs: [features [B*n, mh, mw, F] (ROIs folded into the batch axis), rois [B, n, 4]]. The
    conv runs on the folded features (the fast formulation of this module), then the result is
    unfolded to [B, n, mh, mw, C]; with ``pad_to``, zero rows are appended up to ``pad_to`` ROIs
    (inference: the head runs on the real detections only, the output keeps Matterport's
    DETECTION_MAX_INSTANCES slots). The weights are a Conv2D's, kernel (1, 1, F, C) and bias (C,),
    under the layer name ``mrcnn_mask``: Keras-2 weight files load by name as before, and
    ``get_layer("mrcnn_mask").output`` is the mask probabilities Matterport's notebooks expect.
    """

    def __init__(self, filters: int, pad_to: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("kernel_size", (1, 1))
        kwargs.setdefault("activation", "sigmoid")
        super().__init__(filters, **kwargs)
        self.pad_to = None if pad_to is None else int(pad_to)
        self.input_spec = None  # two inputs; Conv2D's spec would describe the features only

    def build(self, input_shape: Any) -> None:
        super().build(tuple(input_shape[0]))
        self.input_spec = None

    def call(self, inputs: Sequence[Any]) -> Any:
        features, rois = inputs
        y = super().call(features)                                     # [B*n, mh, mw, C]
        rois_shape = tf.shape(rois)
        y = tf.reshape(y, tf.concat([rois_shape[:2], tf.shape(y)[1:]], 0))
        if self.pad_to is None:
            return y
        y = tf.pad(y, [[0, 0], [0, self.pad_to - rois_shape[1]], [0, 0], [0, 0], [0, 0]])
        return portable_ops.ensure_shape(y, (None, self.pad_to, *y.shape[2:]))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        if not isinstance(input_shape[0], (tuple, list)):  # Conv2D.build validates the features alone
            return super().compute_output_shape(input_shape)
        features_shape, rois_shape = input_shape
        folded = super().compute_output_shape(tuple(features_shape))
        rois = self.pad_to if self.pad_to is not None else rois_shape[1]
        return (rois_shape[0], rois, *folded[1:])

    def get_config(self) -> dict:
        return {**super().get_config(), "pad_to": self.pad_to}


def _conv_bn_relu(x: Any, filters: int, kernel: int, conv_name: str, bn_name: str,
                  train_bn: bool | None, padding: str) -> Any:
    """Conv -> BN -> ReLU. The mask head's "same" convs fold a frozen BN into the conv
    (:func:`mrcnn.backbone.conv_bn`); the box head's FC-as-conv layers ("valid", MatmulConv2D) keep
    BN separate: their kernels (7x7x256x1024) are larger than their outputs, so rescaling the kernel
    in every call would cost more than the BN's pass over [ROIs, 1024]."""
    if padding == "valid":
        x = MatmulConv2D(filters, (kernel, kernel), padding=padding, name=conv_name)(x)
        x = batch_norm(x, bn_name, train_bn)
    else:
        x = conv_bn(x, filters, kernel, conv_name, bn_name, train_bn, padding=padding)
    return KL.Activation("relu")(x)


def fpn_classifier_graph(rois: Any, feature_maps: Sequence[Any], image_meta: Any, pool_size: int,
                         num_classes: int, train_bn: bool | None = False,
                         fc_layers_size: int = 1024, roi_min_level: int = 2,
                         class_dropout: float = 0.0, image_context: Any = None) -> tuple[Any, Any, Any]:
    """Box head. rois [B, N, 4] normalised, feature_maps [P2..P5] ->
    (mrcnn_class_logits [B, N, C], mrcnn_probs [B, N, C], mrcnn_bbox [B, N, C, 4] deltas).
    ``roi_min_level``: the finest pyramid level it pools from (config CLASSIFIER_ROI_MIN_LEVEL);
    ``class_dropout``: dropout on the shared features before the class logits only (training
    graphs; config CLASS_HEAD_DROPOUT; no weights, so weight files load as before);
    ``image_context`` [B, D] or None: concatenated to every ROI's features before the class logits
    only (config CLASS_HEAD_IMAGE_CONTEXT; ``mrcnn_class_logits`` then has fc + D inputs).
    """
    x = PyramidROIAlign((pool_size, pool_size), min_level=roi_min_level,
                        name="roi_align_classifier")([rois, image_meta, *feature_maps])
    x = FoldRois()(x)                                                   # [B*N, 7, 7, 256]
    x = _conv_bn_relu(x, fc_layers_size, pool_size, "mrcnn_class_conv1", "mrcnn_class_bn1", train_bn, "valid")
    x = _conv_bn_relu(x, fc_layers_size, 1, "mrcnn_class_conv2", "mrcnn_class_bn2", train_bn, "valid")
    shared = SqueezeSpatial(name="pool_squeeze")(x)                    # [B*N, fc]
    class_features = KL.Dropout(class_dropout, name="mrcnn_class_dropout")(shared) if class_dropout > 0 else shared
    if image_context is not None:
        context = RepeatPerRoi(name="mrcnn_class_context_rois")([image_context, rois])
        class_features = KL.Concatenate(name="mrcnn_class_context_concat")([class_features, context])
    logits = KL.Dense(num_classes, name="mrcnn_class_logits")(class_features)
    mrcnn_class_logits = UnfoldRois(name="mrcnn_class_logits_rois", dtype="float32")([logits, rois])
    mrcnn_probs = KL.Activation("softmax", name="mrcnn_class", dtype="float32")(mrcnn_class_logits)
    deltas = KL.Dense(num_classes * 4, activation="linear", name="mrcnn_bbox_fc")(shared)
    mrcnn_bbox = UnfoldRois((num_classes, 4), name="mrcnn_bbox", dtype="float32")([deltas, rois])
    return mrcnn_class_logits, mrcnn_probs, mrcnn_bbox


def build_fpn_mask_graph(rois: Any, feature_maps: Sequence[Any], image_meta: Any, pool_size: int,
                         num_classes: int, train_bn: bool | None = False, conv_layers: int = 4,
                         channels: int = 256, pad_to: int | None = None) -> Any:
    """Mask head. rois [B, N, 4] normalised -> per-class mask probabilities [B, N, 2*pool, 2*pool, C]
    (or [B, pad_to, ...] with zero rows after the first N), the output of the layer "mrcnn_mask".

    ``conv_layers`` 3x3 convs of ``channels`` (and the deconv's channels): Matterport's 4 x 256
    by default (config MASK_HEAD_CONV_LAYERS / MASK_HEAD_CHANNELS)."""
    x = PyramidROIAlign((pool_size, pool_size), name="roi_align_mask")([rois, image_meta, *feature_maps])
    x = FoldRois()(x)                                                   # [B*N, 14, 14, 256]
    for i in range(1, conv_layers + 1):
        x = _conv_bn_relu(x, channels, 3, f"mrcnn_mask_conv{i}", f"mrcnn_mask_bn{i}", train_bn, "same")
    x = MatmulConv2DTranspose(channels, (2, 2), strides=2, activation="relu", name="mrcnn_mask_deconv")(x)
    return MaskPredictor(num_classes, pad_to=pad_to, name="mrcnn_mask", dtype="float32")([x, rois])
