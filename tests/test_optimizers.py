"""mrcnn.optimizers: the fused AdamW / SGD compute Keras's numbers, through TF's fused kernels."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn.optimizers import FusedAdamW, FusedSGD, keras_class_name

SHAPES = [(3, 3, 4, 8), (8,), (16, 5)]


def _train(optimizer: keras.optimizers.Optimizer, steps: int = 6, strategy=None) -> list[np.ndarray]:
    """Weights after ``steps`` updates with fixed pseudo-random gradients (the same for every call)."""
    rng = np.random.default_rng(7)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        weights = [keras.Variable(rng.normal(size=s).astype("float32"), name=f"w{i}") for i, s in enumerate(SHAPES)]
        optimizer.build(weights)
    grads = [[tf.constant(rng.normal(size=s).astype("float32")) for s in SHAPES] for _ in range(steps)]

    @tf.function
    def step(g):
        strategy.run(lambda: optimizer.apply(g, weights))

    for g in grads:
        step(g)
    return [w.numpy() for w in weights]


def _assert_same_weights(expected: list[np.ndarray], got: list[np.ndarray]) -> None:
    """Equal to float32 rounding (the fused kernels order the arithmetic differently)."""
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def _op_types(optimizer: keras.optimizers.Optimizer) -> set[str]:
    """The op types of one update step's graph."""
    weights = [keras.Variable(np.ones(s, "float32")) for s in SHAPES]
    optimizer.build(weights)
    fn = tf.function(lambda: optimizer.apply([tf.ones(s) for s in SHAPES], weights))
    return {op.type for op in fn.get_concrete_function().graph.get_operations()}


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.05, "global_clipnorm": 1.0}, {"clipnorm": 0.5}])
def test_fused_adamw_matches_keras_adamw(kwargs):
    expected = _train(keras.optimizers.AdamW(learning_rate=0.01, **kwargs))
    got = _train(FusedAdamW(learning_rate=0.01, **kwargs))
    _assert_same_weights(expected, got)
    assert max(float(np.abs(e).max()) for e in expected) > 0.5  # the weights did move


def test_fused_adamw_leaves_out_excluded_weights_from_decay_like_keras():
    def make(cls):
        opt = cls(learning_rate=0.05, weight_decay=0.5)
        opt.exclude_from_weight_decay(var_names=["w1"])
        return opt

    _assert_same_weights(_train(make(keras.optimizers.AdamW)), _train(make(FusedAdamW)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_sgd_matches_keras_sgd(nesterov):
    expected = _train(keras.optimizers.SGD(learning_rate=0.02, momentum=0.9, nesterov=nesterov, clipnorm=5.0))
    got = _train(FusedSGD(learning_rate=0.02, momentum=0.9, nesterov=nesterov, clipnorm=5.0))
    _assert_same_weights(expected, got)


def test_fused_optimizers_run_tf_fused_kernels_and_keras_runs_elementwise_ops():
    assert "ResourceApplyAdam" in _op_types(FusedAdamW(learning_rate=0.01))
    assert "ResourceApplyKerasMomentum" in _op_types(FusedSGD(learning_rate=0.01, momentum=0.9))
    assert "ResourceApplyAdam" not in _op_types(keras.optimizers.AdamW(learning_rate=0.01))
    # without momentum (nothing to fuse) and with AMSGrad Keras's own step runs
    assert "ResourceApplyKerasMomentum" not in _op_types(FusedSGD(learning_rate=0.01))
    assert "ResourceApplyAdam" not in _op_types(FusedAdamW(learning_rate=0.01, amsgrad=True))


def test_fused_adamw_under_a_mirrored_strategy_and_loss_scaling_matches_keras():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        fused = keras.optimizers.LossScaleOptimizer(FusedAdamW(learning_rate=0.01, weight_decay=0.01))
        plain = keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.01))
    _assert_same_weights(_train(plain, strategy=strategy), _train(fused, strategy=strategy))


def test_optimizer_state_files_name_the_keras_class_a_fused_optimizer_computes():
    assert keras_class_name(FusedAdamW()) == "AdamW" and keras_class_name(FusedSGD()) == "SGD"
    assert keras_class_name(keras.optimizers.Adam()) == "Adam"


def test_optimizer_update_benchmark_prints_one_json_line_per_run(capsys):
    import json

    from benchmarks import optimizer_update

    assert optimizer_update.main(["--config", "demo", "--updates", "1", "--rounds", "1", "--threads", "0"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["config"] == "demo" and 0 < record["variables"] < record["weights"]
    for name in ("adamw", "sgd"):
        times = record[name]
        assert times["keras_cpu_seconds"] > 0 and times["fused_cpu_seconds"] > 0
        assert times["ratio"] == pytest.approx(times["fused_cpu_seconds"] / times["keras_cpu_seconds"], abs=2e-3)
