"""benchmarks/shift_check.py: deterministic shifted copies of validation pairs, per-kind means."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import shift_check
from benchmarks.quality_refine import side_by_side
from lesionkit.dataset_scan import Pair
from lesionkit.synthetic import encode_pair, make_lesion_image
from mrcnn.imaging import read_image, read_mask


def write_pairs(folder, n=7, size=(60, 80)):
    pairs = []
    for i in range(n):
        image, masks = make_lesion_image(np.random.default_rng([9, i]), *size)
        jpg, png = encode_pair(image, masks)
        (folder / f"x{i}.jpg").write_bytes(jpg)
        (folder / f"x{i}_segmentation.png").write_bytes(png)
        pairs.append(Pair(f"x{i}", folder / f"x{i}.jpg", folder / f"x{i}_segmentation.png", diagnosis=f"dx{i}"))
    return pairs


def test_every_kind_once_deterministic_and_masks_stay_aligned(tmp_path):
    (tmp_path / "src").mkdir()
    pairs = write_pairs(tmp_path / "src")
    written, kinds = shift_check.write_shift_set(pairs, tmp_path / "a", seed=1)
    again, _ = shift_check.write_shift_set(pairs, tmp_path / "b", seed=1)
    assert sorted(kinds.values()) == sorted(shift_check.KINDS)
    for pair, other, source in zip(written, again, pairs, strict=True):
        assert pair.image_path.read_bytes() == other.image_path.read_bytes()  # seeded: same bytes
        assert (pair.image_id, pair.diagnosis) == (source.image_id, source.diagnosis)  # the label travels
        image, mask = read_image(pair.image_path), read_mask(pair.mask_path)
        assert image.shape[:2] == mask.shape and mask.any()
        original = read_mask(source.mask_path)
        kind = kinds[pair.image_id]
        if kind == "larger":
            assert mask.shape[0] >= 1.8 * 60 - 1 and mask.sum() > 3 * original.sum()
        elif kind == "smaller":
            assert mask.shape[0] <= 0.7 * 60 + 1
        elif kind == "crop":
            assert mask.shape[0] < 60 and mask.shape[1] < 80
        else:  # photometric: the mask is the original one
            assert np.array_equal(mask, original)
            assert not np.array_equal(image, read_image(source.image_path))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown shift"):
        shift_check.shift_pair(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), bool), "blur", np.random.default_rng())


def test_kind_means_and_images_below_065():
    rows = [{"image_id": "a", "jaccard": 0.9}, {"image_id": "b", "jaccard": 0.5}, {"image_id": "c", "jaccard": 0.7}]
    out = shift_check.kind_means(rows, {"a": "larger", "b": "larger", "c": "crop"})
    assert out["larger"] == 0.7 and out["crop"] == 0.7 and out["colour"] is None and out["below_065"] == 1


def test_kind_accuracy_counts_labelled_images_only():
    rows = [{"image_id": "a", "true_dx": "mel", "pred_dx": "mel"}, {"image_id": "b", "true_dx": "nv", "pred_dx": "mel"},
            {"image_id": "c", "true_dx": "nv", "pred_dx": "nv"}, {"image_id": "d", "true_dx": "", "pred_dx": "nv"},
            {"image_id": "e", "true_dx": "bcc", "pred_dx": "nv"}]
    kinds = {"a": "larger", "b": "larger", "c": "larger", "d": "crop", "e": "colour"}
    out = shift_check.kind_accuracy(rows, kinds)
    assert out["larger"] == round(2 / 3, 4) and out["crop"] is None and out["colour"] == 0.0
    assert set(out) == set(shift_check.KINDS)


def test_side_by_side_pairs_detector_and_refined_per_set():
    record = {"threshold_jaccard": 0.8, "jaccard": 0.85, "below_065": 3,
              "refined": {"threshold_jaccard": 0.83, "below_065": 2},
              "shift": {"threshold_jaccard": 0.7}, "refined_shift": {"threshold_jaccard": 0.75}}
    table = side_by_side(record)
    assert table["val"]["detector"]["threshold_jaccard"] == 0.8 and table["val"]["refined"]["below_065"] == 2
    assert table["shift"]["refined"]["threshold_jaccard"] == 0.75 and "real" not in table
