"""ProposalLayer and DetectionLayer on random inputs vs numpy re-statements of Matterport's rules."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from factories import make_config

from mrcnn.boxes import apply_box_deltas, non_max_suppression
from mrcnn.detection import DetectionLayer
from mrcnn.rpn import ProposalLayer


def layer_config(**overrides):
    """Matterport's defaults with 4 classes, 40 proposals before NMS, 20 detection slots."""
    return make_config("matterport", **(dict(NAME="layers", NUM_CLASSES=4, PRE_NMS_LIMIT=40,
                                             DETECTION_MAX_INSTANCES=20, DETECTION_NMS_THRESHOLD=0.3) | overrides))


def random_boxes(rng: np.random.Generator, n: int, low: float = -0.1, high: float = 1.1) -> np.ndarray:
    y1x1 = rng.uniform(low, high - 0.3, (n, 2))
    hw = rng.uniform(0.05, 0.4, (n, 2))
    return np.concatenate([y1x1, y1x1 + hw], axis=1).astype(np.float32)


def numpy_proposals(probs, deltas, anchors, config, count, threshold):
    scores = probs[:, 1]
    order = np.argsort(-scores, kind="stable")[:config.PRE_NMS_LIMIT]
    boxes = apply_box_deltas(anchors[order], deltas[order] * config.RPN_BBOX_STD_DEV.astype(np.float32))
    boxes = np.clip(boxes, 0.0, 1.0)
    keep = non_max_suppression(boxes, scores[order], threshold)[:count]
    out = np.zeros((count, 4), np.float32)
    out[:len(keep)] = boxes[keep]
    return out


def numpy_detections(rois, probs, deltas, window, config):
    class_ids = probs.argmax(axis=1)
    scores = probs[np.arange(len(rois)), class_ids]
    boxes = apply_box_deltas(rois, deltas[np.arange(len(rois)), class_ids] * config.BBOX_STD_DEV.astype(np.float32))
    boxes = np.stack([np.clip(boxes[:, i], window[i % 2], window[2 + i % 2]) for i in range(4)], axis=1)
    keep = np.where((class_ids > 0) & ((scores >= config.DETECTION_MIN_CONFIDENCE) | (not config.DETECTION_MIN_CONFIDENCE)))[0]
    survivors = []
    for c in np.unique(class_ids[keep]):
        members = keep[class_ids[keep] == c]
        survivors += list(members[non_max_suppression(boxes[members], scores[members], config.DETECTION_NMS_THRESHOLD)])
    survivors = np.array(sorted(survivors, key=lambda i: -scores[i])[:config.DETECTION_MAX_INSTANCES], dtype=int)
    out = np.zeros((config.DETECTION_MAX_INSTANCES, 6), np.float32)
    out[:len(survivors)] = np.concatenate([boxes[survivors], class_ids[survivors, None], scores[survivors, None]], axis=1)
    return out


@pytest.mark.parametrize("count", [10, 40])
def test_proposal_layer_matches_numpy(count):
    config = layer_config()
    rng = np.random.default_rng(count)
    batch, anchors_n = 2, 120
    anchors = random_boxes(rng, anchors_n)
    logits = rng.standard_normal((batch, anchors_n, 2)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    deltas = rng.standard_normal((batch, anchors_n, 4)).astype(np.float32)
    layer = ProposalLayer(count, 0.5, config, name="ROI")
    out = layer([tf.constant(probs), tf.constant(deltas), tf.constant(anchors[None])]).numpy()
    assert out.shape == (batch, count, 4)
    for b in range(batch):
        expected = numpy_proposals(probs[b], deltas[b], anchors, config, count, 0.5)
        np.testing.assert_allclose(out[b], expected, atol=1e-5)
    if count == 40:
        assert np.all(out[:, -1] == 0), "fewer survivors than proposal_count: zero padding"


@pytest.mark.parametrize("min_confidence", [0.0, 0.5])
def test_detection_layer_matches_numpy(min_confidence):
    config = layer_config(DETECTION_MIN_CONFIDENCE=min_confidence)
    rng = np.random.default_rng(7)
    batch, n, classes = 2, 30, config.NUM_CLASSES
    rois = np.stack([random_boxes(rng, n, 0.0, 1.0) for _ in range(batch)])
    logits = rng.standard_normal((batch, n, classes)).astype(np.float32) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    deltas = (rng.standard_normal((batch, n, classes, 4)) * 0.5).astype(np.float32)
    meta = np.zeros((batch, config.IMAGE_META_SIZE), np.float32)
    meta[:, 4:7] = [64, 64, 3]
    meta[0, 7:11] = [10, 0, 54, 64]
    meta[1, 7:11] = [0, 0, 64, 64]
    out = DetectionLayer(config)([tf.constant(rois), tf.constant(probs), tf.constant(deltas), tf.constant(meta)]).numpy()
    assert out.shape == (batch, config.DETECTION_MAX_INSTANCES, 6)
    for b in range(batch):
        window = (meta[b, 7:11] - [0, 0, 1, 1]) / 63.0
        expected = numpy_detections(rois[b], probs[b], deltas[b], window, config)
        np.testing.assert_array_equal(out[b, :, 4], expected[:, 4])
        np.testing.assert_allclose(out[b], expected, atol=1e-5)
    padding = out[..., 4] == 0
    assert np.all(out[padding] == 0), "padding rows are all zero"
    assert padding.any() == bool(min_confidence), "the confidence filter leaves padding rows here"
    if min_confidence:
        real = out[..., 4] > 0
        assert np.all(out[..., 5][real] >= min_confidence)


@pytest.mark.parametrize("fallback", [False, True])
def test_detection_foreground_fallback_keeps_best_foreground_roi(fallback):
    """Image 0: every ROI is background (argmax 0), ROI 2 has the highest foreground probability
    (class 2: 0.3). Image 1 has a normal detection and is the same either way."""
    config = layer_config(DETECTION_MIN_CONFIDENCE=0.5, DETECTION_FOREGROUND_FALLBACK=fallback)
    classes = config.NUM_CLASSES
    rois = np.tile(np.array([[0.1, 0.1, 0.3, 0.3], [0.2, 0.2, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]], np.float32), (2, 1, 1))
    probs = np.zeros((2, 3, classes), np.float32)
    probs[0, :, 0] = [0.9, 0.8, 0.6]
    probs[0, :, 1] = [0.1, 0.2, 0.1]
    probs[0, 2, 2] = 0.3
    probs[1, :, 0] = [0.9, 0.1, 0.9]
    probs[1, :, 1] = [0.1, 0.9, 0.1]
    deltas = np.zeros((2, 3, classes, 4), np.float32)
    meta = np.zeros((2, config.IMAGE_META_SIZE), np.float32)
    meta[:, 4:7] = [64, 64, 3]
    meta[:, 7:11] = [0, 0, 64, 64]
    out = DetectionLayer(config)([tf.constant(rois), tf.constant(probs), tf.constant(deltas), tf.constant(meta)]).numpy()
    np.testing.assert_allclose(out[1, 0], [0.2, 0.2, 0.5, 0.6, 1, 0.9], atol=1e-6)
    assert np.all(out[1, 1:] == 0)
    if fallback:
        np.testing.assert_allclose(out[0, 0], [0.4, 0.3, 0.9, 0.8, 2, 0.3], atol=1e-6)
        assert np.all(out[0, 1:] == 0)
    else:
        assert np.all(out[0] == 0)


@pytest.mark.parametrize("train_bn", [False, True])
def test_batch_norm_mode_is_pinned_by_train_bn(train_bn):
    """TRAIN_BN holds whatever ``training`` the enclosing model is called with (Keras 3 would
    otherwise let model(x, training=True) unfreeze a BN built with training=False)."""
    import keras

    from mrcnn.backbone import batch_norm

    inputs = keras.Input((4,))
    model = keras.Model(inputs, batch_norm(inputs, "bn_test", train_bn))
    layer = model.get_layer("bn_test")
    x = np.random.default_rng(0).uniform(5, 15, (8, 4)).astype(np.float32)
    before = keras.ops.convert_to_numpy(layer.moving_mean).copy()
    a = keras.ops.convert_to_numpy(model(x, training=True))
    b = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(a, b, atol=1e-6)
    moved = not np.allclose(keras.ops.convert_to_numpy(layer.moving_mean), before)
    assert moved == train_bn


def test_matmul_conv2d_transpose_equals_conv2d_transpose():
    """The mask upsampler as matmul (+ tiled bias and ReLU before depth_to_space) gives
    Keras' Conv2DTranspose result with the same weights."""
    import keras

    from mrcnn.heads import MatmulConv2DTranspose

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)
    fast = MatmulConv2DTranspose(7, (2, 2), strides=2, activation="relu")
    plain = keras.layers.Conv2DTranspose(7, (2, 2), strides=2, activation="relu")
    fast.build(x.shape)
    plain.build(x.shape)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in plain.get_weights()]
    fast.set_weights(weights)
    plain.set_weights(weights)
    want = keras.ops.convert_to_numpy(plain(x))
    assert want.shape == (3, 10, 8, 7) and (want == 0).any() and (want > 0).any()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fast(x)), want, rtol=1e-5, atol=1e-5)


def test_class_head_dropout_drops_only_in_training_and_only_before_the_class_logits():
    import keras

    from mrcnn.heads import fpn_classifier_graph

    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((1, s, s, 8)).astype(np.float32) for s in (16, 8, 4, 2)]
    rois = np.array([[[0.1, 0.1, 0.6, 0.7], [0.2, 0.3, 0.9, 0.8]]], np.float32)
    meta = np.zeros((1, 14), np.float32)
    meta[0, 4:7] = [64, 64, 3]

    def head(dropout):
        inputs = [keras.Input((2, 4), batch_size=1), keras.Input((14,), batch_size=1)]
        inputs += [keras.Input(m.shape[1:], batch_size=1) for m in maps]
        logits, _, bbox = fpn_classifier_graph(inputs[0], inputs[2:], inputs[1], 3, 4, train_bn=False,
                                               fc_layers_size=16, class_dropout=dropout)
        return keras.Model(inputs, [logits, bbox])

    plain, dropped = head(0.0), head(0.5)
    dropped.set_weights(plain.get_weights())  # a Dropout layer has no weights: same list
    assert [layer.name for layer in dropped.layers if isinstance(layer, keras.layers.Dropout)] == ["mrcnn_class_dropout"]
    x = [rois, meta, *maps]
    want_logits, want_bbox = (t.numpy() for t in plain(x, training=False))
    for training in (False, True):
        logits, bbox = (t.numpy() for t in dropped(x, training=training))
        np.testing.assert_allclose(bbox, want_bbox, rtol=1e-6, atol=1e-6)  # the box branch never drops
        assert np.allclose(logits, want_logits, rtol=1e-6, atol=1e-6) == (not training)
