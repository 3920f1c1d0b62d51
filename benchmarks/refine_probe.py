#!/usr/bin/env python
"""Probe of the refinement U-Net alone: train it on HAM10000 crops for MINUTES of wall clock, then
score on 200 val images (seeded sample) the Jaccard of its masks from the true lesion box and from
the true box with each side moved by up to 10 % (an imperfect detector), next to the 28x28
mask-head round trip of the true mask (what the detector's mask head alone can at best give).

    python benchmarks/refine_probe.py 8        # 8 minutes; prints one JSON line
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))
import cv2  # noqa: E402
import numpy as np  # noqa: E402

import lesions  # noqa: E402
from benchmarks.quality import DEFAULT_DATASET, sample_pairs  # noqa: E402
from benchmarks.time_budget import TimeBudget  # noqa: E402
from lesionkit.prediction_files import mask_box  # noqa: E402
from lesionkit.refine.inference import Refiner  # noqa: E402
from lesionkit.refine.settings import RefineSettings  # noqa: E402
from lesionkit.refine.training import train_refiner  # noqa: E402
from mrcnn.imaging import read_image, read_mask  # noqa: E402


def iou(a, b):
    """Jaccard of two bool masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def main() -> None:
    """Train, score, print the JSON line."""
    minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
    config = lesions.build_config("ham10000_cpu", [])
    report, train_ids, val_ids = lesions.scan_and_split(DEFAULT_DATASET, config)
    train_set, = lesions.make_datasets(report, train_ids)
    settings = dataclasses.replace(RefineSettings.from_config(config), enabled=True)
    run = REPO_DIR / "logs" / "refine_probe" / time.strftime("%Y%m%dT%H%M%S")
    run.mkdir(parents=True)
    budget = TimeBudget(minutes * 60, base_lr=settings.learning_rate, schedule="cosine", warmup_steps=50)
    t0 = time.time()
    last = train_refiner(settings, train_set, None, run, epochs=10**6, callbacks=[budget], verbose=2)
    print("trained", budget.steps, "steps in", round(time.time() - t0), "s", file=sys.stderr)
    ref = Refiner(settings, last)
    by_id = {p.image_id: p for p in report.pairs}
    pairs = sample_pairs([by_id[i] for i in val_ids], 200)
    rng = np.random.default_rng(0)
    res = {"true_box": [], "jittered_box": [], "mask28_roundtrip": []}
    for p in pairs:
        img, truth = read_image(p.image_path), read_mask(p.mask_path)
        box = mask_box(truth)
        if box is None:
            continue
        res["true_box"].append(iou(ref.masks(img, np.array([box]))[..., 0], truth))
        h, w = box[2] - box[0], box[3] - box[1]
        j = np.array(box) + np.round(rng.uniform(-0.1, 0.1, 4) * np.array([h, w, h, w])).astype(int)
        res["jittered_box"].append(iou(ref.masks(img, np.array([j]))[..., 0], truth))
        y1, x1, y2, x2 = box
        small = cv2.resize(truth[y1:y2, x1:x2].astype(np.float32), (28, 28), interpolation=cv2.INTER_AREA)
        back = np.zeros_like(truth)
        back[y1:y2, x1:x2] = cv2.resize(small, (x2 - x1, y2 - y1)) >= 0.5
        res["mask28_roundtrip"].append(iou(back, truth))
    out = {k: {"mean_jaccard": round(float(np.mean(v)), 4),
               "thr_jaccard": round(float(np.mean([x if x >= 0.65 else 0 for x in v])), 4),
               "below_065": int(sum(x < 0.65 for x in v))} for k, v in res.items()}
    out.update(steps=budget.steps, minutes=minutes, n=len(res["true_box"]), **budget.steady_step_times())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
