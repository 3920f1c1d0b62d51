"""The crop-and-refine stage (lesionkit.refine): geometry by hand, settings, a tiny U-Net that
learns, checkpoints that resume, and the detector wrapper."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import array_dataset, lesion_pairs

import lesions
from lesionkit.refine import geometry
from lesionkit.refine.checkpoints import newest_refiner, refiner_checkpoints, refiner_epoch
from lesionkit.refine.settings import RefineSettings
from lesionkit.synthetic import make_lesion_image
from mrcnn.config import ConfigError

TINY = RefineSettings(crop_size=32, depth=2, width=4, epochs=3, steps_per_epoch=6, batch_size=4,
                      learning_rate=0.01, seed=3)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ------------------------------------------------------------------------------------------
# Geometry (hand-computed)


def test_crop_window_adds_the_margin_on_each_side():
    assert geometry.crop_window((10, 20, 50, 60), 0.1) == (6, 16, 54, 64)  # 40 px box -> 48 px window
    assert geometry.crop_window((10, 20, 50, 60), 0.0) == (10, 20, 50, 60)


def test_crop_window_is_square_ish():
    # 10 x 40 box: the height grows to 40 / 1.5 = 26.67 around centre y 5 -> -8.33..18.33, rounded outward
    assert geometry.crop_window((0, 0, 10, 40), 0.0) == (-9, 0, 19, 40)


def test_random_window_stays_in_the_scale_and_shift_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        y1, x1, y2, x2 = geometry.random_window((100, 100, 200, 200), rng, (0.81, 1.21), 0.1)
        assert 80 <= y2 - y1 <= 123 and 80 <= x2 - x1 <= 123
        assert abs((y1 + y2) / 2 - 150) <= 11 and abs((x1 + x2) / 2 - 150) <= 11


def test_crop_resize_pads_outside_the_image_with_zeros():
    image = np.full((20, 20, 3), 7, np.uint8)
    crop = geometry.crop_resize(image, (-10, -10, 10, 10), 20)  # same size: no resampling
    assert crop.shape == (20, 20, 3)
    assert (crop[:10] == 0).all() and (crop[:, :10] == 0).all() and (crop[10:, 10:] == 7).all()


def test_paste_back_places_the_window_and_drops_what_is_outside():
    prob = np.ones((8, 8), np.float32)
    out = geometry.paste_back(prob, (-4, 6, 4, 14), (10, 12))
    assert out.shape == (10, 12)
    assert out[:4, 6:].sum() == 4 * 6 and out.sum() == 24  # rows 0..3, columns 6..11 only


@pytest.mark.parametrize("shape,margin", [((300, 400), 0.1), ((150, 200), 0.3)])
def test_crop_paste_round_trip_keeps_the_mask(shape, margin):
    _, masks = make_lesion_image(np.random.default_rng(4), *shape)
    truth = masks[..., 0]
    rows, cols = np.flatnonzero(truth.any(1)), np.flatnonzero(truth.any(0))
    window = geometry.crop_window((rows[0], cols[0], rows[-1] + 1, cols[-1] + 1), margin)
    back = geometry.paste_back(geometry.crop_resize(truth, window, 128), window, shape)
    assert iou(geometry.probability_mask(back, 0.5), truth) > 0.97


def test_round_trip_at_the_border():
    truth = np.zeros((100, 100), bool)
    truth[0:30, 70:100] = True  # lesion in a corner: the window reaches outside
    window = geometry.crop_window((0, 70, 30, 100), 0.2)
    assert window[0] < 0 and window[3] > 100
    back = geometry.paste_back(geometry.crop_resize(truth, window, 64), window, truth.shape)
    assert iou(back >= 0.5, truth) > 0.95


# ------------------------------------------------------------------------------------------
# Settings


def test_lesion_config_refine_defaults_are_valid():
    settings = RefineSettings.from_config(lesions.LesionConfig().validate())
    assert settings.enabled is False and settings.crop_size == 256 and settings.train_scale == (0.9, 1.5) and settings.margin == 0.15


@pytest.mark.parametrize("key,value", [("REFINE_CROP_SIZE", 100), ("REFINE_DEPTH", 0), ("REFINE_WIDTH", 2),
                                       ("REFINE_MARGIN", -0.1), ("REFINE_TRAIN_SCALE", [1.2, 0.8]),
                                       ("REFINE_MASK_THRESHOLD", 1.0), ("REFINE_BATCH_SIZE", 0)])
def test_bad_refine_values_are_refused_naming_the_key(key, value):
    config = lesions.LesionConfig()
    config.set(key, value)
    with pytest.raises(ConfigError, match=key):
        config.validate()


def test_presets_have_valid_refine_settings():
    for preset in ("demo", "isic2018", "ham10000_cpu"):
        RefineSettings.from_config(lesions.build_config(preset, []))


# ------------------------------------------------------------------------------------------
# Training, checkpoints, inference (one tiny U-Net for the module)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lesionkit.refine.training import train_refiner

    run = tmp_path_factory.mktemp("run")
    train_set = array_dataset(lesion_pairs(12, size=64, seed=1, empty_every=6))
    val_set = array_dataset(lesion_pairs(4, size=64, seed=2))
    last = train_refiner(TINY, train_set, val_set, run, verbose=0)
    return run, last, train_set


def test_training_writes_checkpoints_and_the_loss_falls(trained):
    run, last, _ = trained
    assert [refiner_epoch(p) for p in refiner_checkpoints(run)] == [1, 2, 3] and last == newest_refiner(run)
    import csv

    rows = list(csv.DictReader(open(run / "refiner_training.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and "val_loss" in rows[0]
    assert float(rows[-1]["loss"]) < 0.8 * float(rows[0]["loss"])
    assert not list(run.glob(".tmp-*"))


def test_training_resumes_from_the_newest_checkpoint(trained, capsys):
    from lesionkit.refine.training import train_refiner

    run, _, train_set = trained
    assert train_refiner(TINY, train_set, None, run, verbose=0) == run / "refiner_0003.weights.h5"
    assert "nothing to train" in capsys.readouterr().out
    last = train_refiner(TINY, train_set, None, run, epochs=4, verbose=0)
    assert last.name == "refiner_0004.weights.h5"
    assert "continuing from" in capsys.readouterr().out


def test_a_checkpoint_of_other_settings_is_refused(trained):
    from lesionkit.refine.inference import Refiner
    from mrcnn.weights import WeightsError

    run, last, _ = trained
    with pytest.raises(WeightsError, match="refiner_0003"):
        Refiner(RefineSettings(crop_size=32, depth=2, width=8), run / "refiner_0003.weights.h5")


class FakeDetector:
    """Returns one fixed box and a crude square mask for every image."""

    config = "the detector's config"

    def __init__(self, box, score=0.9):
        self.box, self.score = box, score

    def detect(self, images, verbose=0):
        out = []
        for image in images:
            masks = np.zeros(image.shape[:2] + (1,), bool)
            y1, x1, y2, x2 = self.box
            masks[y1:y2, x1:x2, 0] = True
            out.append({"rois": np.array([self.box]), "class_ids": np.array([1]),
                        "scores": np.array([self.score], np.float32), "masks": masks})
        return out


def test_refined_detector_replaces_the_kept_mask(trained):
    from lesionkit.refine.inference import RefinedDetector, Refiner

    run, last, _ = trained
    image, truth = lesion_pairs(1, size=64, seed=9)[0]
    rows, cols = np.flatnonzero(truth[..., 0].any(1)), np.flatnonzero(truth[..., 0].any(0))
    box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    model = RefinedDetector(FakeDetector(box), Refiner(TINY, last), min_confidence=0.5)
    assert model.config == "the detector's config"  # other attributes are the detector's
    result = model.detect([image])[0]
    assert result["masks"].shape == (64, 64, 1) and result["refined"].tolist() == [True]
    assert not result["masks"][..., 0][:, :max(box[1] - 8, 0)].any()  # nothing far outside the window
    low = RefinedDetector(FakeDetector(box, score=0.1), Refiner(TINY, last), min_confidence=0.5)
    assert low.detect([image])[0]["refined"].tolist() == [True]  # the fallback instance is refined too


def test_all_empty_masks_is_a_one_line_user_error():
    from lesionkit.refine.crops import RefineCrops, RefineDataError

    crops = RefineCrops(array_dataset(lesion_pairs(3, size=64, seed=1, empty_every=1)), TINY)
    with pytest.raises(RefineDataError, match="REFINE = false"):
        crops[0]
