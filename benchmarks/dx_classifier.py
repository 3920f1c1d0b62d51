#!/usr/bin/env python
"""Issue 14's bar as a peer benchmark: a separate 7-class classifier (ResNet-18 layout at half
width, 128 px) trained from random weights for a wall-clock / CPU budget, then scored on the val
split with the same diagnosis metrics as ``benchmarks/quality.py``.

::

    python benchmarks/dx_classifier.py                                   # 30 min on ham10000_200
    python benchmarks/dx_classifier.py --budget-min 40 --cpu-budget-s 3140 --record r.jsonl --label peer
    python benchmarks/dx_classifier.py --budget-min 3 --max-val 200      # a quick check

The issue's bar was measured on another (faster) machine; this script trains that classifier by
the issue's protocol on *this* machine, so that it and ``quality.py --config ham10000_dx`` can be
compared at the same CPU budget (``--cpu-budget-s``) on the same hardware.

What it does:

1. scans ``--dataset`` with :func:`lesions.scan_and_split` and the ``ham10000_dx`` preset (its
   ``CLASSES``, and the ``split`` column of ``metadata.csv``): the train / val ids and the
   ``dx`` labels are exactly those ``quality.py --config ham10000_dx`` uses;
2. builds :func:`resnet18` (basic blocks [2, 2, 2, 2], stem 7x7 stride 2 + 3x3 max pool, widths
   32-64-128-256, BatchNorm, global average pool, dense softmax), float32, random weights;
3. input: each JPEG decoded and resized keeping its aspect ratio so the longer side is ``--size``
   (200x150 -> 128x96), zero-padded centred to ``--size`` square, then ``MEAN_PIXEL`` subtracted:
   the Mask R-CNN preset's own input (Matterport's "square" mode and ``mold_image``), so both
   models see the same pixels; training adds random horizontal / vertical flips and a random
   multiple of 90 degrees (the 8 symmetries of the square); a tf.data pipeline decodes in
   parallel and prefetches, in this process, so ``--cpu-budget-s`` counts it;
4. trains with batch 32, AdamW (the Mask R-CNN's: Keras's with TF's fused kernel; ``--lr`` 1e-3,
   decoupled ``--weight-decay`` 0.01, not on BatchNorm gamma / beta: the rule of
   ``mrcnn.training.make_optimizer``), balanced class weights
   n / (K n_c) of the train split in the cross-entropy, the rate set before every step by
   :class:`benchmarks.time_budget.TimeBudget` (``--warmup-steps`` linear warm-up, then cosine over
   the budget's share spent: wall, CPU seconds or steps, whichever is furthest), until the budget
   is spent;
5. predicts the val split (all, or the same seeded ``--max-val`` sample as ``quality.py``;
   ``--tta`` also averages the probabilities of identity, h-flip, v-flip and rot90, as
   ``lesionkit.tta`` does), scores it with :func:`lesionkit.diagnosis_metrics.diagnosis_metrics`
   and prints ONE JSON line on stdout (progress goes to stderr), also appended to ``--record``;
6. unless ``--no-shift``, scores the same way the val images redrawn by quality.py's shift check
   (:mod:`benchmarks.shift_check`, same ``--shift-seed``: other scales, crops, colours,
   illumination, vignettes, rulers and hairs) as a ``shift`` object with the accuracy per kind,
   so both models are compared on the proxy for unseen cameras too.

The JSON's ``diagnosis`` object has quality.py's fields (``balanced_accuracy``, ``accuracy``,
``macro_auc``, ``mel_sensitivity``, ``mel_specificity``, ``recall``, ``n_diagnosed``) plus
``precision`` and ``auc`` per class and the confusion matrix; the run has quality.py's
``steps``, ``epochs``, ``train_seconds``, ``train_cpu_seconds``, ``other_load_share``, ... plus
``images_per_cpu_second``, the machine (CPU model, avx512f, native bfloat16) and the git commit.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

import lesions  # noqa: E402  (light: TensorFlow is imported when the model is built)
from benchmarks.budget import CpuMeter  # noqa: E402
from benchmarks.quality import (  # noqa: E402
    BASELINE_CLASSIFIER,
    DEFAULT_DATASET,
    _round,
    diagnosis_scores,
    emit_record,
    run_reporting_errors,
    sample_pairs,
)
from mrcnn.errors import UserError  # noqa: E402

#: The preset whose CLASSES, split (VALIDATION_FRACTION, SEED) and MEAN_PIXEL the peer uses.
PRESET = "ham10000_dx"
#: Channels of the four stages: ResNet-18's 64-128-256-512 at half width.
HALF_WIDTH = (32, 64, 128, 256)
#: Basic blocks per stage (ResNet-18).
BLOCKS = (2, 2, 2, 2)
#: PyTorch's BatchNorm defaults (momentum 0.1 there = 0.9 in Keras' convention).
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5
#: TTA variants, as lesionkit.tta.TRANSFORMS.
TTA_VARIANTS = ("identity", "hflip", "vflip", "rot90")


class DatasetError(UserError):
    """The dataset cannot serve this benchmark (one line, exit status 2)."""


# -------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """All options."""
    p = argparse.ArgumentParser(prog="dx_classifier", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(DEFAULT_DATASET),
                   help="images/ + masks/ + metadata.csv (image_id, dx, split) (default ../shared/data/ham10000_200)")
    p.add_argument("--budget-min", type=float, default=30.0, help="training wall clock in minutes (default 30)")
    p.add_argument("--cpu-budget-s", type=float, default=None, metavar="S",
                   help="also stop when this process has used S CPU seconds since training started (input"
                        " pipeline included; the schedule ends there too); the wall budget still applies")
    p.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps (the schedule"
                   " then ends there too)")
    p.add_argument("--seed", type=int, default=42, help="weights, shuffling and augmentation (default 42)")
    p.add_argument("--max-val", type=int, default=0, metavar="N",
                   help="score a seeded sample of N val images, the same as quality.py's (0 = all)")
    p.add_argument("--size", type=int, default=128, help="input side in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW decoupled weight decay, not on BatchNorm gamma/beta (default 0.01)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--tta", action="store_true", help="also score the mean of the identity, h-flip, v-flip and"
                   " rot90 probabilities (a \"tta\" object)")
    p.add_argument("--no-shift", action="store_true", help="skip the shift check (scored by default)")
    p.add_argument("--shift-seed", type=int, default=0, help="seed of the shift check (default 0, as quality.py)")
    p.add_argument("--shift-dir", metavar="DIR", help="write the shifted images here (default: a temporary"
                   " folder, removed at the end)")
    p.add_argument("--jit", action="store_true", help="compile the train step with XLA (default off, as the"
                   " Mask R-CNN training)")
    p.add_argument("--log-every", type=int, default=50, help="progress line every N steps (default 50)")
    p.add_argument("--record", metavar="FILE", help="also append the JSON line to FILE")
    p.add_argument("--label", default="", help="free text stored in the JSON (what this run tries)")
    return p


# -------------------------------------------------------------------------------------------
# Data


def check_metadata(root: Path) -> None:
    """DatasetError unless ``root`` is a folder whose metadata.csv has image_id, dx and split columns."""
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    path = root / "metadata.csv"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist (needs image_id, dx and split columns)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path} cannot be read: {exc}") from None
    missing = [c for c in ("image_id", "dx", "split") if c not in {h.strip() for h in header}]
    if missing:
        raise DatasetError(f"{path} has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}"
                           " (needs image_id, dx and split)")


def load_split(root: Path, max_val: int) -> dict[str, Any]:
    """Train / val image paths and class indices from the toolkit's scan (the preset's split)."""
    check_metadata(root)
    config = lesions.build_config(PRESET, [])
    report, train_ids, val_ids = lesions.scan_and_split(root, config)
    if not val_ids:
        raise DatasetError(f"dataset {root} has no validation images")
    by_id = {p.image_id: p for p in report.pairs}
    classes = [str(c) for c in config.CLASSES]
    train = [by_id[i] for i in train_ids]
    val = sample_pairs([by_id[i] for i in val_ids], max_val)
    return {"classes": classes, "mean_pixel": [float(v) for v in config.MEAN_PIXEL],
            "train_paths": [str(p.image_path) for p in train],
            "train_labels": [classes.index(p.diagnosis) for p in train],
            "val_paths": [str(p.image_path) for p in val], "val_truth": [p.diagnosis for p in val],
            "val_ids": [p.image_id for p in val], "val_pairs": val}


def train_class_weights(data: dict[str, Any]) -> list[float]:
    """scikit-learn's "balanced" weights n / (K n_c) of the train labels, by the model's own rule
    (:func:`mrcnn.diagnosis.balanced_class_weights` without sampling), in ``data["classes"]`` order."""
    from mrcnn.diagnosis import balanced_class_weights

    return balanced_class_weights([data["classes"][k] for k in data["train_labels"]], data["classes"])


def load_image(path, size: int, mean_pixel):
    """Decode a JPEG/PNG, resize it keeping its aspect so the longer side is ``size`` (bilinear,
    antialiased), zero-pad it centred to size x size and subtract ``mean_pixel``: Matterport's
    "square" mode and mold_image (200x150 -> 128x96 + 16 rows above and below)."""
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize_with_pad(tf.cast(image, tf.float32), size, size, antialias=True)
    return image - tf.constant(mean_pixel, tf.float32)


def augment(image):
    """Random horizontal / vertical flips and a random multiple of 90 degrees."""
    import tensorflow as tf

    image = tf.image.random_flip_left_right(image)
    image = tf.image.random_flip_up_down(image)
    return tf.image.rot90(image, tf.random.uniform([], 0, 4, dtype=tf.int32))


def train_dataset(data: dict[str, Any], size: int, batch: int, weights: list[float], seed: int):
    """Shuffled, repeated, augmented (image, label, weight) batches; parallel decode, prefetch."""
    import tensorflow as tf

    auto = tf.data.AUTOTUNE
    table = tf.constant(weights, tf.float32)
    ds = tf.data.Dataset.from_tensor_slices((data["train_paths"], data["train_labels"]))
    ds = ds.shuffle(len(data["train_paths"]), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.map(lambda p, y: (augment(load_image(p, size, data["mean_pixel"])), y, tf.gather(table, y)),
                num_parallel_calls=auto, deterministic=False)
    return ds.batch(batch, drop_remainder=True).prefetch(auto)


def val_dataset(data: dict[str, Any], size: int, batch: int):
    """The val images in order, batched."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(data["val_paths"])
    ds = ds.map(lambda p: load_image(p, size, data["mean_pixel"]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


# -------------------------------------------------------------------------------------------
# Model


def resnet18(n_classes: int = 7, size: int = 128, widths: tuple[int, ...] = HALF_WIDTH,
             blocks: tuple[int, ...] = BLOCKS):
    """ResNet-18's layout (torchvision's: 7x7/2 conv, 3x3/2 max pool, basic blocks with a 1x1/2
    conv + BN shortcut where the shape changes, global average pool, dense) at ``widths``;
    convolutions without bias (BatchNorm follows), He-normal (fan-out) initialisation; float32
    softmax output. ``widths`` (64, 128, 256, 512) with 1000 classes is ResNet-18 itself."""
    import keras
    from keras import layers

    def conv(x, filters, kernel, stride, name):
        if stride > 1:  # torchvision's symmetric padding (Keras' "same" pads more at the end)
            x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        return layers.Conv2D(filters, kernel, strides=stride, padding="valid" if stride > 1 else "same",
                             use_bias=False, kernel_initializer=_he_fan_out(), name=name)(x)

    def bn(x, name):
        return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)

    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Activation("relu", name="stem_relu")(bn(conv(inputs, widths[0], 7, 2, "stem_conv"), "stem_bn"))
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)  # after ReLU: zeros pad like -inf
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    for stage, (filters, count) in enumerate(zip(widths, blocks, strict=True), start=1):
        for block in range(count):
            stride = 2 if stage > 1 and block == 0 else 1
            name = f"stage{stage}_block{block + 1}"
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = bn(layers.Conv2D(filters, 1, strides=stride, use_bias=False,  # 1x1: no padding
                                            kernel_initializer=_he_fan_out(), name=f"{name}_down_conv")(x),
                              f"{name}_down_bn")
            y = layers.Activation("relu", name=f"{name}_relu1")(bn(conv(x, filters, 3, stride, f"{name}_conv1"),
                                                                    f"{name}_bn1"))
            y = bn(conv(y, filters, 3, 1, f"{name}_conv2"), f"{name}_bn2")
            x = layers.Activation("relu", name=f"{name}_relu2")(layers.Add(name=f"{name}_add")([y, shortcut]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="resnet18_" + "_".join(map(str, widths)))


def _he_fan_out():
    import keras

    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def compile_model(model, lr: float, weight_decay: float, jit: bool) -> None:
    """AdamW (the one-model's, with TF's fused update: :class:`mrcnn.optimizers.FusedAdamW`; decay
    off for BatchNorm gamma / beta, by name as mrcnn.training.make_optimizer), sparse cross-entropy
    (the class weights come as sample weights)."""
    import keras

    from mrcnn.losses import UNDECAYED_NAMES
    from mrcnn.optimizers import FusedAdamW

    optimizer = FusedAdamW(learning_rate=lr, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=list(UNDECAYED_NAMES))
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(), jit_compile=jit)


# -------------------------------------------------------------------------------------------
# Training and scoring


def progress_callback(log_every: int, steps_per_epoch: int):
    """A Keras callback printing ``epoch, steps, loss, lr, elapsed`` to stderr."""
    import keras

    class Progress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.steps, self.start, self.epoch = 0, time.time(), 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            if log_every and self.steps % log_every == 0:
                self.line(logs, "")

        def on_epoch_end(self, epoch, logs=None):
            self.line(logs, " (epoch end)")

        def line(self, logs, tail: str) -> None:
            loss = float((logs or {}).get("loss", float("nan")))
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            print(f"epoch {self.steps / steps_per_epoch:6.2f} (keras {self.epoch + 1}) step {self.steps}"
                  f" loss {loss:.4f} lr {lr:.2e} elapsed {time.time() - self.start:.0f}s{tail}",
                  file=sys.stderr, flush=True)

    return Progress()


def train(args: argparse.Namespace, data: dict[str, Any], model) -> dict[str, Any]:
    """Fit until the budget is spent; facts about the run."""
    from benchmarks.time_budget import TimeBudget

    weights = train_class_weights(data)
    steps_per_epoch = max(len(data["train_paths"]) // args.batch_size, 1)
    dataset = train_dataset(data, args.size, args.batch_size, weights, args.seed)
    compile_model(model, args.lr, args.weight_decay, args.jit)
    budget = TimeBudget(args.budget_min * 60.0, base_lr=args.lr, schedule="cosine", warmup_steps=args.warmup_steps,
                        max_steps=args.max_steps, cpu_seconds=args.cpu_budget_s)
    meter = CpuMeter().start()
    budget.start = time.time()
    model.fit(dataset, epochs=1_000_000, steps_per_epoch=steps_per_epoch, verbose=0, shuffle=False,
              callbacks=[budget, progress_callback(args.log_every, steps_per_epoch)])
    load = meter.stop()
    cpu = budget.cpu_used()
    images = budget.steps * args.batch_size
    return {"train_seconds": round(time.time() - budget.start, 1), "steps": budget.steps,
            "epochs": round(images / len(data["train_paths"]), 3), "train_cpu_seconds": round(cpu, 1),
            "images_per_cpu_second": round(images / cpu, 3) if cpu > 0 else None,
            "final_loss": round(budget.last_logs.get("loss", float("nan")), 4), "final_lr": budget.last_lr,
            "class_weights": {c: round(w, 4) for c, w in zip(data["classes"], weights, strict=True)},
            **budget.steady_step_times(), **load}


def tta_variant(images, name: str):
    """One of lesionkit.tta's transforms on a batch [B, H, W, C]."""
    import tensorflow as tf

    return {"identity": lambda a: a, "hflip": lambda a: tf.reverse(a, [2]), "vflip": lambda a: tf.reverse(a, [1]),
            "rot90": lambda a: tf.image.rot90(a, 1)}[name](images)


def predict(model, data: dict[str, Any], size: int, variants: tuple[str, ...]) -> Any:
    """Mean of the variants' class probabilities over the val images, [N, K]."""
    import numpy as np

    chunks = []
    for images in val_dataset(data, size, 64):
        probs = [model(tta_variant(images, v), training=False) for v in variants]
        chunks.append(np.mean([np.asarray(p) for p in probs], axis=0))
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, len(data["classes"])))


def score(model, data: dict[str, Any], size: int, variants: tuple[str, ...],
          kinds: dict[str, str] | None = None) -> dict[str, Any]:
    """quality.py's diagnosis object (+ precision, AUC per class, confusion matrix) and timing;
    with ``kinds`` (image id -> shift kind) also the accuracy per kind, as quality.py's shift block."""
    from benchmarks.shift_check import kind_accuracy
    from lesionkit.diagnosis_metrics import diagnosis_metrics, predicted_names

    started = time.time()
    probs = predict(model, data, size, variants)
    seconds = time.time() - started
    metrics = diagnosis_metrics(data["val_truth"], probs, data["classes"])
    by_kind = {}
    if kinds is not None:
        rows = [{"image_id": i, "true_dx": t, "pred_dx": p} for i, t, p in
                zip(data["val_ids"], data["val_truth"], predicted_names(probs, data["classes"]), strict=True)]
        by_kind = {"by_shift_diagnosis_accuracy": kind_accuracy(rows, kinds)}
    diagnosis = diagnosis_scores(metrics)
    diagnosis.update(precision={n: _round(r["precision"]) for n, r in metrics["per_class"].items()},
                     auc={n: _round(r["auc"]) for n, r in metrics["per_class"].items()},
                     support={n: r["support"] for n, r in metrics["per_class"].items()},
                     classes=metrics["classes"], confusion_matrix=metrics["confusion_matrix"])
    return {"diagnosis": diagnosis, "eval_seconds": round(seconds, 1),
            "seconds_per_image": round(seconds / max(len(data["val_paths"]), 1), 4), **by_kind}


def score_shift(args: argparse.Namespace, model, data: dict[str, Any]) -> dict[str, Any]:
    """The ``shift`` object: :func:`score` (and its ``tta``) on the val images under quality.py's
    shift check, written to ``--shift-dir`` or a temporary folder."""
    import tempfile

    from benchmarks.shift_check import write_shift_set

    with tempfile.TemporaryDirectory(prefix="dx_shift_") as temporary:
        folder = Path(args.shift_dir) if args.shift_dir else Path(temporary)
        pairs, kinds = write_shift_set(data["val_pairs"], folder, seed=args.shift_seed)
        shifted = {**data, "val_paths": [str(p.image_path) for p in pairs]}
        block = score(model, shifted, args.size, ("identity",), kinds)
        if args.tta:
            block["tta"] = score(model, shifted, args.size, TTA_VARIANTS, kinds)
    return block


# -------------------------------------------------------------------------------------------
# Facts about the machine and the code


def machine_facts() -> dict[str, Any]:
    """CPU model and core count (benchmarks.workloads.cpu_model, as the speed records), the AVX-512
    flag of /proc/cpuinfo, native bfloat16 by the rule MIXED_PRECISION "auto" uses
    (:func:`mrcnn.config.cpu_has_bf16`), TensorFlow / Keras versions."""
    import keras
    import tensorflow as tf

    from benchmarks.workloads import cpu_model
    from mrcnn.config import cpu_has_bf16

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    lines = re.findall(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(lines[0].split()) if lines else set()
    return {"cpu": cpu_model(), "avx512f": "avx512f" in flags, "native_bfloat16": cpu_has_bf16(cpuinfo),
            "tensorflow": tf.__version__, "keras": keras.__version__}


def git_commit() -> dict[str, Any]:
    """HEAD of the checkout and whether tracked files differ from it (None outside git)."""
    def git(*words: str) -> str | None:
        try:
            out = subprocess.run(["git", *words], cwd=REPO_DIR, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": head, "git_dirty": None if status is None else bool(status)}


# -------------------------------------------------------------------------------------------
# Main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON record."""
    started = time.time()
    data = load_split(Path(args.dataset), args.max_val)
    print(f"dx_classifier: {len(data['train_paths'])} train, {len(data['val_paths'])} val images;"
          f" {args.size} px square, batch {args.batch_size}", flush=True)
    import keras

    keras.utils.set_random_seed(args.seed)
    model = resnet18(len(data["classes"]), args.size)
    setup_seconds = time.time() - started
    trained = train(args, data, model)
    scores = score(model, data, args.size, ("identity",))
    if args.tta:
        scores["tta"] = score(model, data, args.size, TTA_VARIANTS)
    if not args.no_shift:
        scores["shift"] = score_shift(args, model, data)
    return {"label": args.label, "peer": "dx_classifier", "model": model.name, "params": int(model.count_params()),
            "size": args.size, "resize": "square: longer side to size, zero pad, minus MEAN_PIXEL",
            "budget_min": args.budget_min, "cpu_budget_s": args.cpu_budget_s, "max_steps": args.max_steps,
            "batch_size": args.batch_size, "n_train": len(data["train_paths"]), "n_val": len(data["val_paths"]),
            **{k: trained[k] for k in ("train_seconds", "steps", "epochs", "train_cpu_seconds",
                                       "images_per_cpu_second")},
            **scores, "baseline_classifier": dict(BASELINE_CLASSIFIER),
            "other_load_share": trained["other_load_share"], "own_cpu_share": trained["own_cpu_share"],
            "cpus": trained["cpus"], "step_seconds": trained["step_seconds"],
            "step_cpu_seconds": trained["step_cpu_seconds"], "final_loss": trained["final_loss"],
            "final_lr": trained["final_lr"], "lr": args.lr, "weight_decay": args.weight_decay,
            "warmup_steps": args.warmup_steps, "schedule": "cosine", "augment": "flips", "jit": args.jit,
            "seed": args.seed, "shift_seed": None if args.no_shift else args.shift_seed,
            "class_weights": trained["class_weights"], "machine": machine_facts(),
            **git_commit(), "dataset": str(args.dataset), "setup_seconds": round(setup_seconds, 1),
            "total_seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with progress on stderr; print the JSON line on stdout."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.budget_min <= 0:
        parser.error("--budget-min must be > 0")
    if args.size < 32 or args.batch_size < 1:
        parser.error("--size must be >= 32 and --batch-size >= 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    record = run_reporting_errors(run, args, "dx_classifier")
    if record is None:
        return 2
    emit_record(record, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
