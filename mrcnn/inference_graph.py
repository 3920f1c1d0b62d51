"""The inference-mode Keras model: image -> backbone/FPN -> RPN -> proposals -> heads -> detections.

Inputs (Matterport names): input_image [B, H, W, C] float32 (molded), input_image_meta [B, META],
input_anchors [B, A, 4] normalised anchors. Outputs (Matterport order): detections [B, D, 6],
mrcnn_class [B, R, NC], mrcnn_bbox [B, R, NC, 4], mrcnn_mask [B, D, 28, 28, NC], rpn_rois [B, R, 4],
rpn_class [B, A, 2], rpn_bbox [B, A, 4]; D = DETECTION_MAX_INSTANCES, R = POST_NMS_ROIS_INFERENCE.
A diagnosing model (mrcnn.diagnosis) appends class_probs [B, K] over CLASSES; with DIAGNOSIS_HEAD
"roi" its mrcnn_bbox and mrcnn_mask carry class 1's deltas and mask in every class.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import keras
import tensorflow as tf
from keras import layers as KL

from mrcnn import diagnosis, portable_ops
from mrcnn.backbone import batch_norm_mode, build_backbone_and_fpn
from mrcnn.config import precision_policy
from mrcnn.detection import DetectionLayer
from mrcnn.heads import build_fpn_mask_graph, fpn_classifier_graph
from mrcnn.rpn import ProposalLayer, apply_rpn, build_rpn_model


class DetectionBoxes(KL.Layer):
    """detections [B, D, 6] -> boxes [B, n, 4] (y1, x1, y2, x2), normalised, of the first n rows.

    n is the largest number of real detections (class id > 0) of any image in the batch, at least
    1: detections are sorted and zero-padded, so the mask head skips the padded slots (with
    DETECTION_MIN_CONFIDENCE 0.7 usually most of the 100; 1.03 GFLOP each).
    """

    def call(self, detections: Any) -> Any:
        count = tf.reduce_max(tf.reduce_sum(tf.cast(detections[..., 4] > 0, tf.int32), axis=1))
        return detections[:, : tf.maximum(count, 1), :4]

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], None, 4)


class PadRois(KL.Layer):
    """[B, n, ...] -> [B, size, ...]: zero rows appended (n <= size)."""

    def __init__(self, size: int, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, x: Any) -> Any:
        pad = self.size - tf.shape(x)[1]
        paddings = tf.concat([[[0, 0], [0, pad]], tf.zeros([tf.rank(x) - 2, 2], tf.int32)], axis=0)
        return portable_ops.ensure_shape(tf.pad(x, paddings), (x.shape[0], self.size, *x.shape[2:]))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], self.size, *input_shape[2:])

    def get_config(self) -> dict:
        return {**super().get_config(), "size": self.size}


@contextlib.contextmanager
def dtype_policy(config: Any) -> Iterator[None]:
    """Build under the mixed policy MIXED_PRECISION names (:func:`mrcnn.config.precision_policy`);
    restore the policy after."""
    previous = keras.config.dtype_policy()
    policy = precision_policy(config)
    if policy:
        keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def check_image_shape(config: Any) -> None:
    """Raise ValueError unless the configured image height and width are multiples of 64."""
    h, w = int(config.IMAGE_SHAPE[0]), int(config.IMAGE_SHAPE[1])
    if h % 64 or w % 64:
        raise ValueError(f"image size must be divisible by 64 at least 6 times (got IMAGE_SHAPE {h}x{w}); "
                         "use e.g. 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024")


def build_rpn_for_config(config: Any) -> keras.Model:
    """The shared "rpn_model" for ``config`` (anchor stride, anchors per location, FPN depth, conv width)."""
    return build_rpn_model(config.RPN_ANCHOR_STRIDE, len(config.RPN_ANCHOR_RATIOS), config.TOP_DOWN_PYRAMID_SIZE,
                           config.RPN_CONV_CHANNELS)


def build_inference_model(config: Any) -> keras.Model:
    """Build the inference model for ``config`` (see module docstring for inputs/outputs)."""
    check_image_shape(config)
    train_bn = batch_norm_mode(config, inference=True)
    with dtype_policy(config):
        input_image = keras.Input(shape=(None, None, int(config.IMAGE_CHANNEL_COUNT)), name="input_image")
        input_image_meta = keras.Input(shape=(int(config.IMAGE_META_SIZE),), name="input_image_meta")
        input_anchors = keras.Input(shape=(None, 4), name="input_anchors")

        rpn_feature_maps, mrcnn_feature_maps, c5 = build_backbone_and_fpn(input_image, config, inference=True,
                                                                          return_c5=True)
        rpn = build_rpn_for_config(config)
        _, rpn_class, rpn_bbox = apply_rpn(rpn, rpn_feature_maps)
        rpn_rois = ProposalLayer(config.POST_NMS_ROIS_INFERENCE, config.RPN_NMS_THRESHOLD, config,
                                 name="ROI")([rpn_class, rpn_bbox, input_anchors])

        _, mrcnn_class, mrcnn_bbox = fpn_classifier_graph(
            rpn_rois, mrcnn_feature_maps, input_image_meta, config.POOL_SIZE, config.NUM_CLASSES,
            train_bn=train_bn, fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE,
            roi_min_level=config.CLASSIFIER_ROI_MIN_LEVEL,
            image_context=diagnosis.class_head_context([c5, *mrcnn_feature_maps], config))
        roi_dx = diagnosis.uses_roi_head(config)
        if roi_dx:  # one class-free box regressor (class 1's) for every diagnosis
            mrcnn_bbox = diagnosis.class_agnostic(mrcnn_bbox)
        detections = DetectionLayer(config, name="mrcnn_detection")(
            [rpn_rois, mrcnn_class, mrcnn_bbox, input_image_meta])
        detection_boxes = DetectionBoxes(name="detection_boxes")(detections)
        mrcnn_mask = build_fpn_mask_graph(detection_boxes, mrcnn_feature_maps, input_image_meta,
                                          config.MASK_POOL_SIZE, config.NUM_CLASSES, train_bn=train_bn,
                                          conv_layers=config.MASK_HEAD_CONV_LAYERS,
                                          channels=config.MASK_HEAD_CHANNELS,
                                          pad_to=config.DETECTION_MAX_INSTANCES)
        outputs = [detections, mrcnn_class, mrcnn_bbox, mrcnn_mask, rpn_rois, rpn_class, rpn_bbox]
        if roi_dx:  # one class-free mask (class 1's) for every diagnosis; the image's class from the ROIs
            outputs[3] = diagnosis.class_agnostic_mask(mrcnn_mask)
            outputs.append(diagnosis.roi_diagnosis(mrcnn_class, rpn_rois, config))
        elif diagnosis.uses_image_head(config):
            outputs.append(diagnosis.build_image_diagnosis_head([c5, *mrcnn_feature_maps], config)[1])
        return keras.Model([input_image, input_image_meta, input_anchors], outputs, name="mask_rcnn")
