"""Evaluating lesion predictions for the CLI: ISIC scores per image, instance mAP, table, grid.

Pixel metrics come from :mod:`lesionkit.metrics` (official ISIC 2018 semantics); this module adds
what an evaluation *run* needs around them:

* :func:`score_pairs` scores ``<pred_dir>/<id>_segmentation.png`` against an explicit
  ``id -> truth mask`` mapping (e.g. only the validation split of a dataset folder);
* :class:`ApAccumulator` collects per-image mask AP at IoU 0.5 and 0.5:0.95 while a model
  predicts, so masks never pile up in memory;
* :func:`summary_lines` formats the headline numbers; :func:`grid_rows` picks images for the
  picture grid, worst Jaccard first if asked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lesionkit import metrics

HEADLINE = ("n_images", "threshold_jaccard", "jaccard", "dice", "sensitivity", "specificity", "accuracy",
            "map50", "map")


def score_pairs(pred_dir: Path, truth: dict[str, Path]) -> tuple[list[dict], dict, list[str]]:
    """(rows, summary, problems) for each ``id`` in ``truth`` with a prediction in ``pred_dir``
    (:func:`lesionkit.metrics.score_pair`: colour masks are scored and listed in the problems)."""
    rows, problems = [], []
    for image_id, truth_path in sorted(truth.items()):
        row, pair_problems = metrics.score_pair(image_id, Path(truth_path),
                                                Path(pred_dir) / f"{image_id}{metrics.PREDICTION_SUFFIX}")
        problems += pair_problems
        if row is not None:
            rows.append(row)
    return rows, metrics.summarize(rows), problems


class ApAccumulator:
    """Per-image mask AP (IoU 0.5 and mean over 0.5:0.95), averaged over images with a lesion."""

    def __init__(self) -> None:
        self.ap50: list[float] = []
        self.ap: list[float] = []

    def add(self, gt_mask: np.ndarray, pred_masks: np.ndarray, scores: np.ndarray) -> None:
        """``gt_mask`` bool [H, W] (one lesion instance), ``pred_masks`` [H, W, N], ``scores`` [N]."""
        gt = np.asarray(gt_mask, dtype=bool)[..., None]
        first = metrics.image_ap(gt, pred_masks, scores, 0.5)
        if first is None:  # no lesion in the ground truth: AP undefined, image not counted
            return
        self.ap50.append(first)
        self.ap.append(float(np.mean([metrics.image_ap(gt, pred_masks, scores, t)
                                      for t in metrics.COCO_IOU_THRESHOLDS])))

    def summary(self) -> dict[str, float | None]:
        """``{"map50": ..., "map": ...}`` (None when no image had a lesion)."""
        return {"map50": float(np.mean(self.ap50)) if self.ap50 else None,
                "map": float(np.mean(self.ap)) if self.ap else None}


def summary_lines(columns: dict[str, dict[str, Any]]) -> list[str]:
    """A small text table: one row per headline metric, one column per summary (e.g. plain, tta)."""
    names = list(columns)
    lines = ["  " + f"{'metric':18}" + "".join(f"{n:>12}" for n in names)]
    for key in HEADLINE:
        values = [columns[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{_fmt(v):>12}" for v in values)
        lines.append(f"  {key:18}{cells}")
    return lines


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def grid_rows(rows: list[dict], images: dict[str, Path], truth: dict[str, Path], pred_dir: Path,
              count: int, worst_first: bool) -> list[dict]:
    """Up to ``count`` grid entries (image, truth, pred, title), worst Jaccard first if asked."""
    from mrcnn.imaging import read_image

    chosen = [r for r in rows if r["image_id"] in images]
    if worst_first:
        chosen = sorted(chosen, key=lambda r: (r["jaccard"], r["image_id"]))
    entries = []
    for row in chosen[:count]:
        image_id = row["image_id"]
        entries.append({
            "image": read_image(images[image_id]),
            "truth": metrics.load_mask(truth[image_id]),
            "pred": metrics.load_mask(Path(pred_dir) / f"{image_id}{metrics.PREDICTION_SUFFIX}"),
            "title": f"{image_id}  J={row['jaccard']:.3f}",
        })
    return entries
