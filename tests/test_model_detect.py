"""MaskRCNN.detect and friends on a tiny ResNet-50 model (64 px, 2 images per batch)."""

from __future__ import annotations

import math
import os

import keras
import numpy as np
import pytest
from factories import make_config
from matterport_h5 import det_value

from mrcnn.boxes import generate_anchors, norm_boxes
from mrcnn.model import MaskRCNN
from mrcnn.weights import weighted_layers


def detect_config(**overrides):
    """ResNet-50 at 64 px, 3 classes, 2 images per batch, small FPN and heads, 4 detection slots."""
    return make_config("matterport", **(dict(
        NAME="tiny", BACKBONE="resnet50", NUM_CLASSES=3, IMAGES_PER_GPU=2, IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=64,
        RPN_ANCHOR_SCALES=[8, 16, 32, 64, 128], PRE_NMS_LIMIT=200, POST_NMS_ROIS_INFERENCE=24,
        DETECTION_MAX_INSTANCES=4, DETECTION_MIN_CONFIDENCE=0, FPN_CLASSIF_FC_LAYERS_SIZE=64,
        TOP_DOWN_PYRAMID_SIZE=64, MASK_POOL_SIZE=7, MASK_SHAPE=[14, 14]) | overrides))


def init_rule_weights(model: MaskRCNN, foreground_bias: float = 6.0) -> None:
    """Deterministic weights; the class-logit bias makes foreground win so there are detections."""
    for _, entries in weighted_layers(model.keras_model).items():
        for name, variable in entries:
            variable.assign(det_value(name, variable.shape))
    bias = np.zeros(model.config.NUM_CLASSES, np.float32)
    bias[1:] = foreground_bias
    model.keras_model.get_layer("mrcnn_class_logits").bias.assign(bias)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = MaskRCNN("inference", detect_config(), str(tmp_path_factory.mktemp("logs")))
    init_rule_weights(m)
    return m


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (97, 131, 3), dtype=np.uint8), rng.integers(0, 255, (50, 61), dtype=np.uint8)]


def _check_result(result: dict, height: int, width: int) -> None:
    n = len(result["class_ids"])
    assert result["rois"].dtype == np.int32 and result["rois"].shape == (n, 4)
    assert result["class_ids"].dtype == np.int32 and result["scores"].dtype == np.float32
    assert result["masks"].dtype == bool and result["masks"].shape == (height, width, n)
    assert np.all(np.diff(result["scores"]) <= 0), "ordered by score"
    assert np.all(result["class_ids"] >= 1)
    if n:
        assert result["rois"][:, 0].min() >= 0 and result["rois"][:, 2].max() <= height
        assert result["rois"][:, 1].min() >= 0 and result["rois"][:, 3].max() <= width


def test_detect_odd_sized_rgb_and_grayscale(model):
    rgb, gray = _images()
    results = model.detect([rgb, gray])
    assert len(results) == 2
    _check_result(results[0], 97, 131)
    _check_result(results[1], 50, 61)
    assert len(results[0]["class_ids"]) > 0


def test_rgba_and_uint16_are_converted(model):
    rgb, _ = _images(1)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    wide = (rgb.astype(np.uint16) * 257)
    results = model.detect([rgba, wide])
    reference = model.detect([rgb, rgb])
    for result, expected in zip(results, reference, strict=True):
        _check_result(result, 97, 131)
        np.testing.assert_array_equal(result["rois"], expected["rois"])


def test_exact_batch_keeps_matterports_rule(model):
    with pytest.raises(ValueError, match="BATCH_SIZE = 2"):
        model.detect(_images()[:1], exact_batch=True)
    with pytest.raises(ValueError, match="got 3 images"):
        model.detect(_images() + _images()[:1], exact_batch=True)
    assert len(model.detect(_images(), exact_batch=True)) == 2


def test_no_detections_gives_empty_masks(model):
    layer = model.keras_model.get_layer("mrcnn_class_logits")
    saved = keras.ops.convert_to_numpy(layer.bias).copy()
    layer.bias.assign(np.array([100.0, 0.0, 0.0], np.float32))  # background always wins
    try:
        results = model.detect(_images())
    finally:
        layer.bias.assign(saved)
    assert results[0]["masks"].shape == (97, 131, 0) and results[0]["rois"].shape == (0, 4)
    assert results[1]["masks"].shape == (50, 61, 0)


def test_hundred_detect_calls_trace_once(model):
    model.detect(_images())
    traces = model.detect_trace_count
    assert traces == 1
    for i in range(100):
        rng = np.random.default_rng(i)
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        model.detect([rng.integers(0, 255, (h, w, 3), dtype=np.uint8)] * 2)
    assert model.detect_trace_count == traces


def test_detect_molded_matches_detect_on_molded_size(model):
    rgb = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    molded, metas, _ = model.mold_inputs([rgb, rgb])
    a = model.detect_molded(molded, metas)[0]
    b = model.detect([rgb, rgb])[0]
    np.testing.assert_array_equal(a["rois"], b["rois"])
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6)


def test_save_load_round_trip_gives_identical_detections(model, tmp_path):
    images = _images(5)
    before = model.detect(images)
    path = tmp_path / "round_trip.h5"
    model.save_weights(str(path))
    model.keras_model.get_layer("fpn_p2").kernel.assign(det_value("other/kernel:0", (3, 3, 64, 64)))
    model.keras_model.get_layer("mrcnn_class_logits").bias.assign(np.zeros(3, np.float32))
    model.load_weights(str(path), verbose=0)
    after = model.detect(images)
    for x, y in zip(before, after, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("shape", [(64, 64, 3), (128, 64, 3)])
def test_anchors_per_level_match_box_helpers(model, shape):
    cfg = model.config
    anchors = model.get_anchors(shape)
    start = 0
    for level, (scale, stride) in enumerate(zip(cfg.RPN_ANCHOR_SCALES, cfg.BACKBONE_STRIDES, strict=True)):
        rows, cols = math.ceil(shape[0] / stride), math.ceil(shape[1] / stride)
        count = rows * cols * len(cfg.RPN_ANCHOR_RATIOS)
        pixel = generate_anchors(scale, cfg.RPN_ANCHOR_RATIOS, (rows, cols), stride, cfg.RPN_ANCHOR_STRIDE)
        assert pixel.shape == (count, 4), f"level P{level + 2}"
        np.testing.assert_allclose(anchors[start:start + count], norm_boxes(pixel, shape[:2]), atol=1e-6)
        np.testing.assert_allclose(model.anchors[start:start + count], pixel)
        start += count
    assert start == len(anchors)
    # First anchor of P2 is centred on pixel (0, 0): ratio 0.5 -> h = 8 / sqrt(0.5), w = 8 * sqrt(0.5).
    h, w = 8 / np.sqrt(0.5), 8 * np.sqrt(0.5)
    np.testing.assert_allclose(model.anchors[0], [-h / 2, -w / 2, h / 2, w / 2])


def test_anchors_cached_per_shape(model):
    a = model.get_anchors((64, 64, 3))
    assert model.get_anchors((64, 64)) is a
    b = model.get_anchors((128, 64, 3))
    assert b.shape[0] > a.shape[0] and model.anchors.shape == b.shape
    assert model.get_anchors((64, 64)) is a and model.anchors.shape == a.shape


def test_trainable_layers_and_keras_model(model):
    names = [layer.name for layer in model.get_trainable_layers()]
    assert "conv1" in names and "rpn_model" in names and "mrcnn_mask" in names
    assert len(model.keras_model.outputs) == 7


def test_set_log_dir_and_find_last(model, tmp_path):
    model.model_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="Could not find"):
        model.find_last()
    model.set_log_dir()
    assert model.epoch == 0 and os.path.basename(model.log_dir).startswith("tiny")
    run = tmp_path / "tiny20240102T0304"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        model.find_last()
    for epoch in (1, 7):
        (run / f"mask_rcnn_tiny_{epoch:04d}.h5").write_bytes(b"")
    last = model.find_last()
    assert last == str(run / "mask_rcnn_tiny_0007.h5")
    model.set_log_dir(last)
    assert model.epoch == 7 and model.log_dir == str(run)
    assert model.checkpoint_path == str(run / "mask_rcnn_tiny_{epoch:04d}.h5")
    model.set_log_dir("/somewhere/mask_rcnn_coco.h5")
    assert model.epoch == 0


def test_four_channels_mixed_precision(model, tmp_path, capsys):
    """Four input channels and mixed precision (CPU: builds and runs, float32 outputs)."""
    path = tmp_path / "three_channels.h5"
    model.save_weights(str(path))
    config = detect_config(NAME="variant", IMAGES_PER_GPU=1, IMAGE_CHANNEL_COUNT=4,
                           MEAN_PIXEL=[123.7, 116.8, 103.9, 100.0], MIXED_PRECISION=True)
    variant = MaskRCNN("inference", config, str(tmp_path))
    assert keras.config.dtype_policy().name == "float32", "global policy restored after build"
    assert variant.keras_model.get_layer("fpn_p2").compute_dtype == "float16"
    report = variant.load_weights(str(path), by_name=True)
    assert [name for name, _ in report.skipped] == ["conv1"]
    assert "IMAGE_CHANNEL_COUNT differs" in capsys.readouterr().out
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 4), dtype=np.uint8)
    result = variant.detect([image])[0]
    _check_result(result, 70, 90)
    assert all(t.dtype == "float32" for t in variant.keras_model.outputs)
