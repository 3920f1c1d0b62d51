"""The five Mask R-CNN losses (Matterport definitions) and the L2 weight-decay term.

Every loss is a float32 scalar and is 0 (not NaN) when there is nothing to average, e.g. an
image without any ground-truth instance. Shapes use B = batch, A = anchors, T = ROIs per
image, C = classes (incl. background); deltas are (dy, dx, log dh, log dw).
"""

from __future__ import annotations

from typing import Iterable

import tensorflow as tf

#: Keras' probability clipping for binary cross-entropy.
EPSILON = 1e-7


def smooth_l1(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Elementwise smooth-L1: 0.5 x^2 where |x| < 1, else |x| - 0.5."""
    diff = tf.abs(y_true - y_pred)
    return tf.where(diff < 1.0, 0.5 * tf.square(diff), diff - 0.5)


def _mean_or_zero(values: tf.Tensor) -> tf.Tensor:
    """Mean of all elements, 0.0 for an empty tensor."""
    values = tf.cast(values, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(values), tf.cast(tf.size(values), tf.float32))


def rpn_class_loss(rpn_match: tf.Tensor, rpn_class_logits: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy of anchors with rpn_match != 0 (+1 -> fg, -1 -> bg), mean.

    rpn_match [B, A, 1] int; rpn_class_logits [B, A, 2] (bg, fg).
    """
    rpn_match = tf.squeeze(rpn_match, -1)
    used = tf.where(tf.not_equal(rpn_match, 0))
    labels = tf.cast(tf.equal(tf.gather_nd(rpn_match, used), 1), tf.int32)
    logits = tf.cast(tf.gather_nd(rpn_class_logits, used), tf.float32)
    return _mean_or_zero(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def rpn_bbox_loss(config, target_bbox: tf.Tensor, rpn_match: tf.Tensor, rpn_bbox: tf.Tensor) -> tf.Tensor:
    """Smooth-L1 between positive anchors' deltas and the first #positives target rows, mean.

    target_bbox [B, RPN_TRAIN_ANCHORS_PER_IMAGE, 4]; rpn_match [B, A, 1]; rpn_bbox [B, A, 4].
    """
    rpn_match = tf.squeeze(rpn_match, -1)
    positive = tf.equal(rpn_match, 1)
    predicted = tf.cast(tf.boolean_mask(rpn_bbox, positive), tf.float32)
    counts = tf.reduce_sum(tf.cast(positive, tf.int32), axis=1)
    rows = tf.range(tf.shape(target_bbox)[1])[tf.newaxis, :] < counts[:, tf.newaxis]  # [B, R]
    targets = tf.boolean_mask(tf.cast(target_bbox, tf.float32), rows)
    del config  # images are packed by the mask above, IMAGES_PER_GPU is not needed
    return _mean_or_zero(smooth_l1(targets, predicted))


def mrcnn_class_loss(target_class_ids: tf.Tensor, pred_class_logits: tf.Tensor,
                     active_class_ids: tf.Tensor) -> tf.Tensor:
    """Cross-entropy per ROI (padding ROIs count as background), masked by active classes.

    target_class_ids [B, T] int; pred_class_logits [B, T, C]; active_class_ids [B, C] (1 where
    the class exists in the image's source; the first image's row is used, as Matterport does).
    A ROI whose *predicted* class is inactive is left out; loss = sum / number kept.
    """
    target_class_ids = tf.cast(target_class_ids, tf.int64)
    pred_class_logits = tf.cast(pred_class_logits, tf.float32)
    pred_class_ids = tf.argmax(pred_class_logits, axis=2)
    pred_active = tf.gather(tf.cast(active_class_ids[0], tf.float32), pred_class_ids)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target_class_ids, logits=pred_class_logits)
    return tf.math.divide_no_nan(tf.reduce_sum(loss * pred_active), tf.reduce_sum(pred_active))


def focal_cross_entropy(labels: tf.Tensor, logits: tf.Tensor, class_weights=None, gamma: float = 0.0,
                        smoothing: float = 0.0, first_smoothed: int = 0) -> tf.Tensor:
    """Per-example softmax cross-entropy [N] from logits [N, C] and int labels [N] (float32, stable:
    log-softmax of the logits), times ``class_weights[label]`` (a [C] array or None = 1) and, with
    ``gamma`` > 0, the focal factor (1 - p_label)^gamma (Lin et al. 2017).

    ``smoothing`` (label smoothing, Szegedy et al. 2016): an example whose label is >=
    ``first_smoothed`` has the target (1 - s) on its label plus s spread evenly over the classes
    ``first_smoothed..C-1``; labels below it (the ROI head's background, 0) keep their one-hot
    target. The focal factor still uses p_label."""
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    log_p = tf.gather(log_probs, labels, batch_dims=1)
    loss = -log_p
    if smoothing:
        spread = -tf.reduce_mean(log_probs[:, first_smoothed:], axis=-1)
        smoothed = (1.0 - float(smoothing)) * loss + float(smoothing) * spread
        loss = tf.where(labels >= first_smoothed, smoothed, loss)
    if gamma:
        loss = loss * tf.pow(tf.maximum(1.0 - tf.exp(log_p), 0.0), float(gamma))
    if class_weights is not None:
        loss = loss * tf.gather(tf.constant(class_weights, tf.float32), labels)
    return loss


def weighted_class_loss(target_class_ids: tf.Tensor, pred_class_logits: tf.Tensor, active_class_ids: tf.Tensor,
                        class_weights=None, gamma: float = 0.0, smoothing: float = 0.0) -> tf.Tensor:
    """:func:`mrcnn_class_loss` with per-class weights [C] (background included), a focal factor and
    label smoothing among the foreground classes 1..C-1 of lesion ROIs (:func:`focal_cross_entropy`;
    background ROIs keep a one-hot target); the same masking and denominator (ROIs kept). With none
    of them it is :func:`mrcnn_class_loss` exactly."""
    target_class_ids = tf.cast(target_class_ids, tf.int64)
    pred_class_logits = tf.cast(pred_class_logits, tf.float32)
    pred_active = tf.gather(tf.cast(active_class_ids[0], tf.float32), tf.argmax(pred_class_logits, axis=2))
    flat_logits = tf.reshape(pred_class_logits, [-1, tf.shape(pred_class_logits)[-1]])
    loss = focal_cross_entropy(tf.reshape(target_class_ids, [-1]), flat_logits, class_weights, gamma,
                               smoothing, first_smoothed=1)
    loss = tf.reshape(loss, tf.shape(target_class_ids))
    return tf.math.divide_no_nan(tf.reduce_sum(loss * pred_active), tf.reduce_sum(pred_active))


def image_diagnosis_loss(labels: tf.Tensor, logits: tf.Tensor, class_weights=None, gamma: float = 0.0,
                         smoothing: float = 0.0) -> tf.Tensor:
    """Image-level diagnosis loss: :func:`focal_cross_entropy` (label smoothing over all K classes)
    averaged over the images that have a
    label (labels [B] int, index in CLASSES, -1 = none; logits [B, K]); 0 when none has one. The
    mean is over images, not over weights, so class weights keep their effect in small batches."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    known = labels >= 0
    loss = focal_cross_entropy(tf.boolean_mask(labels, known), tf.boolean_mask(tf.cast(logits, tf.float32), known),
                               class_weights, gamma, smoothing)
    return _mean_or_zero(loss)


def agnostic_class_ids(target_class_ids: tf.Tensor) -> tf.Tensor:
    """Every positive class id -> 1 (class-agnostic box and mask losses: one regressor, one mask)."""
    return tf.minimum(tf.cast(target_class_ids, tf.int32), 1)


def _positive_rois(target_class_ids: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Flat indices [P] of ROIs with class > 0 and their class ids [P] (int64)."""
    ids = tf.reshape(tf.cast(target_class_ids, tf.int64), [-1])
    positive = tf.where(ids > 0)[:, 0]
    return positive, tf.gather(ids, positive)


def mrcnn_bbox_loss(target_bbox: tf.Tensor, target_class_ids: tf.Tensor, pred_bbox: tf.Tensor) -> tf.Tensor:
    """Smooth-L1 of positive ROIs' deltas for their target class, mean over elements.

    target_bbox [B, T, 4]; target_class_ids [B, T]; pred_bbox [B, T, C, 4].
    """
    positive, class_ids = _positive_rois(target_class_ids)
    targets = tf.gather(tf.reshape(tf.cast(target_bbox, tf.float32), [-1, 4]), positive)
    num_classes = tf.shape(pred_bbox)[2]
    flat_pred = tf.reshape(tf.cast(pred_bbox, tf.float32), [-1, num_classes, 4])
    predicted = tf.gather_nd(flat_pred, tf.stack([positive, class_ids], axis=1))
    return _mean_or_zero(smooth_l1(targets, predicted))


def binary_crossentropy(target: tf.Tensor, prob: tf.Tensor) -> tf.Tensor:
    """Elementwise BCE of probabilities clipped to [1e-7, 1 - 1e-7] (Keras 2 formula)."""
    prob = tf.clip_by_value(prob, EPSILON, 1.0 - EPSILON)
    return -(target * tf.math.log(prob + EPSILON) + (1.0 - target) * tf.math.log(1.0 - prob + EPSILON))


def mrcnn_mask_loss(target_masks: tf.Tensor, target_class_ids: tf.Tensor, pred_masks: tf.Tensor) -> tf.Tensor:
    """BCE between positive ROIs' target masks and their class's predicted mask, mean over pixels.

    target_masks [B, T, h, w] (0/1); target_class_ids [B, T]; pred_masks [B, T', h, w, C]
    (sigmoid). T' may be smaller than T when the mask head only ran on the first T' ROIs
    (positives come first, so no positive is lost; see Config.TRAIN_MASKS_ON_POSITIVES_ONLY).
    """
    t_pred = pred_masks.shape[1] if pred_masks.shape[1] is not None else tf.shape(pred_masks)[1]
    target_class_ids = target_class_ids[:, :t_pred]
    target_masks = target_masks[:, :t_pred]
    positive, class_ids = _positive_rois(target_class_ids)
    mask_shape = tf.shape(target_masks)
    targets = tf.gather(tf.reshape(tf.cast(target_masks, tf.float32), [-1, mask_shape[2], mask_shape[3]]), positive)
    pred_shape = tf.shape(pred_masks)
    flat_pred = tf.reshape(tf.cast(pred_masks, tf.float32), [-1, pred_shape[2], pred_shape[3], pred_shape[4]])
    flat_pred = tf.transpose(flat_pred, [0, 3, 1, 2])  # [N, C, h, w]
    predicted = tf.gather_nd(flat_pred, tf.stack([positive, class_ids], axis=1))
    return _mean_or_zero(binary_crossentropy(targets, predicted))


#: Weights whose name contains one of these get no weight decay (BatchNorm gamma and beta).
UNDECAYED_NAMES = ("gamma", "beta")


def is_decayed(variable) -> bool:
    """True for weights that get L2 decay: everything but BatchNorm gamma/beta (UNDECAYED_NAMES)."""
    name = getattr(variable, "path", None) or variable.name
    return not any(part in name for part in UNDECAYED_NAMES)


def weight_decay_loss(variables: Iterable, weight_decay: float) -> tf.Tensor:
    """Matterport's L2 term: sum over decayed tensors of weight_decay * mean(w^2) (float32)."""
    terms = [tf.reduce_mean(tf.square(tf.cast(v, tf.float32))) for v in variables if is_decayed(v)]
    if not terms or not weight_decay:
        return tf.constant(0.0, tf.float32)
    return tf.cast(weight_decay, tf.float32) * tf.add_n(terms)


# Matterport's function names, for users porting code.
rpn_class_loss_graph = rpn_class_loss
rpn_bbox_loss_graph = rpn_bbox_loss
mrcnn_class_loss_graph = mrcnn_class_loss
mrcnn_bbox_loss_graph = mrcnn_bbox_loss
mrcnn_mask_loss_graph = mrcnn_mask_loss
