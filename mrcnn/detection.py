"""Detection layer ("mrcnn_detection"): refine proposals into final, per-class-NMS'd detections."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf
from keras import layers as KL

from mrcnn import portable_ops
from mrcnn.diagnosis import uses_roi_head
from mrcnn.tf_boxes import apply_box_deltas_graph, clip_boxes_graph, norm_boxes_graph


class DetectionLayer(KL.Layer):
    """Inputs: [rois [B, N, 4] normalised, mrcnn_class [B, N, C] probabilities,
    mrcnn_bbox [B, N, C, 4] deltas, image_meta [B, META]].

    Output: [B, DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)] normalised, float32,
    sorted by score and zero-padded. Per ROI: class = argmax over all classes (incl. background),
    that class's deltas x BBOX_STD_DEV applied, clipped to the image window from image_meta;
    background and (if DETECTION_MIN_CONFIDENCE is truthy) low-score ROIs dropped; per-class NMS.
    With DETECTION_FOREGROUND_FALLBACK, an image where no ROI survives that filter keeps its ROI
    of highest foreground probability, as that foreground class (so it never has no detection).
    For a diagnosing class head (DIAGNOSIS_HEAD "roi", mrcnn.diagnosis) an ROI's score is its
    foreground probability 1 - P(background), its class the most probable foreground class, and
    NMS runs over all classes together.
    """

    def __init__(self, config: Any, **kwargs: Any) -> None:
        kwargs.setdefault("name", "mrcnn_detection")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.config = config
        self.max_instances = int(config.DETECTION_MAX_INSTANCES)
        self.min_confidence = float(config.DETECTION_MIN_CONFIDENCE or 0.0)
        self.nms_threshold = float(config.DETECTION_NMS_THRESHOLD)
        self.std_dev = np.asarray(config.BBOX_STD_DEV, dtype=np.float32).reshape(1, 4)
        self.foreground_fallback = bool(config.DETECTION_FOREGROUND_FALLBACK)
        # A diagnosing class head (mrcnn.diagnosis): an ROI is a lesion by 1 - P(background), whatever
        # its diagnosis, and one NMS runs over all classes (one lesion is one instance).
        self.foreground_score = uses_roi_head(config)

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        rois, probs, deltas, image_meta = (tf.cast(t, tf.float32) for t in inputs)
        # Window of the real image inside the molded one, normalised (meta: 4:6 molded h, w; 7:11 window).
        windows = norm_boxes_graph(image_meta[:, 7:11], image_meta[0, 4:6])
        detections = tf.map_fn(self._detections_for_image, (rois, probs, deltas, windows),
                               fn_output_signature=tf.TensorSpec((self.max_instances, 6), tf.float32))
        return portable_ops.ensure_shape(detections, (None, self.max_instances, 6))

    def _detections_for_image(self, args: tuple[tf.Tensor, ...]) -> tf.Tensor:
        """rois [N, 4], probs [N, C], deltas [N, C, 4], window [4] -> detections [MAX, 6]."""
        rois, probs, deltas, window = args
        if self.foreground_score:
            class_ids, scores, wanted = self._foreground_classes(probs)
        else:
            class_ids = tf.argmax(probs, axis=1, output_type=tf.int32)
            scores = tf.gather(probs, class_ids, batch_dims=1)
            wanted = class_ids > 0
        if self.min_confidence:
            wanted = tf.logical_and(wanted, scores >= self.min_confidence)
        if self.foreground_fallback and self.foreground_score:
            best = tf.equal(tf.range(tf.shape(probs)[0]), tf.argmax(scores, output_type=tf.int32))
            wanted = tf.logical_or(wanted, tf.logical_and(tf.logical_not(tf.reduce_any(wanted)), best))
        elif self.foreground_fallback:
            class_ids, scores, wanted = self._best_foreground_if_none(probs, class_ids, scores, wanted)
        class_deltas = tf.gather(deltas, class_ids, batch_dims=1)
        boxes = apply_box_deltas_graph(rois, class_deltas * tf.constant(self.std_dev))
        boxes = clip_boxes_graph(boxes, window)

        keep = tf.reshape(tf.where(wanted), (-1,))
        nms_groups = tf.ones_like(class_ids) if self.foreground_score else class_ids
        keep = self._per_class_nms(keep, boxes, scores, nms_groups)

        count = tf.minimum(tf.size(keep), self.max_instances)
        top = tf.math.top_k(tf.gather(scores, keep), k=count, sorted=True).indices
        keep = tf.gather(keep, top)
        rows = tf.concat([tf.gather(boxes, keep),
                          tf.cast(tf.gather(class_ids, keep), tf.float32)[:, tf.newaxis],
                          tf.gather(scores, keep)[:, tf.newaxis]], axis=1)
        return tf.pad(rows, [(0, self.max_instances - tf.shape(rows)[0]), (0, 0)])

    @staticmethod
    def _foreground_classes(probs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """probs [N, C] -> (class ids [N]: the most probable foreground class, scores [N]: the
        foreground probability 1 - P(background), wanted [N]: score >= P(background))."""
        class_ids = tf.argmax(probs[:, 1:], axis=1, output_type=tf.int32) + 1
        scores = 1.0 - probs[:, 0]
        return class_ids, scores, scores >= probs[:, 0]

    @staticmethod
    def _best_foreground_if_none(probs: tf.Tensor, class_ids: tf.Tensor, scores: tf.Tensor, wanted: tf.Tensor
                                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """When no ROI is ``wanted``: mark the ROI of highest foreground probability wanted, with
        its best foreground class and that probability as score. probs [N, C]; others [N]."""
        foreground = probs[:, 1:]
        best = tf.argmax(tf.reduce_max(foreground, axis=1), output_type=tf.int32)
        use_best = tf.logical_and(tf.logical_not(tf.reduce_any(wanted)),
                                  tf.equal(tf.range(tf.shape(probs)[0]), best))
        class_ids = tf.where(use_best, tf.argmax(foreground, axis=1, output_type=tf.int32) + 1, class_ids)
        return class_ids, tf.gather(probs, class_ids, batch_dims=1), tf.logical_or(wanted, use_best)

    def _per_class_nms(self, keep: tf.Tensor, boxes: tf.Tensor, scores: tf.Tensor,
                       class_ids: tf.Tensor) -> tf.Tensor:
        """Indices (int64, ascending) among ``keep`` that survive NMS within their own class."""
        kept_classes = tf.gather(class_ids, keep)
        kept_boxes = tf.gather(boxes, keep)
        kept_scores = tf.gather(scores, keep)

        def nms_one_class(class_id: tf.Tensor) -> tf.Tensor:
            members = tf.reshape(tf.where(tf.equal(kept_classes, class_id)), (-1,))
            survivors = portable_ops.non_max_suppression(
                tf.gather(kept_boxes, members), tf.gather(kept_scores, members),
                max_output_size=self.max_instances, iou_threshold=self.nms_threshold)
            survivors = tf.gather(members, survivors)
            return tf.pad(survivors, [(0, self.max_instances - tf.shape(survivors)[0])], constant_values=-1)

        unique_classes = tf.unique(kept_classes).y
        survivors = tf.map_fn(nms_one_class, unique_classes,
                              fn_output_signature=tf.TensorSpec((self.max_instances,), tf.int64))
        survivors = tf.reshape(survivors, (-1,))
        survivors = tf.sort(tf.boolean_mask(survivors, survivors >= 0))
        return tf.gather(keep, survivors)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0][0], self.max_instances, 6)

