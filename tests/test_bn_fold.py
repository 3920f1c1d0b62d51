"""Frozen BatchNorm folded into its convolution (mrcnn.backbone.FoldingConv2D): same outputs, same
training updates, same weight layout as the unfolded conv -> BN pair; nothing folded with TRAIN_BN True."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from factories import make_config
from helpers import lesion_image, training_inputs

from mrcnn import backbone
from mrcnn.model import MaskRCNN
from mrcnn.weights import weighted_layers


def _build(mode: str, config, fold: bool, tmp_path) -> MaskRCNN:
    previous = backbone.FOLD_FROZEN_BN
    backbone.FOLD_FROZEN_BN = fold
    try:
        return MaskRCNN(mode, config, str(tmp_path))
    finally:
        backbone.FOLD_FROZEN_BN = previous


def _randomise_batch_norms(keras_model, seed: int = 0) -> None:
    """Moving statistics and gamma/beta far from the initial 0/1, so that a wrong fold shows."""
    rng = np.random.default_rng(seed)
    for layer in keras_model.layers:
        if isinstance(layer, backbone.BatchNorm):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.3, shape),
                               rng.normal(0, 0.3, shape), rng.uniform(0.5, 2.0, shape)])


def _folded_pairs(keras_model) -> list[tuple[str, str]]:
    return [(layer.name, layer._folded_batch_norm.name) for layer in keras_model.layers  # noqa: SLF001
            if getattr(layer, "_folded_batch_norm", None) is not None]


@pytest.fixture(scope="module")
def inference_pair(tmp_path_factory):
    """(folded, unfolded) tiny ResNet-50 inference models with the same random weights."""
    config = make_config("tiny", DETECTION_MIN_CONFIDENCE=0.0)
    keras.utils.set_random_seed(3)
    unfolded = _build("inference", config, False, tmp_path_factory.mktemp("logs"))
    folded = _build("inference", config, True, tmp_path_factory.mktemp("logs"))
    _randomise_batch_norms(unfolded.keras_model)
    logits = unfolded.keras_model.get_layer("mrcnn_class_logits")   # every ROI a lesion: detections
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel, bias + np.array([0.0, 10.0], np.float32)])
    folded.keras_model.set_weights(unfolded.keras_model.get_weights())
    return folded, unfolded


def test_folding_keeps_layers_and_weight_layout(inference_pair):
    folded, unfolded = inference_pair
    pairs = _folded_pairs(folded.keras_model)
    # 53 conv -> BN pairs in ResNet-50 and the mask head's 4; the box head keeps its BN layers.
    assert len(pairs) == 57
    assert ("res4b_branch2c", "bn4b_branch2c") in pairs and ("mrcnn_mask_conv4", "mrcnn_mask_bn4") in pairs
    assert "mrcnn_class_conv1" not in dict(pairs)
    assert _folded_pairs(unfolded.keras_model) == []
    layout = {name: [w for w, _ in entries] for name, entries in weighted_layers(folded.keras_model).items()}
    assert layout == {name: [w for w, _ in entries] for name, entries in weighted_layers(unfolded.keras_model).items()}
    assert layout["res2a_branch2a"] == ["res2a_branch2a/kernel:0", "res2a_branch2a/bias:0"]
    assert layout["bn2a_branch2a"] == ["bn2a_branch2a/gamma:0", "bn2a_branch2a/beta:0",
                                       "bn2a_branch2a/moving_mean:0", "bn2a_branch2a/moving_variance:0"]


def test_folded_inference_equals_unfolded(inference_pair):
    folded, unfolded = inference_pair
    image, _ = lesion_image(64, seed=1)
    molded, metas, _ = folded.mold_inputs([image])
    a, b = folded._run(molded, metas), unfolded._run(molded, metas)  # noqa: SLF001
    assert np.abs(b[0][0, :, 4]).max() > 0  # real detections to compare
    np.testing.assert_allclose(a[0], b[0], atol=1e-4)   # detections [1, D, 6]
    np.testing.assert_allclose(a[1], b[1], atol=1e-4)   # masks [1, D, 28, 28, C]
    # The folded conv's own output is conv -> BN: the unfolded pair's BN output.
    names = ["res3a_branch2b", "bn3a_branch2b"]
    probe_f = keras.Model(folded.keras_model.inputs, [folded.keras_model.get_layer(n).output for n in names])
    probe_u = keras.Model(unfolded.keras_model.inputs, [unfolded.keras_model.get_layer(n).output for n in names])
    anchors = folded.batch_anchors(molded)
    conv_f, bn_f = (np.asarray(t) for t in probe_f([molded, metas, anchors]))
    _, bn_u = (np.asarray(t) for t in probe_u([molded, metas, anchors]))
    np.testing.assert_allclose(bn_f, bn_u, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(conv_f, bn_f)   # the folded BN passes its input through


def _one_training_step(model: MaskRCNN, inputs: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Weights of every layer after one SGD step (all layers trainable, seeded sampling)."""
    from mrcnn.training import compile_training_model, set_trainable

    set_trainable(model, "all")
    compile_training_model(model.keras_model, 0.01, model.config)
    model.keras_model.optimizer.build(model.keras_model.trainable_variables)
    tf.random.set_seed(11)  # DetectionTargetLayer's ROI shuffles: the same in both graphs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tf.function(model.keras_model.train_step)({k: tf.constant(v) for k, v in inputs.items()})
    # the folded biases get no gradient by design: the step must not hand them to the optimiser
    assert not [w for w in caught if "Gradients do not exist" in str(w.message)]
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.keras_model.layers
            if layer.weights and not isinstance(layer, keras.Model)}


def _layer_weights(model, weights: list, layer: str) -> list:
    """The arrays of ``layer`` in the flat ``weights`` list of ``model``'s Keras model."""
    paths = [w.path for w in model.keras_model.weights]
    return [np.array(weights[i]) for i, p in enumerate(paths) if p.startswith(layer + "/")]


def test_training_step_with_frozen_bn_updates_as_unfolded(tmp_path):
    """One SGD step (no momentum, no weight decay): kernels, gamma and beta move as in the unfolded
    graph; the folded convs' biases keep their value (FoldingConv2D: the offset trains via beta),
    where the unfolded reference, a plain conv, trains its bias."""
    config = make_config("tiny", TRAIN_BN=False, LEARNING_MOMENTUM=0.0, WEIGHT_DECAY=0.0)
    unfolded = _build("training", config, False, tmp_path / "u")
    folded = _build("training", config, True, tmp_path / "f")
    assert len(_folded_pairs(folded.keras_model)) == 57
    _randomise_batch_norms(unfolded.keras_model, seed=2)
    start = unfolded.keras_model.get_weights()
    folded.keras_model.set_weights(start)
    inputs = training_inputs(config, 1)
    after_u, after_f = _one_training_step(unfolded, inputs), _one_training_step(folded, inputs)
    kernel_before = np.array(start[[w.path for w in unfolded.keras_model.weights].index("res3a_branch2b/kernel")])
    moved = np.abs(after_u["res3a_branch2b"][0] - kernel_before).max()
    assert moved > 1e-6  # the step did change the conv kernel
    for name in ("conv1", "res3a_branch2b", "res5c_branch2c", "mrcnn_mask_conv2"):
        kernel_f, bias_f = after_f[name]
        np.testing.assert_allclose(kernel_f, after_u[name][0], rtol=1e-4, atol=1e-3 * moved, err_msg=name)
        bias_start = _layer_weights(unfolded, start, name)[1]
        np.testing.assert_array_equal(bias_f, bias_start, err_msg=name)
    bias_start = _layer_weights(unfolded, start, "res3a_branch2b")[1]
    assert np.abs(after_u["res3a_branch2b"][1] - bias_start).max() > 1e-7   # the plain conv's bias trained
    for name in ("bn3a_branch2b", "mrcnn_mask_bn2"):   # gamma, beta trained the same; statistics untouched
        for got, want in zip(after_f[name], after_u[name], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_train_step_runs_dropout_with_frozen_bn(tmp_path):
    """TRAIN_BN False pins BatchNorm, not the rest: the train step calls the graph in training
    mode, so CLASS_HEAD_DROPOUT is active (it was not before 2026-12-07)."""
    config = make_config("tiny", TRAIN_BN=False, CLASS_HEAD_DROPOUT=0.5)
    model = _build("training", config, True, tmp_path)
    dropout = model.keras_model.get_layer("mrcnn_class_dropout")
    seen, call = [], dropout.call

    def recording(inputs, training=None):
        seen.append(training)
        return call(inputs, training=training)

    dropout.call = recording
    _one_training_step(model, training_inputs(config, 1))
    assert seen and all(flag is True for flag in seen), seen


def test_nothing_folds_with_train_bn_true(tmp_path):
    """TRAIN_BN True (batch statistics, the CPU presets): the graph is the unfolded one."""
    model = _build("training", make_config("tiny", TRAIN_BN=True), True, tmp_path)
    assert _folded_pairs(model.keras_model) == []
    assert not any(getattr(layer, "folded_into_conv", False) for layer in model.keras_model.layers)
    # INFERENCE_BN "moving" is frozen at inference: folded there.
    moving = _build("inference", make_config("tiny", TRAIN_BN=True, INFERENCE_BN="moving"), True, tmp_path)
    assert len(_folded_pairs(moving.keras_model)) == 57


def test_only_a_frozen_batch_norm_folds():
    conv = backbone.FoldingConv2D(4, 3, name="c")
    with pytest.raises(ValueError, match="frozen"):
        conv.fold_batch_norm(backbone.BatchNorm(name="b", fixed_training=True))
