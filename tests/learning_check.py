"""Learning check shared by tests/test_training.py and the mutation check (issue 3).

``run_learning()`` trains a small ResNet-50 Mask R-CNN from random init on synthetic lesion
images and scores the predicted lesion masks (Jaccard) on held-out ones. Run as a script, it
breaks one loss or target on purpose (``--mutation NAME``) to show that the learning test
notices::

    python tests/learning_check.py --mutation all      # every mutation in turn (~4-6 min each)
    python tests/learning_check.py --mutation none     # the unbroken pipeline

It prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factories import make_config  # noqa: E402

from mrcnn.config import LOSS_NAMES, Config  # noqa: E402

#: ResNet-50 at 128 px, small heads, anchors for lesions filling much of the image (on Matterport's
#: defaults otherwise). SEED fixes the initial weights, data order and augmentation. BatchNorm on
#: batch statistics (TRAIN_BN True), as the from-scratch presets train: with Matterport's frozen
#: BatchNorm a randomly initialised ResNet-50 is an unnormalised network, whose runs collapsed (no
#: detection at all) in 2 of 4 tries once its conv biases trained as Matterport's do.
LEARN = dict(NAME="learn", IMAGES_PER_GPU=1, BACKBONE="resnet50", IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128,
             RPN_ANCHOR_SCALES=[16, 32, 64, 96, 128], RPN_TRAIN_ANCHORS_PER_IMAGE=64, PRE_NMS_LIMIT=500,
             POST_NMS_ROIS_TRAINING=100, POST_NMS_ROIS_INFERENCE=50, TRAIN_ROIS_PER_IMAGE=16, MAX_GT_INSTANCES=2,
             TOP_DOWN_PYRAMID_SIZE=64, FPN_CLASSIF_FC_LAYERS_SIZE=128, MASK_POOL_SIZE=7, MASK_SHAPE=[14, 14],
             MINI_MASK_SHAPE=[28, 28], STEPS_PER_EPOCH=80, VALIDATION_STEPS=0, LEARNING_RATE=0.01,
             DETECTION_MIN_CONFIDENCE=0.0, DETECTION_MAX_INSTANCES=10, TRAIN_BN=True, SEED=2)


def learn_config(**overrides) -> Config:
    """The learning run's config (:data:`LEARN`), ``overrides`` applied through ``Config.set``."""
    return make_config("matterport", **(LEARN | overrides))


#: Epochs of STEPS_PER_EPOCH steps.
EPOCHS = 3


def synthetic_lesions(n: int, seed: int, size: int = 128) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (image uint8 [size, size, 3], mask bool [size, size, 1]): a rotated dark noisy ellipse on noisy skin."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    pairs = []
    for _ in range(n):
        skin = rng.uniform(150, 230, 3)
        image = (skin + rng.normal(0, 12, (size, size, 3))).clip(0, 255)
        cy, cx = rng.uniform(40, 88, 2) * size / 128
        ry, rx = rng.uniform(18, 45, 2) * size / 128
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dy * np.cos(theta) + dx * np.sin(theta)
        v = -dy * np.sin(theta) + dx * np.cos(theta)
        mask = (u / ry) ** 2 + (v / rx) ** 2 <= 1
        colour = skin * rng.uniform(0.25, 0.6)
        image[mask] = (colour + rng.normal(0, 15, (mask.sum(), 3))).clip(0, 255)
        pairs.append((image.astype(np.uint8), mask[:, :, None]))
    return pairs


def predicted_lesion(result: dict, shape) -> np.ndarray:
    """Union of detections scoring >= 0.5, else the best detection; empty if none."""
    scores, masks = result["scores"], result["masks"]
    if len(scores) == 0:
        return np.zeros(shape, bool)
    keep = scores >= 0.5
    if not keep.any():
        keep = scores == scores.max()
    return masks[:, :, keep].any(axis=-1)


def deciles(curve: list[float]) -> list[float]:
    """Medians of consecutive tenths of a per-step curve (medians: at one image per step a single
    hard image can multiply a step's loss; one such step must not decide a decile)."""
    tenth = max(len(curve) // 10, 1)
    return [round(float(np.median(curve[i:i + tenth])), 4) for i in range(0, len(curve), tenth)]


def tail(curve: list[float]) -> float:
    """Median of the last fifth of a per-step curve: where the run ended."""
    return float(np.median(curve[-max(len(curve) // 5, 1):]))


#: Bounds checked by :func:`failures` (and so by the learning test): measured runs are listed in
#: tests/test_training.py next to the test.
MIN_JACCARD = 0.55
#: Mean mask AP at IoU 0.5 (:func:`mrcnn.ap.compute_ap`) over the held-out images: the union mask can
#: look right while the classifier ranks the wrong detections first; AP sees the ranking.
MIN_MAP50 = 0.5
MAX_LOSS_RATIO = 0.35
#: Each of the five losses must end (:func:`tail`) below this fraction of its highest decile: a
#: loss that is zero or constant does not fall like that (wrong targets are for the Jaccard and
#: mAP50 to catch). (The peak, not the first decile: the mask loss starts low while few proposals
#: are positive, then rises.) The box head's loss falls least: to 0.44-0.60 of its peak when measured.
MAX_EACH_LOSS_RATIO = 0.75


def failures(result: dict) -> list[str]:
    """What a run got wrong (empty list: it learned): finite losses, the total and each of the five
    losses falling clearly from their peak decile (to :func:`tail`), mean held-out Jaccard >=
    MIN_JACCARD and mask mAP50 >= MIN_MAP50. Deciles and tails are medians of steps
    (:func:`deciles`); the peak, not the first decile, because with batch-statistics BatchNorm the
    total first rises (the RPN box loss)."""
    curves = result["curves"]
    table = {name: deciles(values) for name, values in curves.items()}
    ends = {name: tail(values) for name, values in curves.items()}
    problems = []
    if not all(math.isfinite(v) for values in curves.values() for v in values):
        problems.append("non-finite loss")
    if not ends["loss"] < MAX_LOSS_RATIO * max(table["loss"]):
        problems.append(f"total loss ended at {ends['loss']:.4f}, not below {MAX_LOSS_RATIO} of its peak: "
                        f"{table['loss']}")
    for name in LOSS_NAMES:
        if not ends[name] < MAX_EACH_LOSS_RATIO * max(table[name]):
            problems.append(f"{name} ended at {ends[name]:.4f}, not below {MAX_EACH_LOSS_RATIO} of its peak: "
                            f"{table[name]}")
    if not result["map50"] >= MIN_MAP50:
        problems.append(f"mask mAP50 {result['map50']:.3f} < {MIN_MAP50}")
    if not result["jaccard"] >= MIN_JACCARD:
        problems.append(f"mean Jaccard {result['jaccard']:.3f} < {MIN_JACCARD} "
                        f"(per image {[round(v, 2) for v in result['scores']]})")
    return problems


def run_learning(model_dir: str | Path, config: Config | None = None, deterministic: bool = True) -> dict:
    """Train from random init, then score held-out images.

    With ``deterministic`` TensorFlow's op determinism is on while it runs (and switched off
    after), so with SEED fixed the run gives the same numbers every time on the same machine and
    TF build: a from-scratch run amplifies thread-order float differences into very different
    models otherwise. Returns ``{"curves": {name: per-step values}, "scores": per-image Jaccard, "jaccard": mean,
    "detected": images with at least one detection, "map50": mean mask AP at IoU 0.5}``; curves
    hold ``loss`` and the 5 losses.
    """
    import keras
    import tensorflow as tf
    from helpers import ArrayDataset
    from tensorflow.python.framework import config as tf_config

    from mrcnn.ap import compute_ap
    from mrcnn.boxes import extract_bboxes
    from mrcnn.input_pipeline import default_augmentation
    from mrcnn.model import MaskRCNN

    if deterministic and not tf_config.is_op_determinism_enabled():
        tf.config.experimental.enable_op_determinism()
        try:
            return run_learning(model_dir, config, deterministic=False)
        finally:
            tf_config.disable_op_determinism()

    config = config or learn_config()
    curves: dict[str, list[float]] = {name: [] for name in ("loss", *LOSS_NAMES)}

    class StepLosses(keras.callbacks.Callback):
        """Per-step losses, recovered from Keras' running epoch means."""

        def on_epoch_begin(self, epoch, logs=None):
            self.previous = dict.fromkeys(curves, 0.0)

        def on_train_batch_end(self, batch, logs=None):
            for name, values in curves.items():
                mean = float(logs[name])
                values.append((batch + 1) * mean - batch * self.previous[name])
                self.previous[name] = mean

    model = MaskRCNN("training", config, str(model_dir))
    model.train(ArrayDataset(synthetic_lesions(200, seed=0)), None, config.LEARNING_RATE, EPOCHS, "all",
                augmentation=default_augmentation(1), custom_callbacks=[StepLosses()])

    inference = MaskRCNN("inference", config, str(model_dir))
    inference.load_weights(model.find_last(), by_name=True)
    scores, aps, detected = [], [], 0
    for image, mask in synthetic_lesions(20, seed=99):
        result = inference.detect([image])[0]
        detected += int(len(result["scores"]) > 0)
        pred = predicted_lesion(result, mask.shape[:2])
        truth = mask[:, :, 0]
        scores.append(float((truth & pred).sum() / max((truth | pred).sum(), 1)))
        aps.append(compute_ap(extract_bboxes(mask), np.ones(1, np.int32), mask, result["rois"],
                              result["class_ids"], result["scores"], result["masks"])[0])
    return {"curves": curves, "scores": scores, "jaccard": float(np.mean(scores)), "detected": detected,
            "map50": float(np.mean(aps))}


# -------------------------------------------------------------------------------------------
# Mutations: each breaks one loss or one target, the way a bug would.

def _patch(module, name: str, replacement: Callable) -> None:
    setattr(module, name, replacement)


def mutate(name: str) -> None:
    """Break one component in this process (before any model is built)."""
    import tensorflow as tf

    from mrcnn import input_pipeline, losses, targets

    if name == "none":
        return
    if name.endswith("_loss_zero"):
        loss_name = name[: -len("_zero")]
        original = getattr(losses, loss_name)
        _patch(losses, loss_name, lambda *a: 0.0 * original(*a))
    elif name == "mask_loss_inverted_target":
        original = losses.mrcnn_mask_loss
        _patch(losses, "mrcnn_mask_loss", lambda t, ids, p: original(1.0 - t, ids, p))
    elif name == "class_loss_swapped_labels":
        original = losses.mrcnn_class_loss
        _patch(losses, "mrcnn_class_loss",
               lambda ids, logits, active: original(1 - tf.minimum(tf.cast(ids, tf.int64), 1), logits, active))
    elif name == "rpn_targets_all_negative":
        original = input_pipeline.build_rpn_targets

        def broken(*a, **k):
            match, deltas = original(*a, **k)
            return np.where(match == 1, -1, match).astype(match.dtype), deltas
        _patch(input_pipeline, "build_rpn_targets", broken)
    elif name == "rpn_deltas_zero":
        original = input_pipeline.build_rpn_targets

        def zero_deltas(*a, **k):
            match, deltas = original(*a, **k)
            return match, np.zeros_like(deltas)
        _patch(input_pipeline, "build_rpn_targets", zero_deltas)
    elif name == "mask_targets_shifted":
        original = targets._mask_targets
        _patch(targets, "_mask_targets", lambda *a: tf.roll(original(*a), shift=[7, 7], axis=[1, 2]))
    else:
        raise SystemExit(f"unknown mutation {name!r}; choose from {', '.join(MUTATIONS)}")


MUTATIONS = ("none", "rpn_class_loss_zero", "rpn_bbox_loss_zero", "mrcnn_class_loss_zero", "mrcnn_bbox_loss_zero",
             "mrcnn_mask_loss_zero", "mask_loss_inverted_target", "class_loss_swapped_labels",
             "rpn_targets_all_negative", "rpn_deltas_zero", "mask_targets_shifted")


def summarise(result: dict) -> dict:
    """Deciles of every curve, mean Jaccard and detections, JSON-ready."""
    return {"jaccard": round(result["jaccard"], 4), "map50": round(result["map50"], 4), "detected": result["detected"],
            "failures": failures(result),
            "min_jaccard": round(min(result["scores"]), 3),
            "deciles": {name: deciles(values) for name, values in result["curves"].items()},
            "finite": all(math.isfinite(v) for values in result["curves"].values() for v in values),
            "curves": {name: [round(v, 4) for v in values] for name, values in result["curves"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutation", default="none", help=f"one of {', '.join(MUTATIONS)} or 'all'")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the LEARN config")
    parser.add_argument("--nondeterministic", action="store_true", help="leave TF op determinism off")
    args = parser.parse_args()
    if args.mutation == "all":
        import subprocess
        extra = [a for kv in args.set for a in ("--set", kv)]
        for name in MUTATIONS:
            subprocess.run([sys.executable, __file__, "--mutation", name, *extra], check=False)
        return
    mutate(args.mutation)
    config = learn_config().apply_overrides(args.set, source="--set").validate()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_learning(tmp, config, deterministic=not args.nondeterministic)
    print(json.dumps({"mutation": args.mutation, "set": args.set, "deterministic": not args.nondeterministic, "seconds": round(time.perf_counter() - start),
                      **summarise(result)}), flush=True)


if __name__ == "__main__":
    main()
