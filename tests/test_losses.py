"""The five losses vs numpy and vs Matterport reference values; the L2 decay term."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from factories import make_config

from mrcnn import losses

RNG = np.random.default_rng(0)


def _softmax_ce(logits, labels):
    logits = logits - logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def _smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5)


def test_rpn_class_loss_vs_numpy():
    match = RNG.integers(-1, 2, size=(2, 50, 1)).astype(np.int32)
    logits = RNG.normal(size=(2, 50, 2)).astype(np.float32)
    used = match[..., 0] != 0
    expected = _softmax_ce(logits[used], (match[..., 0][used] == 1).astype(int)).mean()
    assert float(losses.rpn_class_loss(match, logits)) == pytest.approx(expected, rel=1e-5)


def test_rpn_bbox_loss_vs_numpy():
    match = np.zeros((2, 30, 1), np.int32)
    match[0, [3, 7], 0] = 1
    match[1, [1, 2, 20], 0] = 1
    match[1, [5], 0] = -1
    pred = RNG.normal(size=(2, 30, 4)).astype(np.float32)
    target = RNG.normal(size=(2, 8, 4)).astype(np.float32)
    expected = np.concatenate([_smooth_l1(target[0, :2], pred[0, [3, 7]]),
                               _smooth_l1(target[1, :3], pred[1, [1, 2, 20]])]).mean()
    assert float(losses.rpn_bbox_loss(make_config(), target, match, pred)) == pytest.approx(expected, rel=1e-5)


def test_mrcnn_class_loss_vs_numpy():
    ids = RNG.integers(0, 3, size=(2, 10)).astype(np.int32)
    logits = RNG.normal(size=(2, 10, 4)).astype(np.float32)
    active = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], np.float32)
    weight = active[0][logits.argmax(-1)]
    expected = (_softmax_ce(logits, ids) * weight).sum() / weight.sum()
    assert float(losses.mrcnn_class_loss(ids, logits, active)) == pytest.approx(expected, rel=1e-5)


def test_mrcnn_bbox_and_mask_loss_vs_numpy():
    ids = np.array([[2, 1, 0, 0], [1, 0, 0, 0]], np.int32)
    target_bbox = RNG.normal(size=(2, 4, 4)).astype(np.float32)
    pred_bbox = RNG.normal(size=(2, 4, 3, 4)).astype(np.float32)
    pos = [(0, 0), (0, 1), (1, 0)]
    expected = np.stack([_smooth_l1(target_bbox[b, r], pred_bbox[b, r, ids[b, r]]) for b, r in pos]).mean()
    assert float(losses.mrcnn_bbox_loss(target_bbox, ids, pred_bbox)) == pytest.approx(expected, rel=1e-5)

    target_masks = (RNG.random((2, 4, 6, 6)) > 0.5).astype(np.float32)
    pred_masks = RNG.random((2, 4, 6, 6, 3)).astype(np.float32)
    bce = [-(t * np.log(p) + (1 - t) * np.log(1 - p))
           for t, p in ((target_masks[b, r], pred_masks[b, r, :, :, ids[b, r]]) for b, r in pos)]
    expected = np.stack(bce).mean()
    assert float(losses.mrcnn_mask_loss(target_masks, ids, pred_masks)) == pytest.approx(expected, rel=1e-4)
    # the mask head may run only on the first ROIs (positives first): same loss
    truncated = losses.mrcnn_mask_loss(target_masks, ids, pred_masks[:, :2])
    assert float(truncated) == pytest.approx(expected, rel=1e-4)


def test_losses_are_zero_without_positives():
    zeros_match = np.zeros((1, 20, 1), np.int32)
    logits = RNG.normal(size=(1, 20, 2)).astype(np.float32)
    assert float(losses.rpn_class_loss(zeros_match, logits)) == 0.0
    assert float(losses.rpn_bbox_loss(make_config(), np.zeros((1, 8, 4), np.float32), zeros_match,
                                      RNG.normal(size=(1, 20, 4)).astype(np.float32))) == 0.0
    ids = np.zeros((1, 5), np.int32)
    assert float(losses.mrcnn_bbox_loss(np.zeros((1, 5, 4), np.float32), ids, np.ones((1, 5, 2, 4), np.float32))) == 0
    assert float(losses.mrcnn_mask_loss(np.zeros((1, 5, 4, 4), np.float32), ids,
                                        np.full((1, 5, 4, 4, 2), 0.5, np.float32))) == 0.0
    value = losses.mrcnn_class_loss(ids, np.zeros((1, 5, 2), np.float32), np.zeros((1, 2), np.float32))
    assert np.isfinite(float(value))


LOSS_ARGS = {
    "rpn_class_loss": ("rpn_match", "rpn_class_logits"),
    "rpn_bbox_loss": ("rpn_target_bbox", "rpn_match", "rpn_bbox"),
    "mrcnn_class_loss": ("target_class_ids", "pred_class_logits", "active_class_ids"),
    "mrcnn_bbox_loss": ("target_bbox", "target_class_ids", "pred_bbox"),
    "mrcnn_mask_loss": ("target_masks", "target_class_ids", "pred_masks"),
}


@pytest.mark.parametrize("name", sorted(LOSS_ARGS))
def test_losses_match_matterport(reference_dir, name):
    ref = np.load(reference_dir / "matterport_utils_reference.npz")
    args = [tf.constant(ref["loss_in_" + a]) for a in LOSS_ARGS[name]]
    if name == "rpn_bbox_loss":
        args = [make_config("matterport", IMAGES_PER_GPU=2), *args]
    value = float(getattr(losses, name)(*args))
    assert value == pytest.approx(float(ref["loss_out_" + name]), rel=1e-5)


def test_weight_decay_is_mean_square_per_tensor_and_skips_gamma_beta():
    import keras
    kernel = keras.Variable(np.full((2, 3), 2.0, np.float32), name="kernel")
    bias = keras.Variable(np.array([1.0, 3.0], np.float32), name="bias")
    gamma = keras.Variable(np.full((4,), 10.0, np.float32), name="gamma")
    beta = keras.Variable(np.full((4,), 10.0, np.float32), name="beta")
    value = float(losses.weight_decay_loss([kernel, bias, gamma, beta], 0.01))
    assert value == pytest.approx(0.01 * (4.0 + 5.0))


def test_mask_head_on_real_positives_only_gives_the_same_mask_loss():
    """training.PositiveRois keeps the first n rois (n = most positives in any image of the batch);
    the mask predictions of the dropped slot rows, zero-padded back, do not change the loss."""
    import tensorflow as tf

    from mrcnn.inference_graph import PadRois
    from mrcnn.losses import mrcnn_mask_loss
    from mrcnn.training import PositiveRois

    rng = np.random.default_rng(0)
    class_ids = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], np.int32)   # positives first
    rois = rng.random((2, 6, 4)).astype(np.float32)
    kept = PositiveRois(4)([tf.constant(rois), tf.constant(class_ids)])
    np.testing.assert_array_equal(np.asarray(kept), rois[:, :3])
    none = PositiveRois(4)([tf.constant(rois), tf.zeros((2, 6), tf.int32)])
    assert none.shape == (2, 1, 4)  # never an empty batch for the mask head

    targets = (rng.random((2, 6, 7, 7)) > 0.5).astype(np.float32)
    full = rng.uniform(0.05, 0.95, (2, 4, 7, 7, 2)).astype(np.float32)   # the whole 4-row slot
    trimmed = PadRois(4)(tf.constant(full[:, :3]))                      # head on 3 rows, padded
    assert trimmed.shape == (2, 4, 7, 7, 2)
    expected = float(mrcnn_mask_loss(tf.constant(targets), tf.constant(class_ids), tf.constant(full)))
    got = float(mrcnn_mask_loss(tf.constant(targets), tf.constant(class_ids), trimmed))
    assert got == pytest.approx(expected, rel=1e-6) and expected > 0.1
