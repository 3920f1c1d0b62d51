#!/usr/bin/env python
"""How much Jaccard the Mask R-CNN mask head's resolution costs, measured on the truth masks.

The mask head predicts an ``S x S`` mask inside the detection box (Matterport: 28x28), which
inference resizes back into the box and thresholds at 0.5 (:func:`mrcnn.imaging.unmold_mask`).
Even a perfect head with a perfect box can therefore only reproduce the truth mask up to that
round trip. For every truth mask of a split this script measures the round trip

* **soft**: crop the mask to its box, resize it to ``S x S`` as floats (what an ideal head's
  probabilities would be), resize back into the box, threshold at 0.5;
* **hard**: the same through :func:`mrcnn.imaging.minimize_mask` (the crop rounded to a binary
  ``S x S`` mask, i.e. Matterport's binary training targets), then back;

and scores it against the original mask with the official-scorer metrics
(:mod:`lesionkit.metrics`). It prints one JSON line; ``1 - jaccard`` is the Jaccard lost to the
resolution alone. Pure numpy, about a minute for the 1,952 HAM10000 val masks::

    python benchmarks/mask_resolution.py --dataset ../shared/data/ham10000_200 --sizes 28 56
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from lesionkit import dataset_scan, metrics  # noqa: E402
from mrcnn.boxes import extract_bboxes  # noqa: E402
from mrcnn.imaging import minimize_mask, read_mask, resize, unmold_mask  # noqa: E402

DEFAULT_DATASET = REPO_DIR.parent / "shared" / "data" / "ham10000_200"


def split_masks(dataset: Path, split: str, limit: int | None = None) -> list[Path]:
    """Truth mask paths of ``split`` ("train", "val" or "all"), the split column of metadata.csv first."""
    report = dataset_scan.scan_dataset(dataset, check_files=False)
    ids = [p.image_id for p in report.pairs]
    train, val = dataset_scan.split_ids(ids, 0.2, 42, report.splits)
    wanted = {"train": set(train), "val": set(val), "all": set(ids)}[split]
    paths = [p.mask_path for p in report.pairs if p.image_id in wanted]
    return paths[:limit] if limit else paths


def round_trip(mask: np.ndarray, size: int, hard: bool) -> np.ndarray:
    """``mask`` bool [H, W] through a box-aligned ``size x size`` mask and back -> bool [H, W]."""
    box = extract_bboxes(mask[..., None])[0]
    if hard:
        small = minimize_mask(box[None], mask[..., None], (size, size))[..., 0].astype(np.float64)
    else:
        y1, x1, y2, x2 = (int(v) for v in box)
        small = resize(mask[y1:y2, x1:x2], (size, size))
    return unmold_mask(small, box, mask.shape)


def measure(paths: list[Path], sizes: list[int]) -> dict:
    """Mean official metrics of every (size, soft/hard) round trip over the masks in ``paths``."""
    rows: dict[str, list[dict]] = {f"{s}_{kind}": [] for s in sizes for kind in ("soft", "hard")}
    box_sides = []
    for path in paths:
        mask = read_mask(path)
        y1, x1, y2, x2 = extract_bboxes(mask[..., None])[0]
        box_sides.append(max(y2 - y1, x2 - x1))
        for size in sizes:
            for kind in ("soft", "hard"):
                rows[f"{size}_{kind}"].append(metrics.score_mask(mask, round_trip(mask, size, kind == "hard")))
    out = {}
    for key, values in rows.items():
        summary = metrics.summarize(values)
        jac = np.array([v["jaccard"] for v in values])
        out[key] = {"jaccard": round(float(summary["jaccard"]), 5),
                    "threshold_jaccard": round(float(summary["threshold_jaccard"]), 5),
                    "dice": round(float(summary["dice"]), 5),
                    "jaccard_loss": round(1.0 - float(summary["jaccard"]), 5),
                    "min_jaccard": round(float(jac.min()), 4),
                    "p1_jaccard": round(float(np.percentile(jac, 1)), 4)}
    out["box_long_side_px"] = {"median": float(np.median(box_sides)), "max": int(np.max(box_sides))}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="images/+masks/ or ISIC 2018 folder")
    p.add_argument("--split", default="val", choices=("train", "val", "all"))
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 56], help="mask head resolutions to test")
    p.add_argument("--limit", type=int, default=None, help="only the first N masks (quick check)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure and print one JSON line."""
    args = parse_args(argv)
    started = time.time()
    paths = split_masks(Path(args.dataset), args.split, args.limit)
    result = {"dataset": str(args.dataset), "split": args.split, "n_masks": len(paths)}
    result.update(measure(paths, args.sizes))
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
