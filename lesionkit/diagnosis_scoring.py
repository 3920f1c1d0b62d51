"""Scoring a run's diagnoses: truth labels against predicted class probabilities, per image and overall.

Used by evaluation (:mod:`lesionkit.evaluation_run`) for a diagnosing model's predictions and for
``--pred`` submissions: an ISIC 2018 Task 3 CSV (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``), alone or
as ``diagnosis.csv`` in a folder of predicted masks. Like the official scorer, a submission that
lacks a row for a labelled image is refused (:class:`SubmissionError`, one line, exit 2).

Per-image rows (added to ``scores.csv``): ``true_dx``, ``pred_dx`` and ``p_<class>`` for each
class. The metrics are :func:`lesionkit.diagnosis_metrics.diagnosis_metrics` over the images that
have both a truth label and probabilities; the confusion matrix is also drawn as
``confusion_matrix.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lesionkit import diagnosis_labels as labels_io
from lesionkit.diagnosis_metrics import diagnosis_metrics, predicted_names
from mrcnn.errors import UserError

CONFUSION_PNG = "confusion_matrix.png"
#: Per-image CSV columns before the class probabilities.
ROW_COLUMNS = ("true_dx", "pred_dx")
#: How many image ids an error message names.
SHOW_FIRST = 3


class SubmissionError(UserError):
    """A diagnosis submission or label file cannot be scored (one line naming the file and the problem)."""


def probability_column(name: str) -> str:
    """``scores.csv`` column of a class's probability: ``p_<class>``."""
    return f"p_{name}"


def score_diagnoses(truth: Mapping[str, str | None], probs: Mapping[str, Any], classes: Sequence[str]
                    ) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """(rows, metrics, problems) of the images in ``truth`` (``id -> class name or None``).

    ``probs``: ``id -> [K]`` probabilities over ``classes``. Rows: one per image with
    probabilities (``image_id``, ``true_dx`` (None without a label), ``pred_dx``, ``p_<class>``),
    sorted by id. Metrics: over the rows with a truth label, plus ``n_unlabelled``. Problems: one
    line per labelled image without probabilities, per prediction without a truth image, and per
    truth label that is not one of ``classes`` (that image counts as unlabelled).
    """
    classes = list(classes)
    rows, problems = [], []
    truth = dict(truth)
    for image_id, dx in sorted(truth.items()):
        if dx is not None and dx not in classes:
            problems.append(f"{image_id}: true diagnosis {dx!r} is not one of the classes {', '.join(classes)}"
                            " (not scored)")
            truth[image_id] = None
    for image_id in sorted(truth):
        if image_id not in probs:
            if truth[image_id] is not None:
                problems.append(f"{image_id}: no diagnosis predicted")
            continue
        p = np.asarray(probs[image_id], dtype=np.float64).reshape(-1)
        rows.append({"image_id": image_id, "true_dx": truth[image_id], "pred_dx": predicted_names(p[None], classes)[0],
                     **{probability_column(c): float(v) for c, v in zip(classes, p, strict=True)}})
    problems += [f"{image_id}: diagnosis predicted for an image without ground truth"
                 for image_id in sorted(set(probs) - set(truth))]
    labelled = [r for r in rows if r["true_dx"] is not None]
    matrix = np.array([[r[probability_column(c)] for c in classes] for r in labelled]).reshape(-1, len(classes))
    metrics = diagnosis_metrics([r["true_dx"] for r in labelled], matrix, classes)
    metrics["n_unlabelled"] = len(rows) - len(labelled)
    return rows, metrics, problems


def save_confusion_png(metrics: dict[str, Any], folder: Path) -> Path | None:
    """``folder/confusion_matrix.png`` from a metrics dict; None when no image was scored."""
    if not metrics.get("n_diagnosed"):
        return None
    from mrcnn.visualize import save_confusion_matrix

    return save_confusion_matrix(metrics["confusion_matrix"], metrics["classes"], Path(folder) / CONFUSION_PNG)


def merge_rows(mask_rows: list[dict], dx_rows: list[dict]) -> list[dict]:
    """Per-image rows with the Task 1 columns and the diagnosis columns side by side (by image id)."""
    by_id = {r["image_id"]: dict(r) for r in mask_rows}
    for row in dx_rows:
        by_id.setdefault(row["image_id"], {"image_id": row["image_id"]}).update(row)
    return [by_id[k] for k in sorted(by_id)]


# -------------------------------------------------------------------------------------------
# Truth labels and submissions on disk


def read_label_file(path: str | Path) -> dict[str, str | None]:
    """``image id -> dx`` (lower case, None where empty) from a HAM10000 ``metadata.csv`` (``image_id``
    and ``dx`` columns) or an ISIC 2018 Task 3 ground-truth CSV (one-hot columns)."""
    by_dx = labels_io.read_dx_labels(path)
    if by_dx:
        return by_dx
    return labels_io.labels_from_task3(labels_io.read_task3_csv(path))


def task3_classes() -> list[str]:
    """The seven Task 3 diagnoses as class names (``dx`` spelling, the usual CLASSES order)."""
    return list(labels_io.HAM10000_CLASSES)


def read_submission(path: str | Path, truth: Mapping[str, str | None], classes: Sequence[str]
                    ) -> dict[str, np.ndarray]:
    """``image id -> [K]`` probabilities over ``classes`` from a Task 3 CSV ``path``.

    Raises :class:`SubmissionError` naming the file when it does not parse (bad header, a value
    that is not a number in [0, 1], a repeated image) or when a labelled image of ``truth`` has no
    row: like the official scorer, an incomplete submission is not scored.
    """
    try:
        table = labels_io.read_task3_csv(path)
    except labels_io.LabelFileError as exc:
        raise SubmissionError(f"--pred file {str(exc).removeprefix('label file ')}") from None
    order = [labels_io.TASK3_COLUMNS.index(labels_io.column_for(c)) for c in classes]
    missing = sorted(i for i, dx in truth.items() if dx is not None and i not in table)
    if missing:
        wanted = sum(1 for dx in truth.values() if dx is not None)
        raise SubmissionError(f"--pred file {path}: {len(missing)} of {wanted} labelled images have no row"
                              f" ({', '.join(missing[:SHOW_FIRST])}{', ...' if len(missing) > SHOW_FIRST else ''});"
                              " like the official scorer, an incomplete submission is not scored")
    return {image_id: np.asarray(row, dtype=np.float64)[order] for image_id, row in table.items()}
