"""GPU features, tested on CPU: mixed precision, and MirroredStrategy over two logical CPUs.

* ``MIXED_PRECISION``: the training model builds under ``mixed_float16`` (float16 convolutions,
  float32 losses and outputs, a LossScaleOptimizer), one step gives finite losses and changes
  the weights, and an inference model built the same way detects.
* ``MIXED_PRECISION = "bfloat16"`` (CPUs with AVX512-BF16/AMX): every layer trains without loss
  scaling; the RPN's losses and outputs agree with float32 on the same weights within bfloat16's
  precision (8 significant bits, so a few 1e-3 relative).
* ``GPU_COUNT = 2``: in a subprocess (logical devices must be configured before TensorFlow
  starts, and must not leak into other tests) two logical CPU devices stand in for two GPUs.
  One ``fit`` step under the MirroredStrategy must give the same loss and the same weight update
  (lr 1, so update = -clipped gradient) as one device with the same global batch. The two images
  of the batch are identical and ROI sampling is made deterministic (ROI_POSITIVE_RATIO 1: every
  positive proposal kept, no negatives drawn), so per-replica means equal the pooled means and
  any difference comes from the distribution (gradient all-reduce, loss scaling by replicas).
  Clipping is on and binds (GRADIENT_CLIP_NORM 0.5, far below the first gradient's norm): both
  runs must clip the *global* batch gradient to that global norm, so the update's norm is 0.5
  (Keras 3 alone would clip each replica's gradient before the all-reduce: mrcnn.training
  sums first).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from factories import make_config
from helpers import lesion_image, run_on_two_logical_cpus, training_inputs

REPO = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------------------------------
# Mixed precision

#: Layers trained in the mixed-precision step: RPN and box head (no float16 mask-conv gradients).
MIXED_TRAINABLE = r"(rpn\_.*)|(mrcnn\_class.*)|(mrcnn\_bbox.*)"


def test_mixed_precision_builds_trains_a_step_and_detects(tmp_path):
    import keras
    import tensorflow as tf

    from mrcnn.model import MaskRCNN
    from mrcnn.training import compile_training_model, set_trainable

    policy_before = keras.config.dtype_policy().name
    config = make_config("small", MIXED_PRECISION=True, TRAIN_ROIS_PER_IMAGE=8, ROI_POSITIVE_RATIO=0.25)
    model = MaskRCNN("training", config, str(tmp_path))
    km = model.keras_model
    assert keras.config.dtype_policy().name == policy_before  # the global policy is restored
    assert km.get_layer("fpn_p2").compute_dtype == "float16"
    assert km.get_layer("fpn_p2").variable_dtype == "float32"
    assert all(out.dtype == "float32" for out in km.outputs[-5:])  # losses
    assert km.outputs[6].dtype == "float32"  # mrcnn_mask

    set_trainable(model, MIXED_TRAINABLE)
    compile_training_model(km, 0.01, config)
    assert isinstance(km.optimizer, keras.optimizers.LossScaleOptimizer)
    before = [np.array(w) for w in km.get_layer("mrcnn_class_logits").get_weights()]
    batch = {k: tf.constant(v) for k, v in training_inputs(config, 1).items()}
    step = tf.function(km.train_step)
    for _ in range(4):  # dynamic loss scaling may skip the first steps (float16 overflow)
        losses = {k: float(v) for k, v in step(batch).items()}
        assert set(losses) >= {"loss", "rpn_class_loss", "mrcnn_mask_loss"}
        assert all(math.isfinite(v) for v in losses.values()), losses
        after = km.get_layer("mrcnn_class_logits").get_weights()
        if any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)):
            break
    else:
        pytest.fail("4 mixed-precision steps left the weights unchanged")
    assert all(np.isfinite(w).all() for w in after)

    infer = MaskRCNN("inference", config, str(tmp_path))
    assert infer.keras_model.get_layer("fpn_p2").compute_dtype == "float16"
    results = infer.detect([lesion_image(seed=1)[0]])
    assert results[0]["masks"].shape[:2] == (64, 64)
    assert np.isfinite(results[0]["scores"]).all() and results[0]["scores"].dtype == np.float32


def test_bfloat16_trains_every_layer_unscaled_and_agrees_with_float32(tmp_path):
    import keras
    import tensorflow as tf

    from mrcnn.model import MaskRCNN
    from mrcnn.training import compile_training_model, set_trainable

    fp32 = make_config("small", TRAIN_ROIS_PER_IMAGE=8, ROI_POSITIVE_RATIO=0.25)
    bf16 = fp32.replace(MIXED_PRECISION="bfloat16")
    full, half = MaskRCNN("training", fp32, str(tmp_path)), MaskRCNN("training", bf16, str(tmp_path))
    km = half.keras_model
    assert km.get_layer("fpn_p2").compute_dtype == "bfloat16" and km.get_layer("fpn_p2").variable_dtype == "float32"
    assert all(out.dtype == "float32" for out in km.outputs[-5:])  # losses
    km.set_weights(full.keras_model.get_weights())
    batch = [tf.constant(v) for v in training_inputs(fp32, 1).values()]
    # the RPN's losses depend on the image and the weights only (no ROI sampling): equal to bf16 precision
    from mrcnn.config import LOSS_NAMES

    losses = {m: dict(zip(LOSS_NAMES, [float(v) for v in m.keras_model(batch)[-5:]], strict=True)) for m in (full, half)}
    for name in ("rpn_class_loss", "rpn_bbox_loss"):
        assert losses[half][name] == pytest.approx(losses[full][name], rel=0.03), (name, losses)
        assert losses[half][name] != losses[full][name]  # it did compute in bfloat16

    set_trainable(half, "all")
    compile_training_model(km, 0.01, bf16)
    assert not isinstance(km.optimizer, keras.optimizers.LossScaleOptimizer)  # bfloat16 has float32's range
    before = [np.array(w) for w in km.trainable_weights]
    step = {k: float(v) for k, v in tf.function(km.train_step)(dict(zip(
        [i.name for i in km.inputs], batch, strict=True))).items()}
    assert all(math.isfinite(v) for v in step.values()), step
    after = [np.array(w) for w in km.trainable_weights]
    assert all(np.isfinite(w).all() for w in after)
    moved = {v.path.split("/")[0] for v, a, b in zip(km.trainable_weights, before, after, strict=True)
             if not np.array_equal(a, b)}
    assert {"fpn_p2", "rpn_conv_shared", "mrcnn_class_logits"} <= moved, sorted(moved)
    assert len(moved) > 20  # the backbone's convolutions too

    # inference: the same weights give the same RPN scores to bfloat16 precision
    infer = {c.MIXED_PRECISION: MaskRCNN("inference", c, str(tmp_path)) for c in (fp32, bf16)}
    path = tmp_path / "w.h5"
    full.save_weights(str(path))
    image = lesion_image(seed=1)[0]
    rpn = {}
    for key, model in infer.items():
        model.load_weights(str(path), by_name=True)
        molded, metas, _ = model.mold_inputs([image])
        anchors = model.batch_anchors(molded)
        rpn[key] = np.array(model.keras_model([molded, metas, anchors])[5])  # rpn_class [1, A, 2]
    assert infer["bfloat16"].keras_model.get_layer("fpn_p2").compute_dtype == "bfloat16"
    diff = np.abs(rpn["bfloat16"] - rpn[False])
    assert 0 < diff.mean() < 0.005 and diff.max() < 0.1, (diff.mean(), diff.max())
    result = infer["bfloat16"].detect([image])[0]
    assert result["masks"].shape[:2] == (64, 64) and result["scores"].dtype == np.float32


def test_mixed_precision_values_are_validated():
    from mrcnn.config import ConfigError, loss_scaled, precision_policy

    for value, policy in ((False, None), (True, "mixed_float16"), ("float16", "mixed_float16"),
                          ("bfloat16", "mixed_bfloat16")):
        config = make_config("small", MIXED_PRECISION=value)
        assert precision_policy(config) == policy and loss_scaled(config) == (policy == "mixed_float16")
    with pytest.raises(ConfigError, match='MIXED_PRECISION .*expects false, true, "float16", "bfloat16" or "auto".*bf16'):
        make_config("small", MIXED_PRECISION="bf16")


def test_auto_precision_is_bfloat16_only_on_a_gpu_less_cpu_with_native_bfloat16(monkeypatch):
    import tensorflow as tf

    from mrcnn import config as config_module

    zen4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    skylake = "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    assert config_module.cpu_has_bf16(zen4) and config_module.cpu_has_bf16("flags : amx_bf16 amx_tile")
    assert not config_module.cpu_has_bf16(skylake) and not config_module.cpu_has_bf16("flags : avx512_bf16x")
    auto = make_config("small", MIXED_PRECISION="auto")
    for cpuinfo, gpus, policy in ((zen4, [], "mixed_bfloat16"), (skylake, [], None), (zen4, ["GPU:0"], None)):
        monkeypatch.setattr(config_module.Path, "read_text", lambda self, *a, _c=cpuinfo, **k: _c)
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None, _g=gpus: _g)
        assert config_module.precision_policy(auto) == policy, (cpuinfo, gpus)
        assert not config_module.loss_scaled(auto)


# -------------------------------------------------------------------------------------------
# MirroredStrategy over two logical CPUs (subprocess)

MIRRORED_SCRIPT = """
    # ROI_POSITIVE_RATIO 1: every positive proposal kept; "global" clipping: the update's norm is 0.5
    ONE_DEVICE = dict(ROI_POSITIVE_RATIO=1.0, GRADIENT_CLIP_NORM=0.5, GRADIENT_CLIP_MODE="global")

    def step(config, weights=None):
        model = MaskRCNN("training", config, MODEL_DIR)
        km = model.keras_model
        if weights is not None:
            km.set_weights(weights)
        start = [np.array(w) for w in km.get_weights()]
        set_trainable(model, "all")
        compile_training_model(km, 1.0, config)  # lr 1, first SGD step: update = -clipped gradient
        batch = {k: tf.constant(v) for k, v in training_inputs(config, 2).items()}
        ds = tf.data.Dataset.from_tensors(batch).repeat()
        logs = km.fit(ds, steps_per_epoch=1, epochs=1, verbose=0).history
        delta = [np.array(w) - s for w, s in zip(km.get_weights(), start)]
        return km, start, {k: float(v[0]) for k, v in logs.items()}, delta

    one = make_config("small", IMAGES_PER_GPU=2, **ONE_DEVICE)
    two = make_config("small", GPU_COUNT=2, IMAGES_PER_GPU=1, **ONE_DEVICE)
    km1, start, logs1, delta1 = step(one)
    km2, _, logs2, delta2 = step(two, start)
    flat1 = np.concatenate([d.ravel() for d in delta1])
    flat2 = np.concatenate([d.ravel() for d in delta2])
    worst = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))
                for a, b in zip(delta1, delta2) if np.abs(a).max() > 0)
    print("RESULT" + json.dumps({
        "strategy": type(km2.distribute_strategy).__name__,
        "replicas": km2.distribute_strategy.num_replicas_in_sync,
        "devices": [d.name for d in tf.config.list_logical_devices("CPU")],
        "logs1": logs1, "logs2": logs2,
        "update_norm": float(np.linalg.norm(flat1)),
        "update_norm_two": float(np.linalg.norm(flat2)),
        "update_rel_diff": float(np.linalg.norm(flat1 - flat2) / np.linalg.norm(flat1)),
        "worst_tensor_rel_diff": worst,
        "changed_tensors": int(sum(np.abs(d).max() > 0 for d in delta1)),
    }))
"""


@pytest.fixture(scope="module")
def mirrored_result(tmp_path_factory) -> dict:
    """Run MIRRORED_SCRIPT on two logical CPUs in a fresh interpreter and return its RESULT dict."""
    return run_on_two_logical_cpus(MIRRORED_SCRIPT, tmp_path_factory.mktemp("mirrored"))


def test_mirrored_strategy_uses_two_logical_devices(mirrored_result):
    assert mirrored_result["strategy"] == "MirroredStrategy"
    assert mirrored_result["replicas"] == 2
    assert len(mirrored_result["devices"]) == 2


def test_mirrored_step_matches_one_device_with_the_same_global_batch(mirrored_result):
    logs1, logs2 = mirrored_result["logs1"], mirrored_result["logs2"]
    assert set(logs1) == set(logs2)
    for name, value in logs1.items():
        assert math.isfinite(value)
        assert logs2[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert mirrored_result["changed_tensors"] > 20
    assert mirrored_result["update_norm"] == pytest.approx(0.5, rel=1e-4), "global-norm clipping at 0.5"
    assert mirrored_result["update_norm_two"] == pytest.approx(0.5, rel=1e-4), "clipped after the all-reduce"
    assert mirrored_result["update_rel_diff"] < 1e-3, mirrored_result
    assert mirrored_result["worst_tensor_rel_diff"] < 1e-2, mirrored_result
