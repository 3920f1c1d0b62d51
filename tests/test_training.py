"""Training graph, trainable layer selection, checkpoints/resume, NaN guard."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mrcnn.config import LOSS_NAMES, Config
from mrcnn.data import INPUT_NAMES, build_training_sample, get_training_anchors
from mrcnn.training import LAYER_REGEX, TrainingDivergedError, set_trainable

REPO = Path(__file__).resolve().parents[1]


class TinyConfig(Config):
    NAME = "tiny"
    NUM_CLASSES = 2
    IMAGES_PER_GPU = 1
    BACKBONE = "resnet50"
    IMAGE_MIN_DIM = 64
    IMAGE_MAX_DIM = 64
    RPN_ANCHOR_SCALES = (8, 16, 32, 64, 128)
    TRAIN_ROIS_PER_IMAGE = 8
    POST_NMS_ROIS_TRAINING = 64
    PRE_NMS_LIMIT = 256
    MAX_GT_INSTANCES = 2
    FPN_CLASSIF_FC_LAYERS_SIZE = 64
    STEPS_PER_EPOCH = 1
    VALIDATION_STEPS = 0
    SEED = 3


def lesion_pairs(n: int, size: int = 64, seed: int = 0, empty_every: int = 0):
    """n images [size, size, 3] uint8 with one dark ellipse each, masks bool [size, size, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    pairs = []
    for i in range(n):
        image = rng.normal(190, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        ry, rx = rng.uniform(0.18, 0.32, 2) * size
        mask = (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 <= 1
        if empty_every and i % empty_every == empty_every - 1:
            mask[:] = False
        image[mask] = (rng.normal(90, 10, (mask.sum(), 3))).clip(0, 255).astype(np.uint8)
        pairs.append((image, mask[:, :, None]))
    return pairs


def array_dataset(pairs):
    from test_data import ArrayDataset
    return ArrayDataset(pairs)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mrcnn.model import MaskRCNN
    return MaskRCNN("training", TinyConfig(), str(tmp_path_factory.mktemp("logs")))


def _weights(keras_model, name, inner=None):
    layer = keras_model.get_layer(name)
    if inner:
        layer = layer.get_layer(inner)
    return [np.array(w) for w in layer.get_weights()]


def _changed(before, after) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_training_model_inputs_and_outputs(tiny_model):
    km = tiny_model.keras_model
    assert [t.name.split(":")[0] for t in km.inputs] == list(INPUT_NAMES)
    names = [layer.name for layer in km.layers]
    for name in (*LOSS_NAMES, "ROI", "proposal_targets", "output_rois", "anchors", "rpn_model"):
        assert name in names
    assert len(km.outputs) == 14
    assert km.outputs[6].shape[1] == int(TinyConfig.TRAIN_ROIS_PER_IMAGE * TinyConfig.ROI_POSITIVE_RATIO)


def test_losses_are_finite_for_an_image_without_instances(tiny_model):
    config = tiny_model.config
    (image, _), = lesion_pairs(1)
    dataset = array_dataset([(image, np.zeros((64, 64, 0), bool))])
    sample = build_training_sample(dataset, config, 0, get_training_anchors(config), rng=np.random.default_rng(0))
    assert not sample["input_gt_class_ids"].any()
    outputs = tiny_model.keras_model([sample[n][None] for n in INPUT_NAMES], training=False)
    values = [float(np.asarray(v)) for v in outputs[-5:]]
    assert all(math.isfinite(v) for v in values), values
    assert values[1] == 0.0 and values[3] == 0.0 and values[4] == 0.0  # nothing positive to regress / mask


def test_set_trainable_presets_follow_matterport(tiny_model):
    names = set_trainable(tiny_model, "heads")
    assert "rpn_conv_shared" in names and "mrcnn_mask" in names and "fpn_c5p5" in names
    assert not any(n.startswith(("res", "bn", "conv1")) for n in names)
    names_4 = set_trainable(tiny_model, "4+")
    assert "res4a_branch2a" in names_4 and "bn4a_branch2a" in names_4 and "res3a_branch2a" not in names_4
    assert set(LAYER_REGEX) == {"heads", "3+", "4+", "5+", "all"}
    assert set(set_trainable(tiny_model, r"mrcnn\_mask.*")) >= {"mrcnn_mask", "mrcnn_mask_bn1"}


def test_heads_then_all_checkpoints_and_nan_guard(tiny_model):
    km = tiny_model.keras_model
    dataset = array_dataset(lesion_pairs(3))
    backbone = _weights(km, "res2a_branch2a") + _weights(km, "conv1") + _weights(km, "bn_conv1")
    heads = _weights(km, "mrcnn_class_logits") + _weights(km, "rpn_model", "rpn_conv_shared") + _weights(km, "fpn_p2")

    tiny_model.train(dataset, dataset, 0.01, 1, "heads")
    after_backbone = _weights(km, "res2a_branch2a") + _weights(km, "conv1") + _weights(km, "bn_conv1")
    after_heads = _weights(km, "mrcnn_class_logits") + _weights(km, "rpn_model", "rpn_conv_shared") + _weights(km, "fpn_p2")
    assert not _changed(backbone, after_backbone), "layers='heads' changed the backbone"
    assert all(_changed([b], [a]) for b, a in zip(heads, after_heads, strict=True))
    log_dir = Path(tiny_model.log_dir)
    assert (log_dir / "mask_rcnn_tiny_0001.h5").exists() and tiny_model.epoch == 1
    assert json.loads((log_dir / "config.json").read_text())["NAME"] == "tiny"

    moving_mean = _weights(km, "bn_conv1")[2]
    tiny_model.train(dataset, dataset, 0.01, 2, "all")
    assert _changed(_weights(km, "conv1"), after_backbone[2:4]), "layers='all' left conv1 unchanged"
    np.testing.assert_array_equal(_weights(km, "bn_conv1")[2], moving_mean)  # TRAIN_BN False: frozen stats
    assert (log_dir / "mask_rcnn_tiny_0002.h5").exists() and tiny_model.epoch == 2
    rows = (log_dir / "training.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "loss"] and set(LOSS_NAMES) <= set(rows[0].split(","))
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]

    # a NaN loss stops training with a clear error and writes no checkpoint for that epoch
    good = dict(tiny_model.config.LOSS_WEIGHTS)
    tiny_model.config.LOSS_WEIGHTS = {**good, "mrcnn_class_loss": float("nan")}
    try:
        with pytest.raises(TrainingDivergedError, match="step 1.*mrcnn_class_loss"):
            tiny_model.train(dataset, dataset, 0.01, 3, "heads")
    finally:
        tiny_model.config.LOSS_WEIGHTS = good
    assert not (log_dir / "mask_rcnn_tiny_0003.h5").exists() and tiny_model.epoch == 2


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_training import TinyConfig, array_dataset, lesion_pairs
    from mrcnn.model import MaskRCNN
    model = MaskRCNN("training", TinyConfig(), {model_dir!r})
    path = model.find_last()
    model.load_weights(path, by_name=True)
    loaded = model.keras_model.get_layer("mrcnn_class_logits").get_weights()[0]
    start = {{"path": path, "epoch": model.epoch, "log_dir": model.log_dir, "loaded_sum": float(np.sum(loaded))}}
    dataset = array_dataset(lesion_pairs(3))
    model.train(dataset, dataset, 0.01, 2, "heads", )
    start["end_epoch"] = model.epoch
    print("RESULT" + json.dumps(start))
""")


def test_resume_in_a_new_process_continues_numbering(tmp_path):
    from mrcnn.model import MaskRCNN
    model = MaskRCNN("training", TinyConfig(), str(tmp_path))
    dataset = array_dataset(lesion_pairs(3))
    model.train(dataset, dataset, 0.01, 1, "heads")
    first = Path(model.log_dir) / "mask_rcnn_tiny_0001.h5"
    assert model.find_last() == str(first)
    saved_sum = float(np.sum(model.keras_model.get_layer("mrcnn_class_logits").get_weights()[0]))

    script = RESUME_SCRIPT.format(tests=str(REPO / "tests"), model_dir=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert result["path"] == str(first) and result["epoch"] == 1
    assert result["log_dir"] == model.log_dir and result["end_epoch"] == 2
    assert result["loaded_sum"] == pytest.approx(saved_sum, rel=1e-6)
    assert (Path(model.log_dir) / "mask_rcnn_tiny_0002.h5").exists()
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [Path(model.log_dir).name]
