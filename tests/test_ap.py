"""mrcnn.ap: matching and VOC AP on a hand-computed case and on the Matterport reference detections."""

from __future__ import annotations

import numpy as np
import pytest

from mrcnn import ap as A


def _masks(shape, boxes):
    m = np.zeros(shape + (len(boxes),), bool)
    for i, (y1, x1, y2, x2) in enumerate(boxes):
        m[y1:y2, x1:x2, i] = True
    return m


def _hand_case():
    gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]])  # last row is padding
    gt_masks = _masks((40, 40), [(0, 0, 10, 10), (20, 20, 30, 30), (0, 0, 0, 0)])
    gt_ids = np.array([1, 1, 0])
    # scores out of order on purpose: sorted -> A (0.9, hits GT0), B (0.8, miss), C (0.7, hits GT1)
    pred_boxes = np.array([[20, 20, 30, 30], [0, 0, 10, 10], [30, 0, 40, 10]])
    pred_masks = _masks((40, 40), [(20, 20, 30, 30), (0, 0, 10, 10), (30, 0, 40, 10)])
    pred_ids = np.array([1, 1, 1])
    pred_scores = np.array([0.7, 0.9, 0.8])
    return gt_boxes, gt_ids, gt_masks, pred_boxes, pred_ids, pred_scores, pred_masks


def test_compute_matches_hand():
    gt_match, pred_match, overlaps = A.compute_matches(*_hand_case())
    np.testing.assert_array_equal(gt_match, [0, 2])     # GT0 <- sorted pred 0, GT1 <- sorted pred 2
    np.testing.assert_array_equal(pred_match, [0, -1, 1])
    np.testing.assert_allclose(overlaps, [[1, 0], [0, 0], [0, 1]])


def test_compute_matches_class_and_threshold():
    gt_boxes, gt_ids, gt_masks, pred_boxes, pred_ids, pred_scores, pred_masks = _hand_case()
    _, pred_match, _ = A.compute_matches(gt_boxes, gt_ids, gt_masks, pred_boxes, np.array([2, 2, 2]),
                                         pred_scores, pred_masks)
    assert (pred_match == -1).all()  # wrong class never matches
    shifted = _masks((40, 40), [(20, 20, 30, 30), (0, 5, 10, 15), (30, 0, 40, 10)])  # IoU 50/150 with GT0
    _, pred_match, _ = A.compute_matches(gt_boxes, gt_ids, gt_masks, pred_boxes, pred_ids, pred_scores, shifted,
                                         iou_threshold=0.5)
    np.testing.assert_array_equal(pred_match, [-1, -1, 1])
    _, pred_match, _ = A.compute_matches(gt_boxes, gt_ids, gt_masks, pred_boxes, pred_ids, pred_scores, shifted,
                                         iou_threshold=0.3)
    np.testing.assert_array_equal(pred_match, [0, -1, 1])


def test_compute_ap_hand():
    ap, precisions, recalls, _ = A.compute_ap(*_hand_case())
    # precisions 1, 1/2, 2/3 at recalls 1/2, 1/2, 1 -> padded & made monotone from the right
    np.testing.assert_allclose(precisions, [1, 1, 2 / 3, 2 / 3, 0])
    np.testing.assert_allclose(recalls, [0, 0.5, 0.5, 1, 1])
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_compute_ap_range_and_recall_hand(capsys):
    case = _hand_case()
    assert A.compute_ap_range(*case, verbose=0) == pytest.approx(0.5 + 1 / 3)
    A.compute_ap_range(*case, iou_thresholds=[0.5, 0.75], verbose=1)
    assert "AP @0.50-0.75" in capsys.readouterr().out
    recall, positive = A.compute_recall(case[3].astype(float), case[0][:2].astype(float), 0.5)
    assert recall == 1.0
    np.testing.assert_array_equal(positive, [0, 1])


@pytest.fixture(scope="module")
def ref_case(reference_dir):
    ref = np.load(reference_dir / "matterport_utils_reference.npz")
    out = np.load(reference_dir / "matterport_reference_outputs.npz")
    # The reference scored detect() output against the two GT instances with class id 77
    # (the only class id that reproduces ap50, ap10 and their curves).
    gt = (ref["ap_gt_boxes"], np.array([77, 77], np.int32), ref["gt_masks_original"])
    pred = (out["detect_rois"], out["detect_class_ids"], out["detect_scores"], out["detect_masks"])
    return ref, gt, pred


def test_reference_ap(ref_case):
    ref, gt, pred = ref_case
    for key, t in (("ap50", 0.5), ("ap10", 0.1)):
        ap, precisions, recalls, overlaps = A.compute_ap(*gt, *pred, iou_threshold=t)
        assert ap == pytest.approx(float(ref[key]), abs=1e-12)
        np.testing.assert_array_equal(precisions, ref[f"{key}_precisions"])
        np.testing.assert_array_equal(recalls, ref[f"{key}_recalls"])
    np.testing.assert_array_equal(A.compute_ap(*gt, *pred)[3], ref["ap50_overlaps"])


def test_reference_recall(ref_case):
    ref, gt, pred = ref_case
    recall, positive = A.compute_recall(pred[0], gt[0], 0.1)
    assert recall == float(ref["recall_iou0.1"])
    np.testing.assert_array_equal(positive, ref["recall_iou0.1_positive_ids"])
