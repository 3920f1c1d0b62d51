"""Evaluation runs with explicit values: a model on image/mask pairs, or existing prediction files.

Each run writes ``scores.csv`` and ``summary.json`` (:func:`lesionkit.metrics.write_scores`) into
its folder, prints the headline table and, if asked, saves ``evaluation_grid.png``. Scoring
follows the official ISIC 2018 scorer (:mod:`lesionkit.metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lesionkit import metrics
from lesionkit.dataset_scan import Pair
from lesionkit.prediction_files import InputError, write_summary
from lesionkit.prediction_run import DEFAULT_BATCH_SIZE, PredictOptions, load_inference_model, predict_images
from mrcnn.config import Config
from mrcnn.imaging import read_image, read_mask

#: Summary keys that are per-run lists, not metrics.
LIST_KEYS = ("rows", "problems")
#: Rows of the printed table, in order.
HEADLINE = ("n_images", "threshold_jaccard", "jaccard", "dice", "sensitivity", "specificity", "accuracy",
            "map50", "map")


@dataclass(frozen=True)
class GridOptions:
    """``count`` images in ``evaluation_grid.png`` (0 = no grid), worst Jaccard first if asked."""

    count: int = 0
    worst_first: bool = False


def metrics_only(summary: dict) -> dict:
    """``summary`` without its per-image rows and problem list."""
    return {k: v for k, v in summary.items() if k not in LIST_KEYS}


def evaluate_model(model: Any, pairs: list[Pair], folder: Path, options: PredictOptions) -> dict:
    """Predict ``pairs`` into ``folder/predictions``, score them, write scores.csv + summary.json.

    Returns the summary with ``rows`` (one per image) and ``problems`` added.
    """
    truth = {p.image_id: p.mask_path for p in pairs}
    pred_dir = folder / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ap = metrics.ApAccumulator()

    def add_ap(image_id: str, result: dict, kept: list[int]) -> None:
        masks = np.asarray(result["masks"], dtype=bool)[..., kept]
        ap.add(read_mask(truth[image_id]), masks, np.asarray(result["scores"])[kept])

    records, unreadable = predict_images(model, [p.image_path for p in pairs], pred_dir, options, on_result=add_ap)
    write_summary(pred_dir, records, {"min_confidence": options.min_confidence, "tta": options.tta,
                                      "unreadable": unreadable})
    rows, summary, problems = metrics.score_pairs(pred_dir, truth)
    summary.update(ap.summary())
    problems = problems + [f"{name}: unreadable image" for name in unreadable]
    metrics.write_scores(rows, summary, folder, problems)
    return summary | {"rows": rows, "problems": problems}


def evaluate_with_model(model: Any, pairs: list[Pair], out_dir: Path, options: PredictOptions,
                        grid: GridOptions = GridOptions()) -> dict[str, dict]:
    """Evaluate ``pairs`` into ``out_dir`` (and, with ``options.tta``, also with TTA into ``out_dir/tta``).

    With TTA the main ``summary.json`` holds the plain metrics plus a ``tta`` block. Returns the
    summaries by column name (``plain``, ``tta``).
    """
    plain = PredictOptions(options.min_confidence, batch_size=options.batch_size)
    columns = {"plain": evaluate_model(model, pairs, out_dir, plain)}
    if options.tta:
        columns["tta"] = evaluate_model(model, pairs, out_dir / "tta", options)
        plain = columns["plain"]
        summary = metrics_only(plain) | {"tta": metrics_only(columns["tta"])}
        metrics.write_scores(plain["rows"], summary, out_dir, plain["problems"])
    images = {p.image_id: p.image_path for p in pairs}
    truth = {p.image_id: p.mask_path for p in pairs}
    report_evaluation(columns, out_dir, images, truth, out_dir / "predictions", grid)
    return columns


def evaluate_checkpoint(weights: Path, config: Config, pairs: list[Pair], folder: Path) -> dict:
    """Load ``weights`` (a run of ``config``) for inference and evaluate it on ``pairs`` (no TTA)."""
    inference = config.replace(GPU_COUNT=1, IMAGES_PER_GPU=DEFAULT_BATCH_SIZE)
    model = load_inference_model(inference, weights, weights.parent.parent)
    options = PredictOptions(float(config.DETECTION_MIN_CONFIDENCE), batch_size=DEFAULT_BATCH_SIZE)
    summary = evaluate_model(model, pairs, folder, options)
    print(f"  fold evaluation: {folder / 'summary.json'}")
    return metrics_only(summary)


def evaluate_prediction_folder(pred_dir: Path, masks_dir: Path, out_dir: Path, images_dir: Path | None = None,
                               grid: GridOptions = GridOptions()) -> dict:
    """Score existing ``<id>_segmentation.png`` files in ``pred_dir`` against ``masks_dir``, no model.

    Like the official scorer, an incomplete submission is refused: every ground-truth mask needs
    a readable prediction of its size, else :class:`InputError` naming the first few.
    """
    rows, summary, problems = metrics.score_folders(pred_dir, masks_dir)
    truth = {metrics.truth_id(p): p for p in sorted(Path(masks_dir).iterdir())
             if p.is_file() and p.suffix.lower() in metrics.MASK_SUFFIXES}
    missing = [line for line in problems if line.split(":", 1)[0] in truth.keys() - {r["image_id"] for r in rows}]
    if not rows or missing:
        shown = "; ".join((missing or problems)[:3]) or "no predictions"
        raise InputError(f"{len(truth) - len(rows)} of {len(truth)} ground-truth masks in {masks_dir} have no usable"
                         f" prediction in {pred_dir} ({shown}); like the official scorer, an incomplete"
                         " submission is not scored")
    metrics.write_scores(rows, summary, out_dir, problems)
    images = {}
    if images_dir is not None:
        from lesionkit.dataset_scan import is_image_name

        images = {p.stem: p for p in Path(images_dir).iterdir() if is_image_name(p)}
    columns = {"value": summary | {"rows": rows, "problems": problems}}
    report_evaluation(columns, out_dir, images, truth, pred_dir, grid)
    return columns["value"]


def report_evaluation(columns: dict[str, dict], out_dir: Path, images: dict[str, Path], truth: dict[str, Path],
                      pred_dir: Path, grid: GridOptions) -> None:
    """Print problems and the table, save the grid if asked, say where the files are."""
    first = next(iter(columns.values()))
    for line in first["problems"][:10]:
        print(f"  warning: {line}")
    if len(first["problems"]) > 10:
        print(f"  ... {len(first['problems']) - 10} more problems in summary.json")
    print()
    print("\n".join(summary_lines(columns)))
    if grid.count:
        entries = grid_rows(first["rows"], images, truth, pred_dir, grid.count, grid.worst_first)
        if entries:
            from mrcnn.visualize import save_evaluation_grid

            print(f"  grid:    {save_evaluation_grid(entries, out_dir / 'evaluation_grid.png')}")
        else:
            print("  note: no grid (it needs the images: give the image folder too)")
    print(f"  scores:  {out_dir / 'scores.csv'}")
    print(f"  summary: {out_dir / 'summary.json'}" + (f" (TTA: {out_dir / 'tta'}/)" if "tta" in columns else ""))


def summary_lines(columns: dict[str, dict[str, Any]]) -> list[str]:
    """A small text table: one row per headline metric, one column per summary (e.g. plain, tta)."""
    names = list(columns)
    lines = ["  " + f"{'metric':18}" + "".join(f"{n:>12}" for n in names)]
    for key in HEADLINE:
        values = [columns[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{_fmt(v):>12}" for v in values)
        lines.append(f"  {key:18}{cells}")
    return lines


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def grid_rows(rows: list[dict], images: dict[str, Path], truth: dict[str, Path], pred_dir: Path,
              count: int, worst_first: bool) -> list[dict]:
    """Up to ``count`` grid entries (image, truth, pred, title), worst Jaccard first if asked."""
    chosen = [r for r in rows if r["image_id"] in images]
    if worst_first:
        chosen = sorted(chosen, key=lambda r: (r["jaccard"], r["image_id"]))
    entries = []
    for row in chosen[:count]:
        image_id = row["image_id"]
        entries.append({
            "image": read_image(images[image_id]),
            "truth": read_mask(truth[image_id]),
            "pred": read_mask(Path(pred_dir) / f"{image_id}{metrics.PREDICTION_SUFFIX}"),
            "title": f"{image_id}  J={row['jaccard']:.3f}",
        })
    return entries
