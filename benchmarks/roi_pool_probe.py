"""Probe (issue 14): how the ROI class head's per-ROI probabilities become the image's diagnosis,
and what averaging the last epochs' weights does, on a trained ``ham10000_dx`` run, without training.

For each val image it keeps the class head's softmax over every proposal ([R, 1 + K]) and the
proposals' boxes (y1, x1, y2, x2, normalised), then scores the pooling rules offline:

* ``top``: the ROI with the highest foreground probability (the model's RoiDiagnosis today);
* ``fg_mean``: the foreground-probability-weighted mean over all non-padding ROIs;
* ``topk<k>``: the mean over the k most lesion-like ROIs;
* ``iou<t>``: the fg-weighted mean over the ROIs overlapping the top ROI by IoU >= t.

``--average N`` loads the mean of the weights of the last N epoch checkpoints instead of the
last one (a single model; BN moving statistics averaged as well).

    python benchmarks/roi_pool_probe.py --run logs/quality/RUN --average 1 --out probe.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder with config.json and mask_rcnn_*.h5 checkpoints")
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "ham10000_200"))
    p.add_argument("--average", type=int, default=1, help="average the last N epoch checkpoints (1 = last only)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference config value (e.g. RPN_NMS_THRESHOLD=0.9)")
    p.add_argument("--max-val", type=int, default=0, help="first N val images only (0 = all)")
    p.add_argument("--out", required=True, help="JSON with the scores of every rule")
    return p.parse_args(argv)


def val_labels(dataset: Path, max_val: int) -> list[tuple[Path, str]]:
    """(image path, dx) of the val split, in metadata order."""
    with open(dataset / "metadata.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    rows = rows[:max_val] if max_val else rows
    return [(dataset / "images" / f"{r['image_id']}.jpg", r["dx"]) for r in rows]


def averaged_model(run: Path, count: int, overrides: list[str]):
    """Inference MaskRCNN with the mean weights of the last ``count`` checkpoints of ``run``."""
    import lesions
    from lesionkit.prediction_run import load_inference_model

    checkpoints = sorted(run.glob("mask_rcnn_*.h5"))[-count:]
    saved, _ = lesions.saved_run_config(checkpoints[-1])
    config = lesions.build_config(None, overrides, saved, inference=True, batch_size=8)
    model = load_inference_model(config, checkpoints[-1], run)
    weights = [[w.numpy() for w in model.keras_model.weights]]
    for path in checkpoints[:-1]:
        model.load_weights(str(path), by_name=True, verbose=0)
        weights.append([w.numpy() for w in model.keras_model.weights])
    for variable, values in zip(model.keras_model.weights, zip(*weights, strict=True), strict=True):
        variable.assign(np.mean(values, axis=0).astype(values[0].dtype))
    return model, config, [p.name for p in checkpoints]


def roi_outputs(model, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(class probs [N, R, 1 + K], rois [N, R, 4]) of ``images`` (one batch)."""
    import tensorflow as tf

    molded, metas, _ = model.mold_inputs(images)
    anchors = model.batch_anchors(molded)
    outputs = model.keras_model([tf.constant(molded), tf.constant(metas), tf.constant(anchors, tf.float32)],
                                training=False)
    return outputs[1].numpy().astype(np.float64), outputs[4].numpy().astype(np.float64)


def iou_with(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (y1, x1, y2, x2) box with boxes [R, 4]."""
    y1, x1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    y2, x2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(y2 - y1, 0, None) * np.clip(x2 - x1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def pooled(probs: np.ndarray, rois: np.ndarray, rule: str) -> np.ndarray:
    """One image's diagnosis [K] from its ROIs' probs [R, 1 + K] by ``rule``; "top" and "fg_mean"
    are the model's own rules (:func:`mrcnn.diagnosis.pooled_roi_probs`)."""
    from mrcnn.diagnosis import pooled_roi_probs

    if rule in ("top", "fg_mean"):
        return pooled_roi_probs(probs, rois, "top" if rule == "top" else "mean")
    valid = (rois[:, 2] > rois[:, 0]) & (rois[:, 3] > rois[:, 1])
    probs, rois = probs[valid], rois[valid]
    fg = 1.0 - probs[:, 0]
    order = np.argsort(-fg)
    if rule.startswith("topk"):
        weights = np.zeros(len(fg))
        weights[order[:int(rule[4:])]] = 1.0
    elif rule.startswith("iou"):
        weights = fg * (iou_with(rois[order[0]], rois) >= float(rule[3:]))
    else:
        raise ValueError(rule)
    conditional = probs[:, 1:] / np.maximum(probs[:, 1:].sum(axis=1, keepdims=True), 1e-12)
    out = (weights[:, None] * conditional).sum(axis=0)
    return out / max(out.sum(), 1e-12)


RULES = ["top", "fg_mean", "topk3", "topk5", "topk10", "topk20", "iou0.5", "iou0.7"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lesionkit.diagnosis_metrics import diagnosis_metrics
    from mrcnn.imaging import read_image

    started = time.time()
    model, config, used = averaged_model(Path(args.run), args.average, args.set)
    pairs = val_labels(Path(args.dataset), args.max_val)
    per_rule = {rule: [] for rule in RULES}
    batch = int(config.BATCH_SIZE)
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        images = [read_image(path) for path, _ in chunk]
        images += [images[-1]] * (batch - len(images))
        probs, rois = roi_outputs(model, images)
        for i in range(len(chunk)):
            for rule in RULES:
                per_rule[rule].append(pooled(probs[i], rois[i], rule))
    classes = list(config.CLASSES)
    truth = [dx for _, dx in pairs]
    scores = {}
    for rule in RULES:
        m = diagnosis_metrics(truth, np.array(per_rule[rule]), classes)
        scores[rule] = {k: round(float(m[k]), 4) for k in ("balanced_accuracy", "accuracy", "macro_auc")}
    record = {"run": args.run, "checkpoints": used, "set": args.set, "n_val": len(pairs), "scores": scores,
              "seconds": round(time.time() - started, 1)}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
