"""Batch inference: ``MaskRCNN.detect`` with any number of images, and predict in batches.

Models use the tests' "small" preset (a tiny stand-in backbone, 64 px) with deterministic weights
and a class bias that makes the foreground win, so every image has detections to compare.
"""

from __future__ import annotations

import numpy as np
import pytest
from factories import make_config
from matterport_h5 import det_value

from mrcnn.model import MaskRCNN
from mrcnn.weights import weighted_layers

BATCH = 3


def deterministic_model(logs, **overrides) -> MaskRCNN:
    """An inference model of the "small" preset with the reference rule's weights."""
    model = MaskRCNN("inference", make_config("small", **overrides), str(logs))
    for _, entries in weighted_layers(model.keras_model).items():
        for name, variable in entries:
            variable.assign(det_value(name, variable.shape))
    model.keras_model.get_layer("mrcnn_class_logits").bias.assign(np.array([0.0, 6.0], np.float32))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(batch-3 model, batch-1 model) with identical weights."""
    logs = tmp_path_factory.mktemp("logs")
    return deterministic_model(logs, IMAGES_PER_GPU=BATCH), deterministic_model(logs, IMAGES_PER_GPU=1)


def images(count: int, seed: int = 0, sizes=((57, 70), (64, 64), (40, 90))) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, sizes[i % len(sizes)] + (3,), dtype=np.uint8) for i in range(count)]


def assert_same_results(got: list[dict], expected: list[dict]) -> None:
    """Same boxes, classes and masks (a pixel or two may flip at the 0.5 mask threshold), scores to 1e-4."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert len(b["scores"]) > 0
        np.testing.assert_array_equal(a["class_ids"], b["class_ids"])
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
        np.testing.assert_allclose(a["rois"], b["rois"], atol=1)
        assert a["masks"].shape == b["masks"].shape
        assert np.mean(a["masks"] != b["masks"]) < 1e-3


@pytest.mark.parametrize("count", [1, BATCH, BATCH + 1, 2 * BATCH + 2])
def test_any_count_matches_one_by_one(models, count):
    batched, single = models
    inputs = images(count, seed=count)
    expected = [single.detect([image])[0] for image in inputs]
    assert_same_results(batched.detect(inputs), expected)
    assert batched.detect_trace_count == 1 and single.detect_trace_count == 1  # padding keeps one graph


def test_zero_images_give_no_results(models):
    assert models[0].detect([]) == []
    assert models[0].detect_molded(np.zeros((0, 64, 64, 3), np.float32), np.zeros((0, 14), np.float32)) == []


def test_detect_molded_any_count(models):
    batched, single = models
    molded, metas, _ = batched.mold_inputs(images(BATCH + 1, seed=9, sizes=((64, 64),)))
    expected = [single.detect_molded(molded[i:i + 1], metas[i:i + 1])[0] for i in range(len(molded))]
    assert_same_results(batched.detect_molded(molded, metas), expected)


def test_exact_batch_raises_matterports_error(models):
    batched, _ = models
    with pytest.raises(ValueError, match=f"got 2 images .* BATCH_SIZE = {BATCH}"):
        batched.detect(images(2), exact_batch=True)
    with pytest.raises(ValueError, match=f"BATCH_SIZE = {BATCH}"):
        batched.detect_molded(np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 14), np.float32), exact_batch=True)
    assert len(batched.detect(images(BATCH), exact_batch=True)) == BATCH


def test_mixed_shapes_outside_square_mode_run_per_shape(tmp_path):
    """pad64 molds 57x70, 64x64 and 40x90 to three shapes: each runs as its own padded batch."""
    batched = deterministic_model(tmp_path, IMAGES_PER_GPU=BATCH, IMAGE_RESIZE_MODE="pad64", IMAGE_MIN_DIM=64,
                                  IMAGE_MAX_DIM=128)
    single = deterministic_model(tmp_path, IMAGES_PER_GPU=1, IMAGE_RESIZE_MODE="pad64", IMAGE_MIN_DIM=64,
                                  IMAGE_MAX_DIM=128)
    inputs = images(5, seed=4)
    assert [batched.mold_inputs([image])[0].shape[1:3] for image in inputs] == ([(64, 128), (64, 64), (64, 192)] * 2)[:5]
    assert_same_results(batched.detect(inputs), [single.detect([image])[0] for image in inputs])
    assert batched.detect_trace_count <= 2
