"""Detection matching and VOC-style average precision (Matterport semantics).

Boxes are (y1, x1, y2, x2) pixels; masks are [H, W, N]. Matching uses mask IoU; all-zero box
rows (padding) are dropped first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrcnn.boxes import compute_overlaps, compute_overlaps_masks, trim_zeros


def compute_matches(gt_boxes: np.ndarray, gt_class_ids: np.ndarray, gt_masks: np.ndarray,
                    pred_boxes: np.ndarray, pred_class_ids: np.ndarray, pred_scores: np.ndarray,
                    pred_masks: np.ndarray, iou_threshold: float = 0.5, score_threshold: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy matching of score-sorted predictions to GT by mask IoU.

    Returns (gt_match [G], pred_match [P], overlaps [P, G]) where gt_match holds the matched
    prediction index (in score order) or -1, pred_match the matched GT index or -1, and overlaps
    the mask IoUs of the score-sorted predictions. Each prediction takes the highest-IoU unmatched
    GT of its class with IoU >= iou_threshold; candidates with IoU < score_threshold are skipped
    (Matterport compares that threshold with IoUs, not scores).
    """
    gt_boxes = trim_zeros(gt_boxes)
    gt_masks = gt_masks[..., :gt_boxes.shape[0]]
    pred_boxes = trim_zeros(pred_boxes)
    pred_scores = pred_scores[:pred_boxes.shape[0]]
    order = np.argsort(pred_scores)[::-1]
    pred_class_ids = pred_class_ids[order]
    overlaps = compute_overlaps_masks(pred_masks[..., order], gt_masks)

    gt_match = -1 * np.ones([gt_boxes.shape[0]])
    pred_match = -1 * np.ones([pred_boxes.shape[0]])
    for i in range(len(order)):
        for j in _candidates(overlaps[i], score_threshold):
            if gt_match[j] > -1:
                continue
            if overlaps[i, j] < iou_threshold:
                break
            if pred_class_ids[i] == gt_class_ids[j]:
                gt_match[j] = i
                pred_match[i] = j
                break
    return gt_match, pred_match, overlaps


def _candidates(ious: np.ndarray, score_threshold: float) -> np.ndarray:
    """GT indices by descending IoU, cut at the first IoU below score_threshold."""
    ranked = np.argsort(ious)[::-1]
    low = np.where(ious[ranked] < score_threshold)[0]
    return ranked[:low[0]] if low.size > 0 else ranked


def compute_ap(gt_boxes: np.ndarray, gt_class_ids: np.ndarray, gt_masks: np.ndarray,
               pred_boxes: np.ndarray, pred_class_ids: np.ndarray, pred_scores: np.ndarray,
               pred_masks: np.ndarray, iou_threshold: float = 0.5
               ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """VOC all-point AP at one mask-IoU threshold -> (mAP, precisions [P+2], recalls [P+2], overlaps)."""
    gt_match, pred_match, overlaps = compute_matches(
        gt_boxes, gt_class_ids, gt_masks, pred_boxes, pred_class_ids, pred_scores, pred_masks, iou_threshold)
    hits = np.cumsum(pred_match > -1)
    precisions = hits / (np.arange(len(pred_match)) + 1)
    recalls = hits.astype(np.float32) / len(gt_match)
    precisions = np.concatenate([[0], precisions, [0]])
    recalls = np.concatenate([[0], recalls, [1]])
    precisions = np.maximum.accumulate(precisions[::-1])[::-1]  # monotone from the right
    steps = np.where(recalls[:-1] != recalls[1:])[0] + 1
    m_ap = np.sum((recalls[steps] - recalls[steps - 1]) * precisions[steps])
    return m_ap, precisions, recalls, overlaps


def compute_ap_range(gt_box: np.ndarray, gt_class_id: np.ndarray, gt_mask: np.ndarray,
                     pred_box: np.ndarray, pred_class_id: np.ndarray, pred_score: np.ndarray,
                     pred_mask: np.ndarray, iou_thresholds: Sequence[float] | None = None,
                     verbose: int = 1) -> float:
    """Mean of compute_ap over iou_thresholds (default 0.50:0.05:0.95)."""
    if iou_thresholds is None:
        iou_thresholds = np.arange(0.5, 1.0, 0.05)
    aps = []
    for t in iou_thresholds:
        ap = compute_ap(gt_box, gt_class_id, gt_mask, pred_box, pred_class_id, pred_score, pred_mask,
                        iou_threshold=t)[0]
        if verbose:
            print(f"AP @{t:.2f}:\t {ap:.3f}")
        aps.append(ap)
    mean_ap = np.array(aps).mean()
    if verbose:
        print(f"AP @{iou_thresholds[0]:.2f}-{iou_thresholds[-1]:.2f}:\t {mean_ap:.3f}")
    return mean_ap


def compute_recall(pred_boxes: np.ndarray, gt_boxes: np.ndarray, iou: float) -> tuple[float, np.ndarray]:
    """Box recall: fraction of GT boxes that some prediction overlaps with IoU >= iou.

    Each prediction votes for its best-IoU GT. Returns (recall, positive_ids) where positive_ids
    are the predictions whose best IoU reaches the threshold.
    """
    overlaps = compute_overlaps(pred_boxes, gt_boxes)
    best = np.max(overlaps, axis=1)
    best_gt = np.argmax(overlaps, axis=1)
    positive_ids = np.where(best >= iou)[0]
    recall = len(set(best_gt[positive_ids])) / gt_boxes.shape[0]
    return recall, positive_ids
