"""Evaluation runs with explicit values: a model on image/mask pairs, or existing prediction files.

Each run writes ``scores.csv`` and ``summary.json`` (:func:`lesionkit.metrics.write_scores`) into
its folder, prints the headline table and, if asked, saves ``evaluation_grid.png``. Scoring
follows the official ISIC 2018 scorer (:mod:`lesionkit.metrics`).

Diagnoses (a diagnosing model, or a ``diagnosis.csv`` / Task 3 CSV given to ``--pred``) are scored
too (:mod:`lesionkit.diagnosis_scoring`): summary.json gains a ``diagnosis`` object (balanced
accuracy, accuracy, per-class recall/precision/AUC, macro AUC, melanoma sensitivity/specificity,
confusion matrix), scores.csv gains ``true_dx``, ``pred_dx`` and ``p_<class>`` per image, and
``confusion_matrix.png`` is saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lesionkit import diagnosis_scoring, metrics
from lesionkit.dataset_scan import Pair
from lesionkit.diagnosis_metrics import flat_metrics
from lesionkit.prediction_files import DIAGNOSIS_CSV, InputError, write_summary
from lesionkit.prediction_run import (
    DEFAULT_BATCH_SIZE,
    PredictOptions,
    load_inference_model,
    predict_images,
)
from mrcnn.config import Config, diagnosis_classes
from mrcnn.imaging import read_image, read_mask

#: Summary keys that are per-run lists, not metrics.
LIST_KEYS = ("rows", "problems")
#: Rows of the printed table, in order (then the diagnosis metrics, see :func:`table_values`).
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
    A diagnosing model (``model.config``) is also scored on its diagnoses against each pair's
    ``diagnosis`` (:func:`add_diagnoses`); ``predictions/diagnosis.csv`` is written too.
    """
    truth = {p.image_id: p.mask_path for p in pairs}
    pred_dir = folder / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ap = metrics.ApAccumulator()
    classes = diagnosis_classes(getattr(model, "config", None))
    class_probs: dict[str, np.ndarray] = {}

    def on_result(image_id: str, result: dict, kept: list[int]) -> None:
        masks = np.asarray(result["masks"], dtype=bool)[..., kept]
        ap.add(read_mask(truth[image_id]), masks, np.asarray(result["scores"])[kept])
        if classes and result.get("class_probs") is not None:
            class_probs[image_id] = np.asarray(result["class_probs"], dtype=np.float64)

    records, unreadable = predict_images(model, [p.image_path for p in pairs], pred_dir, options,
                                         on_result=on_result)
    write_summary(pred_dir, records, {"min_confidence": options.min_confidence, "tta": options.tta,
                                      "unreadable": unreadable}, classes)
    rows, summary, problems = metrics.score_pairs(pred_dir, truth)
    summary.update(ap.summary())
    problems = problems + [f"{name}: unreadable image" for name in unreadable]
    if classes:
        rows = add_diagnoses(rows, summary, problems, {p.image_id: p.diagnosis for p in pairs}, class_probs,
                             classes, folder)
    metrics.write_scores(rows, summary, folder, problems)
    return summary | {"rows": rows, "problems": problems}


def add_diagnoses(rows: list[dict], summary: dict, problems: list[str], truth: dict[str, str | None],
                  class_probs: dict[str, Any], classes: list[str], folder: Path) -> list[dict]:
    """Score the diagnoses (:func:`lesionkit.diagnosis_scoring.score_diagnoses`): puts the metrics in
    ``summary["diagnosis"]``, appends problem lines, saves ``folder/confusion_matrix.png``; returns
    the per-image rows with the diagnosis columns added."""
    dx_rows, dx_metrics, dx_problems = diagnosis_scoring.score_diagnoses(truth, class_probs, classes)
    summary["diagnosis"] = dx_metrics
    problems.extend(dx_problems)
    diagnosis_scoring.save_confusion_png(dx_metrics, folder)
    return diagnosis_scoring.merge_rows(rows, dx_rows)


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
                               grid: GridOptions = GridOptions(), labels: dict[str, str | None] | None = None
                               ) -> dict:
    """Score existing ``<id>_segmentation.png`` files in ``pred_dir`` against ``masks_dir``, no model.

    Like the official scorer, an incomplete submission is refused: every ground-truth mask needs
    a readable prediction of its size, else :class:`InputError` naming the first few. When
    ``pred_dir`` also holds ``diagnosis.csv`` and ``labels`` (``id -> dx``) are given, the
    diagnoses of the ground-truth images are scored too (every labelled one needs a row, else
    :class:`lesionkit.diagnosis_scoring.SubmissionError`).
    """
    dx_file = Path(pred_dir) / DIAGNOSIS_CSV
    if dx_file.is_file() and labels is None:
        print(f"  note: {dx_file} is not scored: no diagnosis labels (give --labels)")
    rows, summary, problems = metrics.score_folders(pred_dir, masks_dir)
    truth = {metrics.truth_id(p): p for p in sorted(Path(masks_dir).iterdir())
             if p.is_file() and p.suffix.lower() in metrics.MASK_SUFFIXES}
    missing = [line for line in problems if line.split(":", 1)[0] in truth.keys() - {r["image_id"] for r in rows}]
    if not rows or missing:
        shown = "; ".join((missing or problems)[:3]) or "no predictions"
        raise InputError(f"{len(truth) - len(rows)} of {len(truth)} ground-truth masks in {masks_dir} have no usable"
                         f" prediction in {pred_dir} ({shown}); like the official scorer, an incomplete"
                         " submission is not scored")
    if dx_file.is_file() and labels is not None:
        classes = diagnosis_scoring.task3_classes()
        dx_truth = {image_id: labels.get(image_id) for image_id in truth}
        probs = diagnosis_scoring.read_submission(dx_file, dx_truth, classes)
        rows = add_diagnoses(rows, summary, problems, dx_truth, probs, classes, out_dir)
    metrics.write_scores(rows, summary, out_dir, problems)
    images = {}
    if images_dir is not None:
        from lesionkit.dataset_scan import is_image_name

        images = {p.stem: p for p in Path(images_dir).iterdir() if is_image_name(p)}
    columns = {"value": summary | {"rows": rows, "problems": problems}}
    report_evaluation(columns, out_dir, images, truth, pred_dir, grid)
    return columns["value"]


def evaluate_diagnosis_file(csv_path: Path, labels: dict[str, str | None], out_dir: Path) -> dict:
    """Score a Task 3 CSV of diagnoses (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``) against ``labels``
    (``id -> dx``), no masks: ``scores.csv``, ``summary.json`` (``n_images`` and ``diagnosis``) and
    ``confusion_matrix.png`` in ``out_dir``. Every labelled image needs a row (else
    :class:`lesionkit.diagnosis_scoring.SubmissionError`)."""
    classes = diagnosis_scoring.task3_classes()
    probs = diagnosis_scoring.read_submission(csv_path, labels, classes)
    summary: dict[str, Any] = {}
    problems: list[str] = []
    rows = add_diagnoses([], summary, problems, labels, probs, classes, out_dir)
    summary["n_images"] = len(rows)
    metrics.write_scores(rows, summary, out_dir, problems)
    columns = {"value": summary | {"rows": rows, "problems": problems}}
    report_evaluation(columns, out_dir, {}, {}, out_dir, GridOptions())
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
    if (out_dir / diagnosis_scoring.CONFUSION_PNG).is_file() and "diagnosis" in first:
        print(f"  confusion matrix: {out_dir / diagnosis_scoring.CONFUSION_PNG}")
    print(f"  scores:  {out_dir / 'scores.csv'}")
    print(f"  summary: {out_dir / 'summary.json'}" + (f" (TTA: {out_dir / 'tta'}/)" if "tta" in columns else ""))


def table_values(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary's metrics as one flat dict: the Task 1 metrics, then the diagnosis metrics as
    ``dx_*`` keys (:func:`lesionkit.diagnosis_metrics.flat_metrics`: headline, then recall per class)."""
    return {key: summary.get(key) for key in HEADLINE} | flat_metrics(summary.get("diagnosis"))


def summary_lines(columns: dict[str, dict[str, Any]]) -> list[str]:
    """A small text table: one row per headline metric (Task 1, then the diagnosis ones when there
    are any), one column per summary (e.g. plain, tta)."""
    names = list(columns)
    values_by_name = {n: table_values(columns[n]) for n in names}
    keys = list(dict.fromkeys(k for n in names for k in values_by_name[n]))
    lines = ["  " + f"{'metric':22}" + "".join(f"{n:>12}" for n in names)]
    for key in keys:
        values = [values_by_name[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        cells = "".join(f"{_fmt(v):>12}" for v in values)
        lines.append(f"  {key:22}{cells}")
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
    chosen = [r for r in rows if r["image_id"] in images and "jaccard" in r]
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
