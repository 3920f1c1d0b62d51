"""Training targets: which anchors / ROIs are positive, and what they should regress to.

* :func:`build_rpn_targets` (numpy, per image, pixel coordinates) labels every anchor
  +1 / -1 / 0 and gives the normalised deltas of the positive anchors (Matterport rules).
* :class:`DetectionTargetLayer` (TensorFlow, in the training graph) samples proposals into
  positive and negative ROIs and builds class, box-delta and mask targets for the heads.

Boxes are (y1, x1, y2, x2) everywhere; deltas are (dy, dx, log dh, log dw).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mrcnn import tf_boxes
from mrcnn.boxes import box_refinement, compute_overlaps

#: RPN IoU thresholds (Matterport): below -> negative, at or above -> positive.
RPN_NEGATIVE_IOU = 0.3
RPN_POSITIVE_IOU = 0.7
#: ROI IoU threshold that splits positive from negative proposals.
ROI_POSITIVE_IOU = 0.5
#: An anchor or ROI overlapping a crowd box by at least this much is never a negative.
CROWD_IOU = 0.001


# -------------------------------------------------------------------------------------------
# RPN targets (numpy)

def _label_anchors(overlaps: np.ndarray, may_be_negative: np.ndarray) -> np.ndarray:
    """rpn_match [A] from IoU [A, G]: -1 below 0.3 (if allowed), +1 best-for-a-GT or >= 0.7."""
    match = np.zeros(overlaps.shape[0], dtype=np.int32)
    if overlaps.shape[1] == 0:
        match[may_be_negative] = -1
        return match
    anchor_iou_max = overlaps.max(axis=1)
    match[(anchor_iou_max < RPN_NEGATIVE_IOU) & may_be_negative] = -1
    gt_iou_max = overlaps.max(axis=0)
    # Every GT gets all anchors that tie for its best IoU (GTs touching no anchor are ignored).
    best_for_gt = np.any((overlaps == gt_iou_max[None, :]) & (gt_iou_max[None, :] > 0), axis=1)
    match[best_for_gt] = 1
    match[anchor_iou_max >= RPN_POSITIVE_IOU] = 1
    return match


def _subsample(match: np.ndarray, value: int, keep: int, rng: np.random.Generator) -> None:
    """Reset to 0, at random, all but ``keep`` anchors labelled ``value`` (in place)."""
    ids = np.flatnonzero(match == value)
    extra = len(ids) - keep
    if extra > 0:
        match[rng.choice(ids, extra, replace=False)] = 0


def build_rpn_targets(image_shape, anchors: np.ndarray, gt_class_ids: np.ndarray, gt_boxes: np.ndarray,
                      config, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label anchors and compute the RPN box targets of one image (Matterport rules).

    anchors [A, 4] and gt_boxes [G, 4] are pixel boxes (y1, x1, y2, x2); gt_class_ids [G] (a
    negative id marks a crowd box: its anchors are never negative, it is never a target).
    Returns rpn_match int32 [A] (+1 positive, -1 negative, 0 neutral), at most
    RPN_TRAIN_ANCHORS_PER_IMAGE / 2 positives and RPN_TRAIN_ANCHORS_PER_IMAGE in all, and
    rpn_bbox float32 [RPN_TRAIN_ANCHORS_PER_IMAGE, 4]: deltas / RPN_BBOX_STD_DEV of the positive
    anchors in ascending anchor order, zero rows after. ``image_shape`` is unused (API parity).
    """
    del image_shape
    rng = rng if rng is not None else np.random.default_rng()
    anchors = np.asarray(anchors, dtype=np.float64)
    gt_class_ids = np.asarray(gt_class_ids).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    crowd = gt_class_ids < 0
    may_be_negative = np.ones(len(anchors), dtype=bool)
    if crowd.any():
        may_be_negative = compute_overlaps(anchors, gt_boxes[crowd]).max(axis=1) < CROWD_IOU
    gt_boxes = gt_boxes[~crowd]
    overlaps = compute_overlaps(anchors, gt_boxes)
    match = _label_anchors(overlaps, may_be_negative)
    total = config.RPN_TRAIN_ANCHORS_PER_IMAGE
    _subsample(match, 1, total // 2, rng)
    _subsample(match, -1, total - int(np.sum(match == 1)), rng)

    rpn_bbox = np.zeros((total, 4), dtype=np.float32)
    positive = np.flatnonzero(match == 1)
    if len(positive):
        assigned = gt_boxes[overlaps[positive].argmax(axis=1)]
        deltas = box_refinement(anchors[positive], assigned, dtype=np.float64) / np.asarray(config.RPN_BBOX_STD_DEV)
        rpn_bbox[: len(positive)] = deltas
    return match, rpn_bbox


# -------------------------------------------------------------------------------------------
# Random ROIs and detection targets in numpy (Matterport's debugging path: data_generator with
# random_rois / detection_targets; training uses DetectionTargetLayer below)

#: Share of generate_random_rois' boxes drawn around the GT boxes (the rest anywhere in the image).
RANDOM_ROIS_NEAR_GT = 0.9


def _random_spans(rng: np.random.Generator, low: int, high: int, count: int) -> np.ndarray:
    """``count`` sorted pairs (a, b) of two distinct integers of range(low, high) -> int32 [count, 2]
    (a < b: a non-empty span; Matterport draws pairs and drops ties, the same distribution)."""
    low, high = int(low), int(high)
    if high - low < 2:  # too narrow for two distinct values: widen inside [0, high + 1]
        low, high = max(min(low, high - 2), 0), max(high, low + 2)
    first = rng.integers(low, high, count)
    second = rng.integers(low, high - 1, count)
    second = second + (second >= first)                    # uniform over the values != first
    return np.sort(np.stack([first, second], axis=1), axis=1).astype(np.int32)


def generate_random_rois(image_shape, count: int, gt_class_ids: np.ndarray, gt_boxes: np.ndarray, *,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """``count`` random ROIs int32 [count, 4] (y1, x1, y2, x2 pixels, non-empty), like proposals.

    Matterport's rules: int(0.9 * count / G) boxes around each of the G GT boxes (corners drawn
    inside the GT box grown by its own height/width on each side, clipped to the image), the
    rest anywhere in the image (last rows). Without GT boxes all are drawn anywhere.
    ``gt_class_ids`` is unused (API parity); ``rng`` (keyword-only, ours) defaults to a fresh one.
    """
    del gt_class_ids
    rng = rng if rng is not None else np.random.default_rng()
    height, width = int(image_shape[0]), int(image_shape[1])
    gt_boxes = np.asarray(gt_boxes).reshape(-1, 4).astype(np.int64)
    per_box = int(RANDOM_ROIS_NEAR_GT * count / len(gt_boxes)) if len(gt_boxes) else 0
    rois = np.zeros((count, 4), dtype=np.int32)
    for i, (y1, x1, y2, x2) in enumerate(gt_boxes):
        h, w = y2 - y1, x2 - x1
        ys = _random_spans(rng, max(y1 - h, 0), min(y2 + h, height), per_box)
        xs = _random_spans(rng, max(x1 - w, 0), min(x2 + w, width), per_box)
        rois[i * per_box:(i + 1) * per_box] = np.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)
    rest = count - per_box * len(gt_boxes)
    if rest > 0:
        ys, xs = _random_spans(rng, 0, height, rest), _random_spans(rng, 0, width, rest)
        rois[count - rest:] = np.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)
    return rois


def _pick(rng: np.random.Generator, ids: np.ndarray, count: int, replace: bool = False) -> np.ndarray:
    if count <= 0 or len(ids) == 0:
        return ids[:0]
    if not replace and len(ids) <= count:
        return ids
    return rng.choice(ids, count, replace=replace)


def build_detection_targets(rpn_rois: np.ndarray, gt_class_ids: np.ndarray, gt_boxes: np.ndarray,
                            gt_masks: np.ndarray, config, *, rng: np.random.Generator | None = None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The heads' targets for ROIs, in numpy (Matterport's ``build_detection_targets``; debugging).

    rpn_rois [R, 4] and gt_boxes [G, 4] in pixels; gt_class_ids [G] (only ids > 0 are used);
    gt_masks [H, W, G] or, with config.USE_MINI_MASK, mini masks [mh, mw, G].
    Positives: IoU with their best GT box > 0.5, at most TRAIN_ROIS_PER_IMAGE * ROI_POSITIVE_RATIO
    (random); negatives: IoU < 0.5 fill the rest (random); if still short, kept negatives (or,
    without any, kept ROIs) are repeated. Returns, T = TRAIN_ROIS_PER_IMAGE:
    rois [T, 4] (the chosen ROIs, positives first), class_ids int32 [T] (0 = background),
    bbox float32 [T, NUM_CLASSES, 4] (deltas / BBOX_STD_DEV in the row's class only),
    masks float32 [T, MASK_H, MASK_W, NUM_CLASSES] (the GT mask cut to the ROI and resized,
    bilinear, in the row's class only). Unlike Matterport, an image without instances is
    accepted: all ROIs are background.
    """
    from mrcnn.imaging import expand_mask, resize

    rng = rng if rng is not None else np.random.default_rng()
    rpn_rois = np.asarray(rpn_rois)
    if len(rpn_rois) == 0:
        raise ValueError("build_detection_targets needs at least one ROI")
    total, num_classes = int(config.TRAIN_ROIS_PER_IMAGE), int(config.NUM_CLASSES)
    instances = np.flatnonzero(np.asarray(gt_class_ids).reshape(-1) > 0)
    gt_class_ids = np.asarray(gt_class_ids).reshape(-1)[instances].astype(np.int32)
    gt_boxes = np.asarray(gt_boxes).reshape(-1, 4)[instances]
    gt_masks = np.asarray(gt_masks)[:, :, instances]

    overlaps = compute_overlaps(rpn_rois.astype(np.float64), gt_boxes.astype(np.float64))
    if len(instances):
        assignment = overlaps.argmax(axis=1)
        iou_max = overlaps[np.arange(len(rpn_rois)), assignment]
    else:
        assignment, iou_max = np.zeros(len(rpn_rois), np.int64), np.zeros(len(rpn_rois))
    positive_ids = np.flatnonzero(iou_max > ROI_POSITIVE_IOU)
    negative_ids = np.flatnonzero(iou_max < ROI_POSITIVE_IOU)
    keep_positive = _pick(rng, positive_ids, int(total * config.ROI_POSITIVE_RATIO))
    keep_negative = _pick(rng, negative_ids, total - len(keep_positive))
    keep = np.concatenate([keep_positive, keep_negative])
    if len(keep) < total:
        pool = keep_negative if len(keep_negative) else (keep if len(keep) else np.arange(len(rpn_rois)))
        keep = np.concatenate([keep, _pick(rng, pool, total - len(keep), replace=True)])

    rois = rpn_rois[keep]
    is_positive = np.isin(keep, keep_positive)
    roi_gt = assignment[keep]
    class_ids = np.where(is_positive, gt_class_ids[roi_gt] if len(instances) else 0, 0).astype(np.int32)
    bbox = np.zeros((total, num_classes, 4), dtype=np.float32)
    masks = np.zeros((total, *config.MASK_SHAPE, num_classes), dtype=np.float32)
    std = np.asarray(config.BBOX_STD_DEV, dtype=np.float64)
    for i in np.flatnonzero(is_positive):
        gt = roi_gt[i]
        bbox[i, class_ids[i]] = box_refinement(rois[i:i + 1], gt_boxes[gt:gt + 1], dtype=np.float64)[0] / std
        mask = gt_masks[:, :, gt]
        if config.USE_MINI_MASK:  # back to image size inside its GT box first
            mask = expand_mask(gt_boxes[gt:gt + 1], mask[:, :, np.newaxis], config.IMAGE_SHAPE)[:, :, 0]
        y1, x1, y2, x2 = rois[i].astype(np.int64)
        masks[i, :, :, class_ids[i]] = resize(mask[y1:y2, x1:x2].astype(np.float32), config.MASK_SHAPE)
    return rois, class_ids, bbox, masks


# -------------------------------------------------------------------------------------------
# Detection targets (TensorFlow)

def _sample_rois(overlaps: tf.Tensor, no_crowd: tf.Tensor, config) -> tuple[tf.Tensor, tf.Tensor]:
    """Indices of sampled positive and negative proposals from IoU [N, G] (random subsets)."""
    # IoUs are >= 0, so a zero column gives the same maximum and 0 for an image without GT boxes;
    # no tf.cond (its trace once failed in CI with "No common supertype" of two equal specs).
    zero_column = tf.zeros(tf.stack([tf.shape(overlaps)[0], 1]), overlaps.dtype)
    roi_iou_max = tf.reduce_max(tf.concat([overlaps, zero_column], axis=1), axis=1)
    positive = tf.where(roi_iou_max >= ROI_POSITIVE_IOU)[:, 0]
    negative = tf.where(tf.logical_and(roi_iou_max < ROI_POSITIVE_IOU, no_crowd))[:, 0]
    max_positive = int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO)
    positive = tf.random.shuffle(positive)[:max_positive]
    positive_count = tf.shape(positive)[0]
    ratio = 1.0 / config.ROI_POSITIVE_RATIO
    negative_count = tf.cast(ratio * tf.cast(positive_count, tf.float32), tf.int32) - positive_count
    negative = tf.random.shuffle(negative)[:negative_count]
    return positive, negative


def _mask_targets(positive_rois: tf.Tensor, roi_gt_boxes: tf.Tensor, roi_masks: tf.Tensor, config) -> tf.Tensor:
    """Mask targets [P, mh, mw] (0/1) of positive ROIs [P, 4] cut from their GT masks [P, H, W, 1]."""
    boxes = positive_rois
    if config.USE_MINI_MASK:
        # Express the ROI in the frame of its GT box (the mini mask covers exactly that box).
        y1, x1, y2, x2 = tf.split(positive_rois, 4, axis=1)
        gy1, gx1, gy2, gx2 = tf.split(roi_gt_boxes, 4, axis=1)
        gh = gy2 - gy1
        gw = gx2 - gx1
        boxes = tf.concat([(y1 - gy1) / gh, (x1 - gx1) / gw, (y2 - gy1) / gh, (x2 - gx1) / gw], axis=1)
    box_ids = tf.range(tf.shape(roi_masks)[0])
    masks = tf.image.crop_and_resize(tf.cast(roi_masks, tf.float32), boxes, box_ids, list(config.MASK_SHAPE))
    return tf.round(tf.squeeze(masks, axis=3))


def detection_targets_graph(proposals: tf.Tensor, gt_class_ids: tf.Tensor, gt_boxes: tf.Tensor,
                            gt_masks: tf.Tensor, config) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Targets of one image.

    proposals [N, 4] and gt_boxes [G, 4] normalised (y1, x1, y2, x2), zero rows = padding (with
    PROPOSALS_APPEND_GT the non-crowd GT boxes join the proposals);
    gt_class_ids [G] int (negative = crowd); gt_masks [mh, mw, G] (mini) or [H, W, G].
    Returns, zero-padded to T = TRAIN_ROIS_PER_IMAGE with positives first:
    rois [T, 4], class_ids int32 [T], deltas [T, 4] (/ BBOX_STD_DEV), masks [T, MASK_H, MASK_W].
    """
    proposals, _ = tf_boxes.trim_zeros_graph(proposals, name="trim_proposals")
    gt_boxes, non_zeros = tf_boxes.trim_zeros_graph(gt_boxes, name="trim_gt_boxes")
    gt_class_ids = tf.boolean_mask(gt_class_ids, non_zeros)
    gt_masks = tf.gather(gt_masks, tf.where(non_zeros)[:, 0], axis=2)

    crowd = gt_class_ids < 0
    crowd_boxes = tf.boolean_mask(gt_boxes, crowd)
    gt_class_ids = tf.boolean_mask(gt_class_ids, ~crowd)
    gt_boxes = tf.boolean_mask(gt_boxes, ~crowd)
    gt_masks = tf.gather(gt_masks, tf.where(~crowd)[:, 0], axis=2)

    if config.PROPOSALS_APPEND_GT:
        proposals = tf.concat([proposals, gt_boxes], axis=0)
    overlaps = tf_boxes.overlaps_graph(proposals, gt_boxes)
    crowd_overlaps = tf_boxes.overlaps_graph(proposals, crowd_boxes)
    crowd_iou_max = tf.reduce_max(tf.concat([crowd_overlaps, tf.zeros_like(proposals[:, :1])], axis=1), axis=1)
    positive, negative = _sample_rois(overlaps, crowd_iou_max < CROWD_IOU, config)

    positive_rois = tf.gather(proposals, positive)
    negative_rois = tf.gather(proposals, negative)
    positive_overlaps = tf.gather(overlaps, positive)
    assignment = tf.cond(tf.shape(positive_overlaps)[1] > 0,
                         lambda: tf.argmax(positive_overlaps, axis=1),
                         lambda: tf.zeros([0], tf.int64))
    roi_gt_boxes = tf.gather(gt_boxes, assignment)
    roi_class_ids = tf.cast(tf.gather(gt_class_ids, assignment), tf.int32)
    deltas = tf_boxes.box_refinement_graph(positive_rois, roi_gt_boxes)
    deltas = deltas / tf.constant(np.asarray(config.BBOX_STD_DEV), tf.float32)
    roi_masks = tf.gather(tf.expand_dims(tf.transpose(gt_masks, [2, 0, 1]), -1), assignment)
    masks = _mask_targets(positive_rois, roi_gt_boxes, roi_masks, config)

    rois = tf.concat([positive_rois, negative_rois], axis=0)
    total = config.TRAIN_ROIS_PER_IMAGE
    n_negative = tf.shape(negative_rois)[0]
    pad = tf.maximum(total - tf.shape(rois)[0], 0)
    rois = tf.pad(rois, [(0, pad), (0, 0)])
    roi_class_ids = tf.pad(roi_class_ids, [(0, n_negative + pad)])
    deltas = tf.pad(deltas, [(0, n_negative + pad), (0, 0)])
    masks = tf.pad(masks, [(0, n_negative + pad), (0, 0), (0, 0)])
    mh, mw = config.MASK_SHAPE
    return (tf.ensure_shape(rois, [total, 4]), tf.ensure_shape(roi_class_ids, [total]),
            tf.ensure_shape(deltas, [total, 4]), tf.ensure_shape(masks, [total, mh, mw]))


class DetectionTargetLayer(keras.layers.Layer):
    """Sample proposals into training ROIs and build the heads' targets (Matterport §5.6).

    Inputs: proposals [B, N, 4] normalised, gt_class_ids [B, G] int, gt_boxes [B, G, 4]
    normalised, gt_masks [B, mh, mw, G] bool. Outputs rois [B, T, 4], target_class_ids
    [B, T] int32, target_bbox [B, T, 4], target_mask [B, T, MASK_H, MASK_W] (T =
    TRAIN_ROIS_PER_IMAGE, positives first, then negatives, then zero padding).
    """

    def __init__(self, config, **kwargs) -> None:
        kwargs.setdefault("dtype", "float32")  # boxes stay float32 under mixed precision
        super().__init__(**kwargs)
        self.config = config

    def call(self, inputs):
        proposals, gt_class_ids, gt_boxes, gt_masks = inputs
        per_image = [detection_targets_graph(proposals[i], gt_class_ids[i], gt_boxes[i], gt_masks[i], self.config)
                     for i in range(self.config.IMAGES_PER_GPU)]
        names = ("rois", "target_class_ids", "target_bbox", "target_mask")
        return [tf.stack(list(parts), axis=0, name=name) for parts, name in zip(zip(*per_image, strict=True), names, strict=True)]

    def compute_output_shape(self, input_shape):
        t = self.config.TRAIN_ROIS_PER_IMAGE
        b = input_shape[0][0]
        return [(b, t, 4), (b, t), (b, t, 4), (b, t, *self.config.MASK_SHAPE)]

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape([x.shape for x in inputs])
        dtypes = ("float32", "int32", "float32", "float32")
        return [keras.KerasTensor(s, dtype=d) for s, d in zip(shapes, dtypes, strict=True)]
