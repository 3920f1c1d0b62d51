"""Region proposal network: the shared RPN head ("rpn_model") and the proposal layer ("ROI").

Anchor order (and so the order of every per-anchor tensor): level P2..P6 -> row -> column ->
ratio. Deltas are (dy, dx, log dh, log dw); proposals are normalised (y1, x1, y2, x2).
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers as KL

from mrcnn import portable_ops
from mrcnn.tf_boxes import apply_box_deltas_graph, clip_boxes_graph


def build_rpn_model(anchor_stride: int, anchors_per_location: int, depth: int,
                    conv_channels: int = 512) -> keras.Model:
    """The RPN head as a sub-model named "rpn_model", shared by all pyramid levels.

    Input [B, H, W, depth] -> (rpn_class_logits [B, H*W*A, 2], rpn_probs [B, H*W*A, 2],
    rpn_bbox [B, H*W*A, 4]); channel layout is anchor-major (a*2 + k, a*4 + k). The shared 3x3
    conv has ``conv_channels`` filters (Matterport: 512; torchvision and Model Garden: the FPN depth).
    """
    feature_map = keras.Input(shape=(None, None, depth), name="input_rpn_feature_map")
    shared = KL.Conv2D(int(conv_channels), (3, 3), padding="same", activation="relu", strides=anchor_stride,
                       name="rpn_conv_shared")(feature_map)
    x = KL.Conv2D(2 * anchors_per_location, (1, 1), padding="valid", activation="linear",
                  name="rpn_class_raw")(shared)
    rpn_class_logits = KL.Reshape((-1, 2))(x)
    rpn_probs = KL.Activation("softmax", dtype="float32")(rpn_class_logits)
    x = KL.Conv2D(4 * anchors_per_location, (1, 1), padding="valid", activation="linear",
                  name="rpn_bbox_pred")(shared)
    rpn_bbox = KL.Reshape((-1, 4))(x)
    return keras.Model([feature_map], [rpn_class_logits, rpn_probs, rpn_bbox], name="rpn_model")


def apply_rpn(rpn_model: keras.Model, feature_maps: Sequence[Any]) -> tuple[Any, Any, Any]:
    """Run the shared RPN on every level and concatenate in level order.

    -> (rpn_class_logits [B, A, 2], rpn_class [B, A, 2], rpn_bbox [B, A, 4]), float32, layers
    named "rpn_class_logits", "rpn_class", "rpn_bbox".
    """
    per_level = [rpn_model([p]) for p in feature_maps]
    names = ("rpn_class_logits", "rpn_class", "rpn_bbox")
    outputs = []
    for i, name in enumerate(names):
        outputs.append(KL.Concatenate(axis=1, name=name, dtype="float32")([lvl[i] for lvl in per_level]))
    return outputs[0], outputs[1], outputs[2]


class ProposalLayer(KL.Layer):
    """Turn anchor scores and deltas into ``proposal_count`` proposals per image.

    Inputs: rpn_class [B, A, 2] (softmax), rpn_bbox [B, A, 4] (raw deltas), anchors [B or 1, A, 4]
    (normalised). Steps: top ``min(PRE_NMS_LIMIT, A)`` anchors by foreground score, deltas times
    RPN_BBOX_STD_DEV applied, clipped to [0, 1], NMS at ``nms_threshold``, zero-padded.
    Output: [B, proposal_count, 4] normalised (y1, x1, y2, x2), float32.
    """

    def __init__(self, proposal_count: int, nms_threshold: float, config: Any, **kwargs: Any) -> None:
        kwargs.setdefault("name", "ROI")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.config = config
        self.proposal_count = int(proposal_count)
        self.nms_threshold = float(nms_threshold)
        self.pre_nms_limit = int(config.PRE_NMS_LIMIT)
        self.std_dev = np.reshape(np.asarray(config.RPN_BBOX_STD_DEV, dtype=np.float32), (1, 1, 4))

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        rpn_class, rpn_bbox, anchors = (tf.cast(t, tf.float32) for t in inputs)
        scores = rpn_class[:, :, 1]
        deltas = rpn_bbox * tf.constant(self.std_dev)
        if anchors.shape.rank == 2:
            anchors = anchors[tf.newaxis]
        anchors = tf.broadcast_to(anchors, tf.shape(deltas))
        k = tf.minimum(self.pre_nms_limit, tf.shape(anchors)[1])
        top = tf.math.top_k(scores, k, sorted=True, name="top_anchors").indices
        scores = tf.gather(scores, top, batch_dims=1)
        deltas = tf.gather(deltas, top, batch_dims=1)
        anchors = tf.gather(anchors, top, batch_dims=1)
        proposals = tf.map_fn(self._proposals_for_image, (scores, deltas, anchors),
                              fn_output_signature=tf.TensorSpec((self.proposal_count, 4), tf.float32))
        return portable_ops.ensure_shape(proposals, (None, self.proposal_count, 4))

    def _proposals_for_image(self, args: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tf.Tensor:
        """scores [K], deltas [K, 4], anchors [K, 4] of one image -> proposals [proposal_count, 4]."""
        scores, deltas, anchors = args
        boxes = apply_box_deltas_graph(anchors, deltas)
        boxes = clip_boxes_graph(boxes, tf.constant([0.0, 0.0, 1.0, 1.0]))
        keep = portable_ops.non_max_suppression(boxes, scores, self.proposal_count, self.nms_threshold)
        proposals = tf.gather(boxes, keep)
        padding = tf.maximum(self.proposal_count - tf.shape(proposals)[0], 0)
        return tf.pad(proposals, [(0, padding), (0, 0)])

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0][0], self.proposal_count, 4)

    def get_config(self) -> dict:
        base = super().get_config()
        base.update(proposal_count=self.proposal_count, nms_threshold=self.nms_threshold)
        return base
