"""RPN targets (numpy) and detection targets (TF): hand-made cases and Matterport reference data."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from factories import make_config

from mrcnn.boxes import box_refinement
from mrcnn.targets import DetectionTargetLayer, build_rpn_targets, detection_targets_graph


def small_config(**overrides):
    """Matterport's defaults with few RPN anchors and ROIs, 4x4 masks, 8x8 mini-masks."""
    return make_config("matterport", **(dict(NAME="t", IMAGES_PER_GPU=1, RPN_TRAIN_ANCHORS_PER_IMAGE=8,
                                             TRAIN_ROIS_PER_IMAGE=6, ROI_POSITIVE_RATIO=0.5, MASK_SHAPE=[4, 4],
                                             MASK_POOL_SIZE=2, MINI_MASK_SHAPE=[8, 8]) | overrides))


# -------------------------------------------------------------------------------------------
# RPN targets, hand-made

ANCHORS = np.array([
    [0, 0, 10, 10],     # 0: identical to GT 0 -> positive (IoU 1)
    [0, 1, 10, 11],     # 1: IoU 9/11 = 0.82 with GT 0 -> positive (>= 0.7)
    [0, 5, 10, 15],     # 2: IoU 50/150 = 0.33 -> neutral
    [50, 50, 60, 60],   # 3: far from all -> negative
    [20, 20, 40, 40],   # 4: best anchor of GT 1 (IoU 0.25 < 0.7) -> positive anyway
    [80, 80, 90, 90],   # 5: far -> negative
], dtype=np.float64)
GT_BOXES = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.int32)


def test_rpn_targets_hand_made_labels_and_deltas():
    config = small_config()
    match, bbox = build_rpn_targets((64, 64, 3), ANCHORS, np.array([1, 1]), GT_BOXES, config)
    assert match.dtype == np.int32 and bbox.shape == (8, 4)
    np.testing.assert_array_equal(match, [1, 1, 0, -1, 1, -1])
    std = config.RPN_BBOX_STD_DEV
    expected = np.array([
        [0, 0, 0, 0],
        [0, -0.1, 0, 0],                       # centre x 6 -> 5 over width 10
        [-0.25, -0.25, np.log(0.5), np.log(0.5)],  # 20x20 anchor -> 10x10 GT in its top-left quarter
    ]) / std
    np.testing.assert_allclose(bbox[:3], expected, atol=1e-6)
    assert not bbox[3:].any()


def test_rpn_targets_subsampling_caps_positives_and_total():
    config = small_config()
    anchors = np.array([[0, i * 0.01, 10, 10 + i * 0.01] for i in range(10)] + [[50, 50, 60, 60]] * 20, float)
    match, bbox = build_rpn_targets((64, 64, 3), anchors, np.array([1]), np.array([[0, 0, 10, 10]]), config,
                                    rng=np.random.default_rng(0))
    assert (match == 1).sum() == 4 and (match == -1).sum() == 4
    positives = np.flatnonzero(match == 1)
    expected = box_refinement(anchors[positives], np.array([[0, 0, 10, 10.0]] * 4), np.float64) / config.RPN_BBOX_STD_DEV
    np.testing.assert_allclose(bbox[:4], expected, atol=1e-6)
    assert not bbox[4:].any()


def test_rpn_targets_zero_instances_and_crowd():
    config = small_config()
    match, bbox = build_rpn_targets((64, 64, 3), ANCHORS, np.zeros([0], np.int32), np.zeros([0, 4]), config,
                                    rng=np.random.default_rng(0))
    assert (match == 1).sum() == 0 and (match == -1).sum() == 6 and not bbox.any()
    # a crowd box over anchor 3 stops it from being negative and is never a target
    match, _ = build_rpn_targets((64, 64, 3), ANCHORS, np.array([1, -1]), np.array([[0, 0, 10, 10], [50, 50, 60, 60]]),
                                 config)
    assert match[3] == 0 and match[0] == 1 and match[5] == -1


def test_box_refinement_round_trip_in_float64():
    boxes = np.array([[10, 20, 30, 60.0]])
    gt = np.array([[12, 18, 40, 50.0]])
    d = box_refinement(boxes, gt, dtype=np.float64)
    assert d.dtype == np.float64 and box_refinement(boxes, gt).dtype == np.float32  # Matterport's default
    h, w = 20, 40
    cy, cx = 20 + d[0, 0] * h, 40 + d[0, 1] * w
    nh, nw = h * np.exp(d[0, 2]), w * np.exp(d[0, 3])
    np.testing.assert_allclose([cy - nh / 2, cx - nw / 2, cy + nh / 2, cx + nw / 2], gt[0])


# -------------------------------------------------------------------------------------------
# RPN targets vs Matterport


def _reference_anchors(config):
    from mrcnn.boxes import compute_backbone_shapes, generate_pyramid_anchors
    shapes = compute_backbone_shapes(config, config.IMAGE_SHAPE)
    return generate_pyramid_anchors(config.RPN_ANCHOR_SCALES, config.RPN_ANCHOR_RATIOS, shapes,
                                    config.BACKBONE_STRIDES, config.RPN_ANCHOR_STRIDE)


def test_rpn_targets_match_matterport(reference_dir):
    ref = np.load(reference_dir / "matterport_utils_reference.npz")
    config = make_config("coco")
    anchors = _reference_anchors(config)
    assert anchors.shape == (16368, 4)
    gt_boxes, gt_ids = ref["load_image_gt_bbox"], ref["load_image_gt_class_ids"]

    every_anchor = make_config("coco", RPN_TRAIN_ANCHORS_PER_IMAGE=10**6)
    match, bbox = build_rpn_targets(config.IMAGE_SHAPE, anchors, gt_ids, gt_boxes, every_anchor)
    np.testing.assert_array_equal(match, ref["rpn_targets_nosubsample_match"])
    positive_rows = ref["rpn_targets_nosubsample_bbox_positive_rows"]
    np.testing.assert_allclose(bbox[: len(positive_rows)], positive_rows, rtol=1e-5, atol=1e-5)

    assert config.RPN_TRAIN_ANCHORS_PER_IMAGE == 256
    match, bbox = build_rpn_targets(config.IMAGE_SHAPE, anchors, gt_ids, gt_boxes, config,
                                    rng=np.random.default_rng(1))
    counts = [(match == 1).sum(), (match == -1).sum(), (match == 0).sum()]
    np.testing.assert_array_equal(counts, ref["rpn_targets_default_match_counts"])
    np.testing.assert_allclose(bbox, ref["rpn_targets_default_bbox"], rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------
# Detection targets, hand-made

def _full_mask(h, w, box):
    m = np.zeros((h, w), bool)
    m[box[0]:box[2], box[1]:box[3]] = True
    return m


def test_detection_targets_hand_made():
    config = small_config(USE_MINI_MASK=False)
    tf.random.set_seed(0)
    gt_box = np.array([0.1, 0.1, 0.5, 0.5], np.float32)
    proposals = np.array([
        [0.1, 0.1, 0.5, 0.5],      # IoU 1 -> positive, zero deltas
        [0.1, 0.1, 0.5, 0.6],      # IoU 0.8 -> positive
        [0.6, 0.6, 0.9, 0.9],      # IoU 0 -> negative
        [0, 0, 0, 0],              # padding
    ], np.float32)
    mask = _full_mask(20, 20, (1, 1, 11, 11))[:, :, None]   # covers the box's samples (1.9 .. 9.5 of 19)
    rois, ids, deltas, masks = detection_targets_graph(
        tf.constant(proposals), tf.constant([1, 0], tf.int32), tf.constant([gt_box, [0, 0, 0, 0]]),
        tf.constant(np.concatenate([mask, np.zeros_like(mask)], axis=2)), config)
    rois, ids, deltas, masks = rois.numpy(), ids.numpy(), deltas.numpy(), masks.numpy()
    assert rois.shape == (6, 4) and ids.shape == (6,) and deltas.shape == (6, 4) and masks.shape == (6, 4, 4)
    # 2 positives (max 3) -> int(2 / 0.5) - 2 = 2 negatives, but only 1 exists; rest is padding
    np.testing.assert_array_equal(ids, [1, 1, 0, 0, 0, 0])
    assert sorted(map(tuple, rois[:2].round(3))) == sorted(map(tuple, proposals[:2].round(3)))
    np.testing.assert_allclose(rois[2], proposals[2])
    assert not rois[3:].any() and not deltas[2:].any() and not masks[2:].any()
    wide = int(np.argmax(rois[:2, 3]))
    expected = np.array([0, -0.05 / 0.5, 0, np.log(0.4 / 0.5)]) / config.BBOX_STD_DEV
    np.testing.assert_allclose(deltas[wide], expected, atol=1e-5)
    np.testing.assert_allclose(deltas[1 - wide], 0, atol=1e-6)
    assert masks[1 - wide].all()                      # ROI == GT box -> full mask
    assert masks[wide][:, :3].all() and not masks[wide][:, 3].any()  # last column (x 11.4) outside the lesion


def test_detection_targets_mini_mask_frame():
    config = small_config(USE_MINI_MASK=True)
    mini = np.zeros((8, 8, 1), bool)
    mini[:, :4] = True                                # left half of the GT box
    rois, ids, _, masks = detection_targets_graph(
        tf.constant([[0.1, 0.1, 0.5, 0.5]]), tf.constant([1]), tf.constant([[0.1, 0.1, 0.5, 0.5]]),
        tf.constant(mini), config)
    assert ids.numpy()[0] == 1
    np.testing.assert_array_equal(masks.numpy()[0], np.repeat([[1, 1, 0, 0]], 4, axis=0))


def test_detection_targets_no_gt_gives_only_padding():
    config = small_config()
    layer = DetectionTargetLayer(config, name="proposal_targets")
    proposals = tf.constant(np.random.default_rng(0).uniform(0, 0.5, (1, 10, 4)).astype(np.float32) + [0, 0, 0.5, 0.5])
    rois, ids, deltas, masks = layer([proposals, tf.zeros([1, 3], tf.int32), tf.zeros([1, 3, 4]),
                                      tf.zeros([1, 8, 8, 3], tf.bool)])
    assert rois.shape == (1, 6, 4) and masks.shape == (1, 6, 4, 4)
    assert not rois.numpy().any() and not ids.numpy().any() and not deltas.numpy().any()


def test_detection_targets_append_gt_boxes_to_the_proposals():
    """PROPOSALS_APPEND_GT: proposals that all miss the lesion give no positive ROI; with the key the
    GT box itself is the one positive (zero deltas, the GT mask), the crowd box is not appended."""
    proposals = tf.constant([[0.6, 0.6, 0.9, 0.9], [0.0, 0.6, 0.3, 0.9], [0, 0, 0, 0]], tf.float32)
    gt_boxes = tf.constant([[0.1, 0.1, 0.5, 0.5], [0.55, 0.0, 0.95, 0.4], [0, 0, 0, 0]], tf.float32)
    class_ids = tf.constant([1, -1, 0], tf.int32)           # the second box is a crowd
    gt_masks = tf.concat([tf.ones([20, 20, 1], tf.bool), tf.zeros([20, 20, 2], tf.bool)], axis=2)
    plain = detection_targets_graph(proposals, class_ids, gt_boxes, gt_masks, small_config(USE_MINI_MASK=False))
    assert not plain[1].numpy().any() and not plain[0].numpy().any()   # no positive -> no negative sampled
    rois, ids, deltas, masks = (t.numpy() for t in detection_targets_graph(
        proposals, class_ids, gt_boxes, gt_masks, small_config(USE_MINI_MASK=False, PROPOSALS_APPEND_GT=True)))
    np.testing.assert_array_equal(ids, [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(rois[0], [0.1, 0.1, 0.5, 0.5])
    np.testing.assert_allclose(deltas[0], 0, atol=1e-6)
    assert masks[0].all() and not masks[1:].any()
    # int(1 / 0.5) - 1 = 1 negative: one of the two real proposals, never the crowd box
    assert any(np.allclose(rois[1], p) for p in proposals.numpy()[:2]) and not rois[2:].any()


def test_detection_targets_positive_cap_and_ratio():
    config = small_config(USE_MINI_MASK=False)
    proposals = np.array([[0.1, 0.1, 0.5, 0.5 + 0.01 * i] for i in range(5)] + [[0.6, 0.6, 0.9, 0.9 - 0.01 * i]
                                                                              for i in range(5)], np.float32)
    rois, ids, _, _ = detection_targets_graph(
        tf.constant(proposals), tf.constant([1]), tf.constant([[0.1, 0.1, 0.5, 0.5]]),
        tf.ones([20, 20, 1], tf.bool), config)
    np.testing.assert_array_equal(ids.numpy(), [1, 1, 1, 0, 0, 0])
    assert rois.numpy()[:3, 0].tolist() == pytest.approx([0.1] * 3)
    assert rois.numpy()[3:, 0].tolist() == pytest.approx([0.6] * 3)
