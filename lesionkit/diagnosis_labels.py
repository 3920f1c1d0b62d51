"""Diagnosis labels on disk: HAM10000 ``metadata.csv`` (``dx`` column) and ISIC 2018 Task 3 CSVs.

The seven HAM10000 / ISIC 2018 Task 3 diagnoses have two spellings:

* ``dx`` in HAM10000's metadata: lower-case ``akiec, bcc, bkl, df, mel, nv, vasc`` (the names a
  config lists in ``CLASSES``);
* the Task 3 CSV columns, upper-case, in the official order ``MEL, NV, BCC, AKIEC, BKL, DF, VASC``
  (:data:`TASK3_COLUMNS`): ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` with one-hot rows in the ground
  truth (``ISIC2018_Task3_Training_GroundTruth.csv``) and probabilities in a submission.

:func:`read_task3_csv` / :func:`write_task3_csv` read and write that format (write: atomic),
:func:`read_dx_labels` reads ``metadata.csv``, :func:`to_task3_order` reorders a model's class
probabilities (``config.CLASSES`` order) into the Task 3 columns, and :func:`attach_labels` gives
the pairs of a dataset scan their diagnosis, counting and naming what cannot be used.
No TensorFlow here.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from mrcnn.errors import UserError
from mrcnn.fileio import write_text_atomic

#: Column order of the ISIC 2018 Task 3 ground truth and submission CSVs (after ``image``).
TASK3_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
#: The same seven diagnoses as HAM10000 ``dx`` names, alphabetical (the usual ``CLASSES`` order).
HAM10000_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
#: Name of the official Task 3 ground truth, looked for next to the Task 1 folders.
TASK3_GT_NAME = "ISIC2018_Task3_Training_GroundTruth.csv"
#: Image extensions stripped from an ``image`` cell (some tools write ``ISIC_0024306.jpg``).
_ID_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class LabelFileError(UserError):
    """A label CSV cannot be read or parsed; the message names the file and the line."""


def column_for(dx: str) -> str:
    """``"mel"`` -> ``"MEL"`` (any case in, the Task 3 column out); LabelFileError if not one of the 7."""
    name = str(dx).strip().upper()
    if name not in TASK3_COLUMNS:
        raise LabelFileError(f"diagnosis {dx!r} is not an ISIC 2018 Task 3 class ({', '.join(TASK3_COLUMNS)})")
    return name


def dx_for(column: str) -> str:
    """``"MEL"`` -> ``"mel"`` (the HAM10000 ``dx`` spelling)."""
    return column_for(column).lower()


def _image_id(cell: str) -> str:
    cell = cell.strip()
    lower = cell.lower()
    for suffix in _ID_SUFFIXES:
        if lower.endswith(suffix):
            return cell[: -len(suffix)]
    return cell


def read_task3_csv(path: str | Path) -> dict[str, np.ndarray]:
    """``image id -> float32 [7]`` in :data:`TASK3_COLUMNS` order, from a Task 3 CSV.

    The header must hold ``image`` and the seven columns (any order, extra columns ignored); each
    value must be a finite number in [0, 1] (one-hot ground truth or probabilities). A missing or
    unreadable file, a bad header, a bad value, an empty id or a repeated id raises
    :class:`LabelFileError` naming the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelFileError(f"label file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"label file {path} cannot be read: {exc}") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise LabelFileError(f"label file {path} is empty; expected the header image,{','.join(TASK3_COLUMNS)}"
                             ) from None
    except csv.Error as exc:
        raise LabelFileError(f"label file {path}, line 1: not CSV ({exc})") from None
    missing = [c for c in ["image"] + TASK3_COLUMNS if c not in header]
    if missing:
        raise LabelFileError(f"label file {path}, line 1: header lacks {', '.join(missing)}"
                             f" (expected image,{','.join(TASK3_COLUMNS)})")
    where = [header.index(c) for c in TASK3_COLUMNS]
    id_at = header.index("image")
    table: dict[str, np.ndarray] = {}
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise LabelFileError(f"label file {path}, line {line}: {len(row)} values, the header has"
                                     f" {len(header)}")
            image_id = _image_id(row[id_at])
            if not image_id:
                raise LabelFileError(f"label file {path}, line {line}: empty image id")
            if image_id in table:
                raise LabelFileError(f"label file {path}, line {line}: image {image_id} is listed twice")
            table[image_id] = _row_values(row, where, path, line)
    except csv.Error as exc:
        raise LabelFileError(f"label file {path}, line {reader.line_num}: not CSV ({exc})") from None
    return table


def _row_values(row: list[str], where: list[int], path: Path, line: int) -> np.ndarray:
    values = np.zeros(len(TASK3_COLUMNS), dtype=np.float32)
    for k, col in enumerate(where):
        cell = row[col].strip()
        try:
            value = float(cell)
        except ValueError:
            raise LabelFileError(f"label file {path}, line {line}: {TASK3_COLUMNS[k]} value {cell!r} is not a"
                                 " number") from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise LabelFileError(f"label file {path}, line {line}: {TASK3_COLUMNS[k]} value {cell!r} is not in"
                                 " [0, 1]")
        values[k] = value
    return values


def labels_from_task3(table: Mapping[str, np.ndarray]) -> dict[str, str | None]:
    """``image id -> dx`` (lower case) from one-hot Task 3 rows: the column of the largest value;
    None for a row of zeros (no label)."""
    out: dict[str, str | None] = {}
    for image_id, row in table.items():
        row = np.asarray(row, dtype=np.float32)
        out[image_id] = TASK3_COLUMNS[int(np.argmax(row))].lower() if float(row.max()) > 0 else None
    return out


def probability_text(value: float) -> str:
    """A probability as written in a diagnosis CSV and stored in summary.json: the shortest text
    that reads back as the same float32 (``0.6``, ``1.0``, ``2.5e-08``). Fixed decimals would turn a
    rare class's tiny probabilities into ties (``0.000000``) and change its AUC; the text always has
    a ``.`` or an exponent, so pandas (the official scorer) reads every column as floats."""
    return str(np.float32(value))


def write_task3_csv(path: str | Path, rows: Iterable[tuple[str, Sequence[float] | np.ndarray]]) -> Path:
    """Write ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` and one line per ``(image id, 7 values in
    TASK3_COLUMNS order)`` to ``path`` atomically (values: :func:`probability_text`); returns the
    path. Use :func:`to_task3_order` to turn a model's ``class_probs`` into that order."""
    lines = ["image," + ",".join(TASK3_COLUMNS)]
    for image_id, values in rows:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape != (len(TASK3_COLUMNS),):
            raise ValueError(f"{image_id}: expected {len(TASK3_COLUMNS)} values, got {values.shape}")
        lines.append(f"{image_id}," + ",".join(probability_text(v) for v in values))
    return write_text_atomic(path, "\n".join(lines) + "\n")


def to_task3_order(probs: Sequence[float] | np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """float32 [7]: ``probs`` over ``classes`` (e.g. ``config.CLASSES``) moved to the Task 3 columns.

    Every class must be one of the seven diagnoses (any case); a Task 3 class missing from
    ``classes`` gets 0. Raises LabelFileError for a class that is not a Task 3 diagnosis.
    """
    probs = np.asarray(probs, dtype=np.float32).reshape(-1)
    if probs.shape[0] != len(classes):
        raise ValueError(f"{probs.shape[0]} probabilities for {len(classes)} classes")
    out = np.zeros(len(TASK3_COLUMNS), dtype=np.float32)
    for p, name in zip(probs, classes, strict=True):
        out[TASK3_COLUMNS.index(column_for(name))] = p
    return out


def read_dx_labels(metadata_csv: str | Path) -> dict[str, str | None]:
    """``image_id -> dx`` (stripped, lower case; None where the cell is empty) from a metadata.csv
    with ``image_id`` and ``dx`` columns; ``{}`` when the file has no such columns. Raises
    :class:`LabelFileError` (file named) when the file is missing or not readable CSV."""
    path = Path(metadata_csv)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelFileError(f"label file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"label file {path} cannot be read: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "image_id" not in fields or "dx" not in fields:
            return {}
        reader.fieldnames = fields
        out: dict[str, str | None] = {}
        for row in reader:
            image_id = (row.get("image_id") or "").strip()
            if image_id:
                out[image_id] = (row.get("dx") or "").strip().lower() or None
    except csv.Error as exc:
        raise LabelFileError(f"label file {path}, line {reader.line_num}: not CSV ({exc})") from None
    return out


# -------------------------------------------------------------------------------------------
# Attaching labels to a dataset scan


def task3_gt_paths(root: str | Path) -> list[Path]:
    """Where a Task 3 ground truth is looked for: ``<root>/ISIC2018_Task3_Training_GroundTruth.csv``
    and the same name inside the official zip's folder ``<root>/ISIC2018_Task3_Training_GroundTruth/``."""
    root = Path(root)
    return [root / TASK3_GT_NAME, root / TASK3_GT_NAME[: -len(".csv")] / TASK3_GT_NAME]


def find_labels(root: str | Path) -> tuple[dict[str, str | None], list[str], list[str]]:
    """(``image id -> dx or None``, label files read, ``"file: reason"`` for files that do not parse)
    from ``<root>/metadata.csv`` (``dx``) and the Task 3 ground truth next to the Task 1 folders.
    metadata.csv's label wins where both name an image."""
    root = Path(root)
    labels: dict[str, str | None] = {}
    used: list[str] = []
    bad: list[str] = []
    for path in task3_gt_paths(root):
        if path.is_file():
            try:
                labels.update(labels_from_task3(read_task3_csv(path)))
                used.append(str(path))
            except LabelFileError as exc:
                bad.append(str(exc))
    metadata = root / "metadata.csv"
    if metadata.is_file():
        try:
            dx = read_dx_labels(metadata)
            if dx:
                used.append(str(metadata))
            labels.update({k: v for k, v in dx.items() if v is not None or k not in labels})
        except LabelFileError as exc:
            bad.append(str(exc))
    return labels, used, bad


def attach_labels(report, classes: Sequence[str], required: bool = True) -> None:
    """Give each pair of a :class:`lesionkit.dataset_scan.ScanReport` its diagnosis (one of
    ``classes``, matched case-insensitively, stored in the ``classes`` spelling), recording the
    problems in the report: ``label_unknown`` (``"id (dx)"``, not in ``classes``),
    ``label_missing`` (no label in any file) and ``label_files_bad`` (a label file that does not
    parse, with the reason). ``required`` (training): pairs without a usable label are dropped,
    and :class:`lesionkit.dataset_scan.DatasetLayoutError` is raised when none is left; otherwise
    (evaluation: the segmentation is still scored) they stay, with diagnosis None."""
    from dataclasses import replace

    from lesionkit.dataset_scan import DatasetLayoutError

    labels, used, bad = find_labels(report.root)
    report.label_files = used
    report.label_files_bad = bad
    report.labels_required = required
    by_lower = {str(c).lower(): str(c) for c in classes}
    kept = []
    for pair in report.pairs:
        dx = labels.get(pair.image_id)
        if dx is None:
            report.label_missing.append(pair.image_id)
        elif dx.lower() not in by_lower:
            report.label_unknown.append(f"{pair.image_id} ({dx})")
        else:
            kept.append(replace(pair, diagnosis=by_lower[dx.lower()]))
            continue
        if not required:
            kept.append(pair)
    report.pairs = kept
    if required and not kept:
        where = ", ".join(used) if used else f"no {TASK3_GT_NAME} or metadata.csv with a dx column in {report.root}"
        details = "; ".join(report.problem_lines(3))
        raise DatasetLayoutError(f"no image with a usable diagnosis label in {report.root} (labels from: {where};"
                                 f" classes {', '.join(classes)}){': ' + details if details else ''}")
