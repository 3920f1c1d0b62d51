"""lesionkit.tta: exact mapping back for an equivariant model, merging, result format."""

from __future__ import annotations

import numpy as np

from lesionkit import tta


class ThresholdModel:
    """A deterministic 'model' that is equivariant to flips/rotations: lesion = dark pixels."""

    def __init__(self):
        self.calls = 0

    def detect(self, images, verbose=0):
        self.calls += 1
        return [tta.as_result(image[..., 0] < 100, 0.9) for image in images]


def _image():
    rng = np.random.default_rng(0)
    image = np.full((37, 52, 3), 200, np.uint8)
    image[5:20, 8:30] = 40
    image[rng.random((37, 52)) < 0.05] = 20  # asymmetric speckles
    return image


def test_identity_case_is_exact():
    model = ThresholdModel()
    image = _image()
    plain = model.detect([image])[0]
    merged = tta.detect_tta(model, image, 0.5)
    assert model.calls == 2  # the plain call, then one call for all variants
    assert np.array_equal(merged["masks"][..., 0], plain["masks"][..., 0])
    assert np.array_equal(merged["rois"], plain["rois"])
    assert merged["scores"].tolist() == [np.float32(0.9)]


def test_each_transform_is_inverted():
    a = np.arange(3 * 5).reshape(3, 5)
    for forward, inverse in tta.TRANSFORMS.values():
        assert np.array_equal(inverse(forward(a)), a)


def test_majority_vote_and_empty_result():
    a = np.array([[1, 0], [0, 0]], bool)
    b = np.array([[1, 1], [0, 0]], bool)
    c = np.array([[0, 1], [1, 0]], bool)
    assert tta.merge_masks([a, b, c]).tolist() == [[True, True], [False, False]]
    empty = tta.as_result(np.zeros((4, 6), bool), 0.0)
    assert empty["masks"].shape == (4, 6, 0) and empty["rois"].shape == (0, 4)


def test_fallback_to_best_detection_below_threshold():
    masks = np.zeros((4, 4, 2), bool)
    masks[0, 0, 0] = masks[3, 3, 1] = True
    result = {"scores": np.array([0.2, 0.3]), "masks": masks}
    mask, score = tta.best_lesion_mask(result, (4, 4), 0.5)
    assert mask[3, 3] and not mask[0, 0] and score == 0.3


def test_batch_of_images_is_one_call_and_matches_one_by_one():
    model = ThresholdModel()
    images = [_image(), np.ascontiguousarray(_image()[::-1, :40]), np.full((9, 11, 3), 30, np.uint8)]
    merged = tta.detect_tta_batch(model, images, 0.5)
    assert model.calls == 1
    for image, result in zip(images, merged, strict=True):
        single = tta.detect_tta(model, image, 0.5)
        assert np.array_equal(result["masks"], single["masks"]) and np.array_equal(result["rois"], single["rois"])
        assert np.array_equal(result["masks"][..., 0], image[..., 0] < 100)
    assert tta.detect_tta_batch(model, [], 0.5) == []
