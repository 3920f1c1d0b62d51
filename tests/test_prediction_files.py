"""lesionkit.prediction_files: which instances are kept, the ISIC mask, crops, JSON, atomic writes."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from lesionkit import prediction_files as pio


def _result(h=20, w=30):
    masks = np.zeros((h, w, 2), bool)
    masks[2:8, 3:10, 0] = True    # 42 px, score 0.95
    masks[10:15, 20:28, 1] = True  # 40 px, score 0.6
    return {"rois": np.array([[2, 3, 8, 10], [10, 20, 15, 28]], np.int32), "class_ids": np.array([1, 1]),
            "scores": np.array([0.95, 0.6], np.float32), "masks": masks}


def test_choose_instances_threshold_and_fallback():
    assert pio.choose_instances(np.array([0.3, 0.9, 0.8]), 0.7) == ([1, 2], False)
    assert pio.choose_instances(np.array([0.3, 0.5]), 0.7) == ([1], True)
    assert pio.choose_instances(np.array([]), 0.7) == ([], False)


def test_union_and_top1_masks():
    r = _result()
    assert pio.lesion_mask(r["masks"], [0, 1], (20, 30)).sum() == 82
    assert pio.lesion_mask(r["masks"], [0, 1], (20, 30), top1=True).sum() == 42
    assert pio.lesion_mask(r["masks"], [], (20, 30)).sum() == 0


def test_crop_blacks_out_background():
    image = np.full((20, 30, 3), 200, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:15] = True
    mask[5, 5] = False
    box = pio.mask_box(mask)
    assert box == [5, 5, 10, 15]
    crop = pio.crop_lesion(image, mask, box)
    assert crop.shape == (5, 10, 3) and crop[0, 0].sum() == 0 and crop[1, 1, 0] == 200
    assert pio.mask_box(np.zeros((3, 3), bool)) is None


def test_write_prediction_files_and_record(tmp_path):
    image = np.full((20, 30, 3), 90, np.uint8)
    record = pio.write_prediction(tmp_path, "ISIC_1", image, _result(), 0.7, crop=True, overlay=False)
    seg = np.asarray(Image.open(tmp_path / "ISIC_1_segmentation.png"))
    assert seg.shape == (20, 30) and set(np.unique(seg)) == {0, 255} and (seg == 255).sum() == 42
    assert record["instances"] == [{"score": 0.95, "box": [2, 3, 8, 10], "area_px": 42, "area_pct": 7.0}]
    assert record["fallback"] is False and record["crop_box"] == [2, 3, 8, 10]
    assert Image.open(tmp_path / "ISIC_1_crop.png").size == (7, 6)
    assert not list(tmp_path.glob(".*tmp"))


def test_write_prediction_with_nothing_found(tmp_path):
    empty = {"rois": np.zeros((0, 4), np.int32), "class_ids": np.zeros(0), "scores": np.zeros(0),
             "masks": np.zeros((20, 30, 0), bool)}
    record = pio.write_prediction(tmp_path, "x", np.zeros((20, 30, 3), np.uint8), empty, 0.7, crop=True,
                                  overlay=False)
    assert record["instances"] == [] and record["crop_box"] is None
    assert np.asarray(Image.open(tmp_path / "x_segmentation.png")).max() == 0


def test_summary_json(tmp_path):
    path = pio.write_summary(tmp_path, [{"id": "a", "instances": []}], {"weights": "w.h5"})
    data = json.loads(path.read_text())
    assert data["n_images"] == 1 and data["n_with_lesion"] == 0 and data["weights"] == "w.h5"

