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
from factories import make_config
from helpers import array_dataset, lesion_pairs, weights_of

from mrcnn.config import LOSS_NAMES
from mrcnn.input_pipeline import INPUT_NAMES, build_training_sample, get_training_anchors
from mrcnn.training import LAYER_REGEX, TrainingDivergedError, set_trainable

REPO = Path(__file__).resolve().parents[1]


#: ResNet-50 at 64 px, one image per step, few ROIs (Matterport's defaults otherwise).
TINY = dict(NAME="tiny", IMAGES_PER_GPU=1, BACKBONE="resnet50", IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=64,
            RPN_ANCHOR_SCALES=[8, 16, 32, 64, 128], TRAIN_ROIS_PER_IMAGE=8, POST_NMS_ROIS_TRAINING=64,
            PRE_NMS_LIMIT=256, MAX_GT_INSTANCES=2, FPN_CLASSIF_FC_LAYERS_SIZE=64, STEPS_PER_EPOCH=1,
            VALIDATION_STEPS=0, SEED=3)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from mrcnn.model import MaskRCNN
    return MaskRCNN("training", make_config("matterport", **TINY), str(tmp_path_factory.mktemp("logs")))


def _changed(before, after) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_training_model_inputs_and_outputs(tiny_model):
    km = tiny_model.keras_model
    assert [t.name.split(":")[0] for t in km.inputs] == list(INPUT_NAMES)
    names = [layer.name for layer in km.layers]
    for name in (*LOSS_NAMES, "ROI", "proposal_targets", "output_rois", "anchors", "rpn_model"):
        assert name in names
    assert len(km.outputs) == 14
    config = tiny_model.config
    assert km.outputs[6].shape[1] == int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO)


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


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from factories import make_config
    from helpers import array_dataset, lesion_pairs, weights_of
    from mrcnn.model import MaskRCNN
    model = MaskRCNN("training", make_config("matterport", **{tiny!r}), {model_dir!r})
    path = model.find_last()
    model.load_weights(path, by_name=True)
    km = model.keras_model
    result = {{"path": path, "epoch": model.epoch, "log_dir": model.log_dir,
              "loaded_sum": float(np.sum(weights_of(km, "mrcnn_class_logits")[0]))}}
    conv1, bn = weights_of(km, "conv1"), weights_of(km, "bn_conv1")
    dataset = array_dataset(lesion_pairs(3))
    model.train(dataset, dataset, 0.01, 2, "all")
    result["end_epoch"] = model.epoch
    result["conv1_changed"] = any(not np.array_equal(a, b) for a, b in zip(conv1, weights_of(km, "conv1")))
    result["bn_stats_frozen"] = all(np.array_equal(a, b) for a, b in zip(bn[2:], weights_of(km, "bn_conv1")[2:]))
    print("RESULT" + json.dumps(result))
""")


def test_heads_resume_all_in_new_process_and_nan_guard(tiny_model):
    """Epoch 1 'heads' here; epoch 2 'all' in a new process from find_last(); then a NaN epoch."""
    km = tiny_model.keras_model
    dataset = array_dataset(lesion_pairs(3))
    backbone = weights_of(km, "res2a_branch2a") + weights_of(km, "conv1") + weights_of(km, "bn_conv1")
    heads = weights_of(km, "mrcnn_class_logits") + weights_of(km, "rpn_model", "rpn_conv_shared")
    heads += weights_of(km, "fpn_p2")

    tiny_model.train(dataset, dataset, 0.01, 1, "heads")
    after_backbone = weights_of(km, "res2a_branch2a") + weights_of(km, "conv1") + weights_of(km, "bn_conv1")
    after_heads = weights_of(km, "mrcnn_class_logits") + weights_of(km, "rpn_model", "rpn_conv_shared")
    after_heads += weights_of(km, "fpn_p2")
    assert not _changed(backbone, after_backbone), "layers='heads' changed the backbone"
    assert all(_changed([b], [a]) for b, a in zip(heads, after_heads, strict=True))
    log_dir = Path(tiny_model.log_dir)
    first = log_dir / "mask_rcnn_tiny_0001.h5"
    assert first.exists() and tiny_model.epoch == 1 and tiny_model.find_last() == str(first)
    assert json.loads((log_dir / "config.json").read_text())["NAME"] == "tiny"

    script = RESUME_SCRIPT.format(tests=str(REPO / "tests"), model_dir=tiny_model.model_dir, tiny=TINY)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert result["path"] == str(first) and result["epoch"] == 1 and result["log_dir"] == str(log_dir)
    assert result["loaded_sum"] == pytest.approx(float(np.sum(after_heads[0])), rel=1e-6)
    assert result["end_epoch"] == 2 and result["conv1_changed"], "layers='all' left conv1 unchanged"
    assert result["bn_stats_frozen"], "TRAIN_BN False must keep BatchNorm moving statistics"
    second = log_dir / "mask_rcnn_tiny_0002.h5"
    assert second.exists() and sorted(p.name for p in log_dir.parent.iterdir()) == [log_dir.name]
    rows = (log_dir / "training.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["epoch", "loss"] and set(LOSS_NAMES) <= set(rows[0].split(","))
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]

    # this process is still at epoch 1: a NaN loss in its epoch 2 must not overwrite the good _0002
    stamp = second.stat().st_mtime_ns
    good = dict(tiny_model.config.LOSS_WEIGHTS)
    tiny_model.config.LOSS_WEIGHTS = {**good, "mrcnn_class_loss": float("nan")}
    try:
        with pytest.raises(TrainingDivergedError, match="step 1.*mrcnn_class_loss"):
            tiny_model.train(dataset, dataset, 0.01, 2, "heads")
    finally:
        tiny_model.config.LOSS_WEIGHTS = good
    assert second.stat().st_mtime_ns == stamp and tiny_model.epoch == 1


# -------------------------------------------------------------------------------------------
# Learning works: random init -> useful lesion masks on held-out synthetic images
# (tests/learning_check.py holds the run; `python tests/learning_check.py --mutation all` breaks
# each loss and target in turn and shows that these assertions catch it).

#: Measured (tests/learning_check.py, 240 steps from random init, BatchNorm on batch statistics,
#: deterministic ops, 2 busy AVX2 cores, 2026-12-07): mean held-out Jaccard 0.77 / 0.79 at SEED 2 /
#: 7 (mask mAP50 1.0 both), 0.72, 0.73, 0.71, 0.74 at SEED 3-6; median total loss 6.4-8.5 (peak
#: decile) -> 1.1-1.6; the box head's loss ends at 0.44-0.60 of its peak, the others lower.
#: Mutations (learning_check.py --mutation ...) fail learning_check.failures(): mask targets
#: inverted (Jaccard 0.06), mask targets shifted (0.21, mAP50 0.0), RPN targets all negative (0.005,
#: and four losses stuck at zero), class labels swapped (mAP50 0.26: the union mask can still look
#: right, the ranking cannot; Jaccard 0.48 and 0.75 in two runs), any loss zeroed (its logged curve
#: is zero and cannot fall; not re-run). Zeroed RPN box targets are not caught here (Jaccard 0.82 /
#: 0.88, mAP50 1.0: the second stage makes up for plain anchors); tests/test_targets.py checks those
#: deltas by hand and against Matterport. Before 2026-12-07 (180 steps, frozen BatchNorm, mean-based
#: deciles) runs ranged 0.0-0.83 and the first or both seeds failed in CI. A failing first run is
#: retried once with another SEED, and the second must pass.
RETRY_SEED = 7


@pytest.mark.slow
def test_learning_works_from_random_init(tmp_path):
    from learning_check import deciles, failures, learn_config, run_learning

    config = learn_config()
    for attempt in (1, 2):
        result = run_learning(tmp_path / f"attempt{attempt}", config)
        curves, scores = result["curves"], result["scores"]
        print(f"\nLEARNING (SEED {config.SEED}) median loss per decile of {len(curves['loss'])} steps: "
              f"{deciles(curves['loss'])}; mean Jaccard {result['jaccard']:.3f} (min {min(scores):.2f}, "
              f"images with a detection {result['detected']}/{len(scores)}), mask mAP50 {result['map50']:.3f}")
        for name in LOSS_NAMES:
            print(f"  {name}: {deciles(curves[name])}")
        problems = failures(result)
        if not problems:
            return
        print("  failed: " + "; ".join(problems))
        config = learn_config(SEED=RETRY_SEED)
    pytest.fail("learning failed with two seeds: " + "; ".join(problems))
