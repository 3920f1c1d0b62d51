"""ISIC 2018 Task 1 segmentation metrics, folder scoring, and instance-level mask AP.

Per-image metrics follow the official scorer (``isic-challenge-scoring``) exactly:

* a mask file pixel counts as lesion when its grey value is ``> 128`` (> 0 in a 0/1 label mask; the
  one rule of :func:`mrcnn.imaging.binarize_mask`, which training and prediction use too); a colour
  mask is lesion where any channel is > 128 and is reported in the problems (the official scorer
  accepts single-channel masks only);
* the metrics come from the confusion counts TP, FP, FN, TN of the whole image;
* ``sensitivity`` is 1.0 when the truth is empty (TP + FN == 0), ``specificity`` is 1.0 when
  the truth covers the image (TN + FP == 0), ``jaccard`` and ``dice`` are 1.0 when truth and
  prediction are both empty (TP + FP + FN == 0); a prediction that is empty while the truth is
  not scores 0 on all three;
* ``threshold_jaccard`` is the Jaccard index, or 0 when it is below 0.65;
* the summary is the plain (macro) mean over images.

Instance AP (``map50``, ``map``) averages Matterport's per-image VOC AP (``mrcnn.ap.compute_ap``)
over images that have at least one ground-truth instance.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrcnn.ap import compute_ap
from mrcnn.boxes import extract_bboxes
from mrcnn.fileio import json_safe, write_json_atomic, write_text_atomic
from mrcnn.imaging import MASK_THRESHOLD_8BIT, binarize_mask, read_mask_and_colour

#: Metric names, in the order the CSV and the summary use (official scorer's names).
METRIC_NAMES = ("threshold_jaccard", "jaccard", "dice", "sensitivity", "specificity", "accuracy")
JACCARD_THRESHOLD = 0.65
PREDICTION_SUFFIX = "_segmentation.png"
MASK_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg")
_TRUTH_STEM_TAIL = re.compile(r"_(segmentation|lesion|mask)$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Per-image metrics
# --------------------------------------------------------------------------------------------

def confusion(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """Confusion counts (TP, FP, FN, TN) of two bool masks of the same shape [H, W]."""
    truth, pred = _as_binary(truth), _as_binary(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"mask shapes differ: truth {truth.shape}, prediction {pred.shape}")
    tp = int(np.count_nonzero(truth & pred))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    tn = truth.size - tp - fp - fn
    return tp, fp, fn, tn


def _as_binary(mask: np.ndarray) -> np.ndarray:
    """Bool mask: bool arrays as they are, integer arrays by :func:`mrcnn.imaging.binarize_mask`
    (0..255 images: ``value > 128``; 0/1 arrays: ``value > 0``)."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return binarize_mask(mask)
    raise ValueError(f"masks must be bool or integer 0..255 images, got dtype {mask.dtype}")


def jaccard(truth: np.ndarray, pred: np.ndarray) -> float:
    """Jaccard index TP / (TP + FP + FN); 1.0 when both masks are empty."""
    tp, fp, fn, _ = confusion(truth, pred)
    return _jaccard(tp, fp, fn)


def threshold_jaccard(truth: np.ndarray, pred: np.ndarray, threshold: float = JACCARD_THRESHOLD) -> float:
    """Jaccard index, or 0.0 when it is below ``threshold`` (ISIC 2018's ranking metric)."""
    return _threshold(jaccard(truth, pred), threshold)


def dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice 2TP / (2TP + FP + FN); 1.0 when both masks are empty."""
    tp, fp, fn, _ = confusion(truth, pred)
    return _dice(tp, fp, fn)


def sensitivity(truth: np.ndarray, pred: np.ndarray) -> float:
    """TP / (TP + FN); 1.0 when the truth is empty."""
    tp, _, fn, _ = confusion(truth, pred)
    return _ratio(tp, tp + fn)


def specificity(truth: np.ndarray, pred: np.ndarray) -> float:
    """TN / (TN + FP); 1.0 when the truth covers the whole image."""
    _, fp, _, tn = confusion(truth, pred)
    return _ratio(tn, tn + fp)


def accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """(TP + TN) / pixels; NaN for a zero-size image (as the official scorer)."""
    tp, fp, fn, tn = confusion(truth, pred)
    return _accuracy(tp, fp, fn, tn)


def _ratio(num: int, den: int) -> float:
    return 1.0 if den == 0 else num / den


def _jaccard(tp: int, fp: int, fn: int) -> float:
    return _ratio(tp, tp + fp + fn)


def _dice(tp: int, fp: int, fn: int) -> float:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _threshold(value: float, threshold: float) -> float:
    return value if value >= threshold else 0.0


def _accuracy(tp: int, fp: int, fn: int, tn: int) -> float:
    total = tp + fp + fn + tn
    return math.nan if total == 0 else (tp + tn) / total


def score_mask(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All six ISIC metrics of one prediction [H, W] against its truth [H, W] (bool, or uint8 > 128)."""
    tp, fp, fn, tn = confusion(truth, pred)
    j = _jaccard(tp, fp, fn)
    return {
        "threshold_jaccard": _threshold(j, JACCARD_THRESHOLD),
        "jaccard": j,
        "dice": _dice(tp, fp, fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _accuracy(tp, fp, fn, tn),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Macro means of the six metrics over per-image rows, plus ``n_images`` (None means when empty).

    NaN values (zero-size images) are left out of a mean, as pandas does in the official scorer.
    """
    summary: dict[str, Any] = {}
    for name in METRIC_NAMES:
        values = [float(r[name]) for r in rows if not math.isnan(float(r[name]))]
        summary[name] = float(np.mean(values)) if values else None
    summary["n_images"] = len(rows)
    return summary


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------

def colour_mask_problem(image_id: str, which: str, mode: str) -> str:
    """The problem line of a colour mask (``which``: "truth mask" or "prediction")."""
    return (f"{image_id}: {which} is colour ({mode}); read as lesion where any channel > {MASK_THRESHOLD_8BIT};"
            " the official scorer accepts only single-channel masks")


def truth_id(path: Path) -> str:
    """Image id of a ground-truth file: the stem without ``_segmentation``/``_lesion``/``_mask``."""
    return _TRUTH_STEM_TAIL.sub("", path.stem)


def _mask_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MASK_SUFFIXES)


def score_folders(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike
                  ) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Score ``pred_dir/<id>_segmentation.png`` against every truth mask in ``truth_dir``.

    Truth files may have any stem (``ISIC_0000000_segmentation.png``, ``IMD002_lesion.bmp``,
    ``IMD002.png``); the id is the stem without a ``_segmentation``/``_lesion``/``_mask`` tail.
    Returns ``(rows, summary, problems)``: rows ``{"image_id", <six metrics>}`` sorted by id,
    the :func:`summarize` of the rows, and one ``"<id>: <what is wrong>"`` line per missing or
    unreadable file, size mismatch, or prediction without truth (those images are not scored), and
    per colour mask (scored, see :func:`score_pair`).
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    if not truth_dir.is_dir():
        return rows, summarize(rows), [f"truth folder not found: {truth_dir}"]
    if not pred_dir.is_dir():
        return rows, summarize(rows), [f"prediction folder not found: {pred_dir}"]
    truth_ids = set()
    for truth_file in _mask_files(truth_dir):
        image_id = truth_id(truth_file)
        truth_ids.add(image_id)
        row, pair_problems = score_pair(image_id, truth_file, pred_dir / f"{image_id}{PREDICTION_SUFFIX}")
        problems += pair_problems
        if row is not None:
            rows.append(row)
    for pred_file in sorted(pred_dir.glob(f"*{PREDICTION_SUFFIX}")):
        image_id = pred_file.name[: -len(PREDICTION_SUFFIX)]
        if image_id not in truth_ids:
            problems.append(f"{image_id}: prediction {pred_file.name} has no ground truth")
    rows.sort(key=lambda r: r["image_id"])
    return rows, summarize(rows), problems


def score_pair(image_id: str, truth_file: Path, pred_file: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(row ``{"image_id", <six metrics>}`` or None when the pair cannot be scored, problem lines).

    Not scored: a missing or unreadable file, or sizes that differ. A colour mask is scored (lesion
    where any channel > 128) and named in a problem line.
    """
    if not pred_file.is_file():
        return None, [f"{image_id}: missing prediction {pred_file.name}"]
    problems = []
    masks = []
    for which, path in (("truth mask", truth_file), ("prediction", pred_file)):
        try:
            mask, colour = read_mask_and_colour(path)
        except (OSError, ValueError) as err:
            what = "ground truth" if which == "truth mask" else which
            return None, [f"{image_id}: unreadable {what} {path.name} ({' '.join(str(err).split())})"]
        if colour:
            problems.append(colour_mask_problem(image_id, which, colour))
        masks.append(mask)
    truth, pred = masks
    if truth.shape != pred.shape:
        return None, [f"{image_id}: prediction is {pred.shape[0]}x{pred.shape[1]}, truth is "
                      f"{truth.shape[0]}x{truth.shape[1]}"]
    return {"image_id": image_id, **score_mask(truth, pred)}, problems


def score_pairs(pred_dir: Path, truth: dict[str, Path]) -> tuple[list[dict], dict, list[str]]:
    """(rows, summary, problems) for each ``id`` in ``truth`` with a prediction in ``pred_dir``
    (:func:`lesionkit.metrics.score_pair`: colour masks are scored and listed in the problems)."""
    rows, problems = [], []
    for image_id, truth_path in sorted(truth.items()):
        row, pair_problems = score_pair(image_id, Path(truth_path),
                                                Path(pred_dir) / f"{image_id}{PREDICTION_SUFFIX}")
        problems += pair_problems
        if row is not None:
            rows.append(row)
    return rows, summarize(rows), problems


def write_scores(rows: Sequence[dict[str, Any]], summary: dict[str, Any], out_dir: str | os.PathLike,
                 problems: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/scores.csv`` (one row per image) and ``out_dir/summary.json``, atomically.

    The CSV's columns: ``image_id``, the six metrics (left out when no row has them, e.g. only
    diagnoses were scored), then any other row keys in order of appearance (the diagnosis columns).
    ``problems``, when given, are stored in summary.json under ``"problems"``. Returns both paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    with_masks = not rows or any(METRIC_NAMES[0] in r for r in rows)
    known = ["image_id", *(METRIC_NAMES if with_masks else ())]
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in known and k not in METRIC_NAMES]
    writer = csv.DictWriter(buffer, fieldnames=known + extra, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(json_safe(row))
    csv_path, json_path = out_dir / "scores.csv", out_dir / "summary.json"
    write_text_atomic(csv_path, buffer.getvalue())
    payload = dict(summary)
    if problems is not None:
        payload["problems"] = list(problems)
    write_json_atomic(json_path, payload)
    return csv_path, json_path


# --------------------------------------------------------------------------------------------
# Instance-level AP
# --------------------------------------------------------------------------------------------

#: COCO-style IoU thresholds 0.50, 0.55, ..., 0.95.
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def image_ap(gt_masks: np.ndarray, pred_masks: np.ndarray, scores: np.ndarray,
             iou_threshold: float = 0.5) -> float | None:
    """Matterport VOC AP of one image's single-class instance masks; None when there is no GT.

    gt_masks bool [H, W, G], pred_masks bool [H, W, P], scores [P] (a 2-D mask counts as one
    instance). Empty predicted masks are dropped; an image with GT but no predictions scores 0.
    """
    gt_masks, pred_masks = _instances(gt_masks), _instances(pred_masks)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if scores.shape[0] != pred_masks.shape[-1]:
        raise ValueError(f"{pred_masks.shape[-1]} predicted masks but {scores.shape[0]} scores")
    gt_masks = gt_masks[..., gt_masks.any(axis=(0, 1))]
    if gt_masks.shape[-1] == 0:
        return None
    keep = pred_masks.any(axis=(0, 1))
    pred_masks, scores = pred_masks[..., keep], scores[keep]
    gt_boxes, pred_boxes = extract_bboxes(gt_masks), extract_bboxes(pred_masks)
    ones_gt = np.ones(gt_masks.shape[-1], np.int32)
    ones_pred = np.ones(pred_masks.shape[-1], np.int32)
    ap = compute_ap(gt_boxes, ones_gt, gt_masks, pred_boxes, ones_pred, scores, pred_masks,
                    iou_threshold=iou_threshold)[0]
    return float(ap)


def _instances(masks: np.ndarray) -> np.ndarray:
    """Bool instance masks [H, W, N]; a single mask [H, W] becomes [H, W, 1]."""
    masks = np.asarray(masks).astype(bool)
    return masks[..., None] if masks.ndim == 2 else masks


def mean_ap(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
            iou_thresholds: Sequence[float] = (0.5,)) -> float:
    """Mean over images (with GT) of the per-image AP averaged over ``iou_thresholds``.

    ``items`` yields ``(gt_masks [H, W, G], pred_masks [H, W, P], scores [P])`` per image.
    Returns NaN when no image has a ground-truth instance.
    """
    per_image = []
    for gt_masks, pred_masks, scores in items:
        aps = [image_ap(gt_masks, pred_masks, scores, t) for t in iou_thresholds]
        if aps[0] is not None:
            per_image.append(float(np.mean(aps)))
    return float(np.mean(per_image)) if per_image else math.nan


def map50(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """Mask AP at IoU 0.5, averaged over images (see :func:`mean_ap`)."""
    return mean_ap(items, (0.5,))


def map(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:  # shadows builtin on purpose
    """COCO-style mask AP averaged over IoU 0.50:0.05:0.95 and over images (see :func:`mean_ap`)."""
    return mean_ap(items, COCO_IOU_THRESHOLDS)


class ApAccumulator:
    """Per-image mask AP (IoU 0.5 and mean over 0.5:0.95), averaged over images with a lesion."""

    def __init__(self) -> None:
        self.ap50: list[float] = []
        self.ap: list[float] = []

    def add(self, gt_mask: np.ndarray, pred_masks: np.ndarray, scores: np.ndarray) -> None:
        """``gt_mask`` bool [H, W] (one lesion instance), ``pred_masks`` [H, W, N], ``scores`` [N]."""
        gt = np.asarray(gt_mask, dtype=bool)[..., None]
        first = image_ap(gt, pred_masks, scores, 0.5)
        if first is None:  # no lesion in the ground truth: AP undefined, image not counted
            return
        self.ap50.append(first)
        self.ap.append(float(np.mean([image_ap(gt, pred_masks, scores, t)
                                      for t in COCO_IOU_THRESHOLDS])))

    def summary(self) -> dict[str, float | None]:
        """``{"map50": ..., "map": ...}`` (None when no image had a lesion)."""
        return {"map50": float(np.mean(self.ap50)) if self.ap50 else None,
                "map": float(np.mean(self.ap)) if self.ap else None}
