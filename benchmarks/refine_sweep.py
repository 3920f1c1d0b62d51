"""Choose the refiner's inference settings on TRAINING images (not val): one detector pass per
image, then the refinement U-Net at every ``--margins`` value, each probability map thresholded
at every ``--thresholds`` value; also the detector's own masks and the mean of the two.

    python benchmarks/refine_sweep.py --run logs/quality/<run> --images 400
    python benchmarks/refine_sweep.py --run logs/quality/<run> --split val --images 0   # check on val
    python benchmarks/refine_sweep.py --run logs/quality/<run> --split all --dataset logs/quality/<run>/shift_set

Prints one JSON line per setting (``source`` detector / refined / blend, ``margin``,
``threshold``) with thr. Jaccard, Jaccard, sensitivity, specificity and images under 0.65, and
a last line naming the best refined setting by thresholded Jaccard. "blend" averages the
refiner's probability with the detector's binary mask (0/1) inside the crop window before
thresholding: a cheap ensemble of the two stages.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lesions  # noqa: E402
from lesionkit import metrics  # noqa: E402
from lesionkit.dataset_scan import scan_dataset  # noqa: E402
from mrcnn.imaging import read_image, read_mask  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="refine_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder with mask_rcnn_*.h5, refiner_*.weights.h5, split.json")
    p.add_argument("--dataset", default=None, help="dataset folder (default: the one in split.json)")
    p.add_argument("--split", choices=("train", "val", "all"), default="train",
                   help="images of the run's split.json (all: every image of --dataset, e.g. a shift set)")
    p.add_argument("--images", type=int, default=400, help="seeded sample size (0 = all of the split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8")
    p.add_argument("--margins", default="0.05,0.1,0.2")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="detections kept (default the run's DETECTION_MIN_CONFIDENCE; best box as fallback)")
    return p.parse_args(argv)


def sample_ids(run: Path, split: str, n: int, seed: int) -> tuple[list[str], Path]:
    """Image ids of ``split`` from the run's split.json (a seeded sample of ``n``; 0 = all) and the dataset."""
    info = json.loads((run / "split.json").read_text())
    if split == "all":
        return [], Path(info["dataset"])
    ids = list(info[split])
    if n and n < len(ids):
        ids = sorted(random.Random(seed).sample(ids, n))
    return ids, Path(info["dataset"])


def load_models(run: Path) -> tuple[Any, Any, Any]:
    """(config, detector, refiner) of the run's newest checkpoints."""
    from lesionkit.prediction_run import load_inference_model
    from lesionkit.refine.checkpoints import newest_refiner
    from lesionkit.refine.inference import Refiner
    from lesionkit.refine.settings import RefineSettings
    from mrcnn.checkpoints import checkpoints_in

    found = checkpoints_in(run)
    checkpoint = found[-1] if found else None
    refiner_path = newest_refiner(run)
    if checkpoint is None or refiner_path is None:
        raise SystemExit(f"refine_sweep: {run} needs a detector checkpoint and a refiner_*.weights.h5")
    args = argparse.Namespace(config=None, set=[], batch_size=None)
    config = lesions.config_for_weights(args, checkpoint, inference=True)
    detector = load_inference_model(config, checkpoint, run.parent)
    settings = RefineSettings.from_config(config)
    return config, detector, Refiner(settings, refiner_path)


def kept_boxes(result: dict, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [K, 4] (y1, x1, y2, x2), union of their masks bool [H, W]) of the kept detections."""
    from lesionkit.prediction_files import choose_instances

    scores = np.asarray(result["scores"]).reshape(-1)
    indices, _ = choose_instances(scores, min_confidence)
    masks = np.asarray(result["masks"], dtype=bool)
    union = masks[..., indices].any(axis=-1) if indices else np.zeros(masks.shape[:2], bool)
    return np.asarray(result["rois"]).reshape(-1, 4)[indices], union


def refined_probability(refiner: Any, image: np.ndarray, boxes: np.ndarray, margin: float,
                        coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max over boxes of the pasted refiner probability [H, W], union of the windows bool [H, W])."""
    import dataclasses

    from lesionkit.refine import geometry

    refiner.settings = dataclasses.replace(refiner.settings, margin=margin)
    shape = image.shape[:2]
    prob = np.zeros(shape, np.float32)
    inside = np.zeros(shape, bool)
    stack = np.repeat(coarse[..., None], len(boxes), axis=-1)
    for window, p in refiner.probabilities(image, boxes, stack):
        prob = np.maximum(prob, geometry.paste_back(p, window, shape))
        y1, x1, y2, x2 = window
        inside[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
    return prob, inside


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    out = metrics.summarize(rows)
    keys = ("threshold_jaccard", "jaccard", "dice", "sensitivity", "specificity")
    res = {k: round(float(out[k]), 5) for k in keys}
    res["below_065"] = sum(1 for r in rows if r["jaccard"] < 0.65)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    ids, dataset = sample_ids(run, args.split, args.images, args.seed)
    dataset = Path(args.dataset) if args.dataset else dataset
    config, detector, refiner = load_models(run)
    min_conf = float(config.DETECTION_MIN_CONFIDENCE if args.min_confidence is None else args.min_confidence)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    report = scan_dataset(dataset, check_files=False)
    by_id = {p.image_id: p for p in report.pairs}
    ids = ids or sorted(by_id)
    from tqdm import tqdm

    rows: dict[tuple, list] = {}
    started = time.time()
    for image_id in tqdm(ids, desc=f"sweep {args.split}", unit="img"):
        pair = by_id[image_id]
        image, truth = read_image(pair.image_path), read_mask(pair.mask_path)
        boxes, coarse = kept_boxes(detector.detect([image], verbose=0)[0], min_conf)
        rows.setdefault(("detector", None, None), []).append(metrics.score_mask(truth, coarse))
        for margin in margins:
            prob, inside = refined_probability(refiner, image, boxes, margin, coarse) if len(boxes) else (None, None)
            for threshold in thresholds:
                for source in ("refined", "blend"):
                    if prob is None:
                        pred = coarse
                    elif source == "refined":
                        pred = prob >= threshold
                    else:
                        pred = np.where(inside, (prob + coarse) / 2.0, 0.0) >= threshold
                    rows.setdefault((source, margin, threshold), []).append(metrics.score_mask(truth, pred))
    results = []
    for (source, margin, threshold), each in rows.items():
        line = {"source": source, "margin": margin, "threshold": threshold, "split": args.split,
                "n": len(each), **summarise(each)}
        results.append(line)
        print(json.dumps(line), flush=True)
    best = max((r for r in results if r["source"] != "detector"), key=lambda r: r["threshold_jaccard"])
    print(json.dumps({"best": best, "run": str(run), "seconds": round(time.time() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
