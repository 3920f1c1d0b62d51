"""Tests for lesionkit.metrics: hand-computed cases, the official ISIC scorer, folders, AP."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from lesionkit import metrics
from lesionkit.synthetic import make_lesion_image
from mrcnn.imaging import read_mask


def _m(rows):
    return np.array(rows, dtype=bool)


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------

TRUTH = _m([[1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0]])
PRED = _m([[0, 1, 1, 0],
           [0, 1, 1, 0],
           [0, 0, 0, 0]])  # TP 2, FP 2, FN 2, TN 6


def test_confusion_counts():
    assert metrics.confusion(TRUTH, PRED) == (2, 2, 2, 6)


def test_partial_overlap_by_hand():
    s = metrics.score_mask(TRUTH, PRED)
    assert s["jaccard"] == pytest.approx(2 / 6)
    assert s["threshold_jaccard"] == 0.0
    assert s["dice"] == pytest.approx(4 / 8)
    assert s["sensitivity"] == pytest.approx(2 / 4)
    assert s["specificity"] == pytest.approx(6 / 8)
    assert s["accuracy"] == pytest.approx(8 / 12)
    assert metrics.jaccard(TRUTH, PRED) == pytest.approx(1 / 3)
    assert metrics.dice(TRUTH, PRED) == pytest.approx(0.5)
    assert metrics.sensitivity(TRUTH, PRED) == pytest.approx(0.5)
    assert metrics.specificity(TRUTH, PRED) == pytest.approx(0.75)
    assert metrics.accuracy(TRUTH, PRED) == pytest.approx(2 / 3)


def test_threshold_jaccard_boundary():
    truth = np.zeros((1, 100), bool)
    truth[0, :100] = True
    pred = np.zeros((1, 100), bool)
    pred[0, :65] = True  # J = 0.65 exactly: kept
    assert metrics.threshold_jaccard(truth, pred) == pytest.approx(0.65)
    pred[0, 64] = False  # J = 0.64: zeroed
    assert metrics.threshold_jaccard(truth, pred) == 0.0
    assert metrics.jaccard(truth, pred) == pytest.approx(0.64)


def test_edge_cases_official_semantics():
    empty, full = np.zeros((3, 4), bool), np.ones((3, 4), bool)
    both_empty = metrics.score_mask(empty, empty)
    assert both_empty == {"threshold_jaccard": 1.0, "jaccard": 1.0, "dice": 1.0,
                          "sensitivity": 1.0, "specificity": 1.0, "accuracy": 1.0}
    pred_empty = metrics.score_mask(TRUTH, empty)
    assert pred_empty["jaccard"] == 0.0 and pred_empty["dice"] == 0.0 and pred_empty["sensitivity"] == 0.0
    assert pred_empty["specificity"] == 1.0 and pred_empty["accuracy"] == pytest.approx(8 / 12)
    truth_empty = metrics.score_mask(empty, PRED)
    assert truth_empty["sensitivity"] == 1.0 and truth_empty["jaccard"] == 0.0
    assert truth_empty["specificity"] == pytest.approx(8 / 12)
    both_full = metrics.score_mask(full, full)
    assert both_full["specificity"] == 1.0 and both_full["jaccard"] == 1.0
    assert math.isnan(metrics.accuracy(np.zeros((0, 0), bool), np.zeros((0, 0), bool)))


def test_uint8_masks_use_128_threshold_and_bad_input():
    truth = np.array([[0, 128, 129, 255]], np.uint8)
    pred = np.array([[255, 255, 255, 255]], np.uint8)
    assert metrics.confusion(truth, pred) == (2, 2, 0, 0)
    with pytest.raises(ValueError):
        metrics.score_mask(truth.astype(float), pred)
    with pytest.raises(ValueError):
        metrics.score_mask(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_summarize_means_and_count():
    rows = [metrics.score_mask(TRUTH, PRED), metrics.score_mask(TRUTH, TRUTH)]
    s = metrics.summarize(rows)
    assert s["n_images"] == 2
    assert s["jaccard"] == pytest.approx((1 / 3 + 1) / 2)
    assert s["threshold_jaccard"] == pytest.approx(0.5)
    assert list(s) == [*metrics.METRIC_NAMES, "n_images"]
    empty = metrics.summarize([])
    assert empty["n_images"] == 0 and empty["jaccard"] is None


# --------------------------------------------------------------------------------------------
# Against the official scorer
# --------------------------------------------------------------------------------------------

def _cases():
    """(truth, prediction) bool pairs: perfect, empty, partial, shifted, full, noisy, empty truth."""
    cases = []
    kernel = np.ones((5, 5), np.uint8)
    for i in range(6):
        _, masks = make_lesion_image(np.random.default_rng([21, i]), 64, 80)
        truth = masks.any(axis=2)
        t8 = truth.astype(np.uint8)
        rng = np.random.default_rng(i)
        cases += [
            (truth, truth.copy()),
            (truth, np.zeros_like(truth)),
            (truth, cv2.erode(t8, kernel, iterations=i + 1).astype(bool)),
            (truth, cv2.dilate(t8, kernel, iterations=i + 1).astype(bool)),
            (truth, np.roll(truth, 3 * i + 2, axis=1)),
            (truth, np.ones_like(truth)),
            (truth, truth ^ (rng.random(truth.shape) < 0.1 * i)),
        ]
    empty = np.zeros((64, 80), bool)
    cases += [(empty, empty), (empty, cases[0][0]), (np.ones_like(empty), np.ones_like(empty))]
    return cases


def _write_pairs(cases, truth_dir, pred_dir):
    truth_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    for i, (truth, pred) in enumerate(cases):
        name = f"ISIC_{i:07d}_segmentation.png"
        Image.fromarray(np.where(truth, 255, 0).astype(np.uint8)).save(truth_dir / name)
        Image.fromarray(np.where(pred, 255, 0).astype(np.uint8)).save(pred_dir / name)


def test_per_image_matches_official_scorer():
    official = pytest.importorskip("isic_challenge_scoring.metrics")
    confusion = pytest.importorskip("isic_challenge_scoring.confusion")
    worst = 0.0
    for truth, pred in _cases():
        cm = confusion.create_binary_confusion_matrix(truth_binary_values=truth, prediction_binary_values=pred)
        expected = {
            "accuracy": official.binary_accuracy(cm),
            "sensitivity": official.binary_sensitivity(cm),
            "specificity": official.binary_specificity(cm),
            "jaccard": official.binary_jaccard(cm),
            "threshold_jaccard": official.binary_threshold_jaccard(cm, threshold=0.65),
            "dice": official.binary_dice(cm),
        }
        ours = metrics.score_mask(truth, pred)
        for name, value in expected.items():
            worst = max(worst, abs(ours[name] - float(value)))
    assert worst < 1e-6


def test_score_folders_matches_official_scorer(tmp_path):
    segmentation = pytest.importorskip("isic_challenge_scoring.segmentation")
    cases = _cases()
    _write_pairs(cases, tmp_path / "truth", tmp_path / "pred")
    rows, summary, problems = metrics.score_folders(tmp_path / "pred", tmp_path / "truth")
    assert problems == [] and summary["n_images"] == len(cases) == len(rows)
    official = segmentation.SegmentationScore.from_dir(tmp_path / "truth", tmp_path / "pred").macro_average
    for name in metrics.METRIC_NAMES:
        assert abs(summary[name] - float(official[name])) < 1e-6, name


# --------------------------------------------------------------------------------------------
# Folders with problems, writing scores
# --------------------------------------------------------------------------------------------

def _save(path, mask):
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


def test_score_folders_reports_problems(tmp_path):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    _save(truth_dir / "IMD002_lesion.bmp", TRUTH)  # PH2-style name
    _save(pred_dir / "IMD002_segmentation.png", PRED)
    _save(truth_dir / "ISIC_0000001_segmentation.png", TRUTH)  # prediction missing
    _save(truth_dir / "ISIC_0000002_segmentation.png", TRUTH)
    _save(pred_dir / "ISIC_0000002_segmentation.png", np.zeros((5, 5), bool))  # size mismatch
    _save(pred_dir / "ISIC_0000009_segmentation.png", PRED)  # no truth
    (pred_dir / "ISIC_0000003_segmentation.png").write_bytes(b"not a png")
    _save(truth_dir / "ISIC_0000003_segmentation.png", TRUTH)  # unreadable prediction
    (truth_dir / "LICENSE.txt").write_text("ignored")
    rows, summary, problems = metrics.score_folders(pred_dir, truth_dir)
    assert [r["image_id"] for r in rows] == ["IMD002"]
    assert rows[0]["jaccard"] == pytest.approx(1 / 3)
    assert summary["n_images"] == 1
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "ISIC_0000001: missing prediction" in text
    assert "ISIC_0000002: prediction is 5x5, truth is 3x4" in text
    assert "ISIC_0000003: unreadable prediction" in text
    assert "ISIC_0000009: prediction" in text
    _, _, missing = metrics.score_folders(tmp_path / "nope", truth_dir)
    assert missing and "not found" in missing[0]


def test_colour_truth_is_scored_by_any_channel_and_reported(tmp_path):
    """A red-on-black truth was read as luminance (76 <= 128): an EMPTY truth, and an empty
    prediction then scored 1.0 everywhere. Now: lesion where any channel > 128, and a problem line."""

    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    red = np.zeros(TRUTH.shape + (3,), np.uint8)
    red[TRUTH] = (255, 0, 0)
    Image.fromarray(red).save(truth_dir / "ISIC_1_segmentation.png")
    _save(pred_dir / "ISIC_1_segmentation.png", PRED)  # TP 2, FP 2, FN 2, TN 6
    Image.fromarray(red).save(truth_dir / "ISIC_2_segmentation.png")
    _save(pred_dir / "ISIC_2_segmentation.png", np.zeros_like(TRUTH))  # empty prediction: 0, not 1.0
    rows, summary, problems = metrics.score_folders(pred_dir, truth_dir)
    assert [r["image_id"] for r in rows] == ["ISIC_1", "ISIC_2"]
    assert rows[0]["jaccard"] == pytest.approx(1 / 3) and rows[0]["dice"] == pytest.approx(0.5)
    assert rows[0]["sensitivity"] == pytest.approx(0.5) and rows[0]["specificity"] == pytest.approx(0.75)
    assert rows[1]["jaccard"] == 0.0 and rows[1]["dice"] == 0.0 and rows[1]["accuracy"] == pytest.approx(8 / 12)
    assert summary["jaccard"] == pytest.approx(1 / 6)
    assert problems == [f"ISIC_{i}: truth mask is colour (RGB); read as lesion where any channel > 128; the official"
                        " scorer accepts only single-channel masks" for i in (1, 2)]
    truth = {"ISIC_1": truth_dir / "ISIC_1_segmentation.png", "ISIC_2": truth_dir / "ISIC_2_segmentation.png"}
    assert metrics.score_pairs(pred_dir, truth) == (rows, summary, problems)
    assert read_mask(truth_dir / "ISIC_1_segmentation.png").tolist() == TRUTH.tolist()


def test_write_scores(tmp_path):
    rows = [{"image_id": "a", **metrics.score_mask(TRUTH, PRED)}, {"image_id": "b", **metrics.score_mask(TRUTH, TRUTH)}]
    summary = metrics.summarize(rows)
    csv_path, json_path = metrics.write_scores(rows, summary, tmp_path / "out", problems=["x: missing"])
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["image_id"] for r in table] == ["a", "b"]
    assert list(table[0]) == ["image_id", *metrics.METRIC_NAMES]
    assert float(table[0]["jaccard"]) == pytest.approx(1 / 3)
    data = json.loads(json_path.read_text())
    assert data["n_images"] == 2 and data["problems"] == ["x: missing"]
    assert data["dice"] == pytest.approx(0.75)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.csv", "summary.json"]


# --------------------------------------------------------------------------------------------
# Instance AP
# --------------------------------------------------------------------------------------------

def _disc(cy, cx, r, shape=(40, 40)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_map_perfect_missing_and_false_positive():
    a, b = _disc(10, 10, 6), _disc(28, 28, 7)
    gt = np.stack([a, b], axis=2)
    assert metrics.map50([(gt, gt, np.array([0.9, 0.8]))]) == pytest.approx(1.0)
    assert metrics.map([(gt, gt, np.array([0.9, 0.8]))]) == pytest.approx(1.0)
    assert metrics.map50([(gt, np.zeros((40, 40, 0), bool), np.zeros(0))]) == 0.0
    # One hit, found first: precision 1 up to recall 0.5, then nothing -> AP 0.5.
    assert metrics.map50([(gt, a[..., None], np.array([0.9]))]) == pytest.approx(0.5)
    # A false positive ranked above the hit: precision 1/2 at recall 1 -> AP 0.5.
    fp = _disc(30, 5, 4)
    pred = np.stack([fp, a], axis=2)
    assert metrics.map50([(a[..., None], pred, np.array([0.9, 0.5]))]) == pytest.approx(0.5)
    # Same but the hit ranked first -> AP 1.
    assert metrics.map50([(a[..., None], pred, np.array([0.1, 0.5]))]) == pytest.approx(1.0)


def test_map_iou_thresholds_and_images_without_gt():
    truth = _disc(20, 20, 10)
    pred = _disc(20, 22, 10)  # IoU between 0.5 and 0.95
    iou = (truth & pred).sum() / (truth | pred).sum()
    expected = np.mean([1.0 if iou >= t else 0.0 for t in metrics.COCO_IOU_THRESHOLDS])
    item = (truth[..., None], pred[..., None], np.array([0.7]))
    assert metrics.map([item]) == pytest.approx(expected)
    assert 0 < expected < 1
    no_gt = (np.zeros((40, 40, 0), bool), pred[..., None], np.array([0.7]))
    assert metrics.map50([item, no_gt]) == pytest.approx(1.0)
    assert math.isnan(metrics.map50([no_gt]))
    assert metrics.image_ap(truth, pred, np.array([0.7])) == pytest.approx(1.0)  # 2-D masks: one instance
    with pytest.raises(ValueError):
        metrics.image_ap(truth, pred, np.array([0.7, 0.1]))
