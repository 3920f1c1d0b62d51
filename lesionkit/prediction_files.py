"""Turning ``MaskRCNN.detect`` results into files: ISIC masks, overlays, crops and a JSON summary.

For one image and its detection result (``rois`` [N, (y1, x1, y2, x2)] in original pixels,
``scores`` [N], ``masks`` bool [H, W, N]) :func:`write_prediction` writes

* ``<id>_segmentation.png``: single channel, 0/255, at the original size (ISIC 2018 format): the
  union of the kept instances, or only the best one with ``top1``;
* ``<id>_overlay.png``: outline, box and score drawn on the image;
* ``<id>_crop.png`` (with ``crop``): the lesion's bounding box cut out, background blacked out;

and returns the image's JSON record. For a diagnosing model (``classes`` given and the result
carrying ``class_probs`` [K] over them) the record also holds the ``diagnosis`` (the most probable
class), its ``diagnosis_probability`` and every class's probability (``class_probs``), and the
overlay shows the diagnosis and its probability; :func:`write_diagnosis_csv` writes the run's
``diagnosis.csv`` (ISIC 2018 Task 3 submission format) from the records at the end. Which instances are kept: those scoring at least
``min_confidence``; when none does but the model found something, the single best-scoring
detection is kept and the record says ``"fallback": true`` (a lesion image almost always has a
lesion, so an empty mask is rarely the better answer). Every file is written to a temporary name
and renamed into place, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import datetime
import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lesionkit.dataset_scan import IMAGE_EXTENSIONS, is_image_name
from mrcnn.errors import UserError
from mrcnn.fileio import write_json_atomic, write_text_atomic

SUMMARY_NAME = "summary.json"
#: The run's diagnoses, ISIC 2018 Task 3 submission format (diagnosing models only).
DIAGNOSIS_CSV = "diagnosis.csv"
SEGMENTATION_SUFFIX = "_segmentation.png"
OVERLAY_SUFFIX = "_overlay.png"
CROP_SUFFIX = "_crop.png"
#: File-name tails of what :func:`write_prediction` writes for an image id.
OUTPUT_SUFFIXES = (SEGMENTATION_SUFFIX, OVERLAY_SUFFIX, CROP_SUFFIX)


class InputError(UserError):
    """The images or the output folder asked for cannot be used (one-line message)."""


# -------------------------------------------------------------------------------------------
# Inputs and output folders


def list_images(spec: str, label: str = "input", skip_outputs: bool = False
                ) -> tuple[list[Path], list[str], bool]:
    """(image files, skipped names, single file?) for a file, a folder or a glob.

    With ``skip_outputs`` (the folder is also the output folder), files named like our own
    outputs (``*_segmentation.png``, ``*_overlay.png``, ``*_crop.png``) are skipped too, so a
    second run does not predict on the first run's files. Raises :class:`InputError` (message
    starting with ``label``) when ``spec`` does not exist, is a file that is not an image, or is
    a folder/glob without any image.
    """
    path = Path(spec)
    if path.is_file():
        if not is_image_name(path):
            raise InputError(f"{label} {spec} is not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
        return [path], [], True
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    elif glob.has_magic(spec):
        entries = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
    else:
        raise InputError(f"{label} {spec} does not exist")
    usable = [p for p in entries if is_image_name(p) and not (skip_outputs and p.name.endswith(OUTPUT_SUFFIXES))]
    skipped = [p.name for p in entries if p not in usable]
    if not usable:
        raise InputError(f"{label} {spec}: no image files found ({len(skipped)} other files)")
    return usable, skipped, False


def drop_duplicate_ids(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """(paths with distinct ids, later files whose id was already taken).

    The id is the file stem, which names the outputs (``<id>_segmentation.png``): of ``x.jpg``
    and ``x.png`` (or ``a/x.jpg`` and ``b/x.jpg`` from a glob) the first in order is kept, as the
    dataset scan does, instead of the second silently overwriting the first one's files.
    """
    kept: list[Path] = []
    duplicates: list[str] = []
    seen: set[str] = set()
    for path in paths:
        if path.stem in seen:
            duplicates.append(str(path.name) if path.parent == kept[0].parent else str(path))
            continue
        seen.add(path.stem)
        kept.append(path)
    return kept, duplicates


def make_output_dir(requested: str | Path | None, parent: str | Path) -> tuple[Path, list[Path]]:
    """``requested``, or a new timestamped folder under ``parent``; returns (path, the folders this
    call created, innermost first: what :func:`remove_empty_dirs` may remove after a failure).

    Raises :class:`InputError` when the folder is a file or cannot be created (permissions, a
    read-only or virtual file system).
    """
    if requested:
        out = Path(requested)
        if out.exists() and not out.is_dir():
            raise InputError(f"output folder {out} exists and is not a folder")
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out, n = Path(parent) / stamp, 1
        while out.exists():
            n += 1
            out = Path(parent) / f"{stamp}-{n}"
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise InputError(f"cannot write the output folder {out}: {exc.strerror or exc}") from None
    return out, created


def remove_empty_dirs(*folders: Path) -> None:
    """Remove each folder that is empty (innermost first), so a failed run leaves nothing behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


# -------------------------------------------------------------------------------------------
# PNG files (JSON: mrcnn.fileio.write_json_atomic)


def write_png_atomic(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB (H, W, 3) or single-channel (H, W) uint8 image as PNG, atomically."""
    from mrcnn.visualize import write_png  # local: matplotlib is not needed to list inputs

    return write_png(path, image)


# -------------------------------------------------------------------------------------------
# Choosing instances and building the lesion mask


def choose_instances(scores: np.ndarray, min_confidence: float) -> tuple[list[int], bool]:
    """Indices of detections scoring >= ``min_confidence``, best first, and whether we fell back.

    When none passes but there are detections, returns the best one and ``True``.
    """
    scores = np.asarray(scores, dtype=float).reshape(-1)
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    kept = [i for i in order if scores[i] >= min_confidence]
    if kept or not order:
        return kept, False
    return order[:1], True


def lesion_mask(masks: np.ndarray, indices: list[int], shape: tuple[int, int], top1: bool = False) -> np.ndarray:
    """Bool (H, W): union of ``masks[..., indices]`` (or only the first index with ``top1``)."""
    if not indices:
        return np.zeros(shape, dtype=bool)
    chosen = indices[:1] if top1 else indices
    return np.any(np.asarray(masks, dtype=bool)[..., chosen], axis=-1)


def mask_box(mask: np.ndarray) -> list[int] | None:
    """[y1, x1, y2, x2] (y2/x2 exclusive) around the True pixels, None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return [int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1]


def crop_lesion(image: np.ndarray, mask: np.ndarray, box: list[int]) -> np.ndarray:
    """The ``box`` region of ``image`` with pixels outside ``mask`` set to black."""
    y1, x1, y2, x2 = box
    crop = image[y1:y2, x1:x2].copy()
    crop[~mask[y1:y2, x1:x2]] = 0
    return crop


def instance_records(result: dict, indices: list[int], shape: tuple[int, int]) -> list[dict]:
    """Per kept instance: score, box [y1, x1, y2, x2], area in pixels and in % of the image."""
    total = float(shape[0] * shape[1]) or 1.0
    records = []
    for i in indices:
        area = int(np.count_nonzero(result["masks"][..., i]))
        records.append({
            "score": round(float(result["scores"][i]), 6),
            "box": [int(v) for v in np.asarray(result["rois"][i]).tolist()],
            "area_px": area,
            "area_pct": round(100.0 * area / total, 4),
        })
    return records


# -------------------------------------------------------------------------------------------
# Overlay


#: Outline colour of a mask from the refinement U-Net (lesionkit.refine); detector masks are green.
REFINED_COLOR = (0, 200, 255)


def refined_flags(result: dict, indices: list[int]) -> list[bool]:
    """Per index: was its mask refined (``result["refined"]``, set by lesionkit.refine)?"""
    flags = np.asarray(result.get("refined", np.zeros(0, bool)), dtype=bool).reshape(-1)
    return [bool(flags[i]) if i < flags.size else False for i in indices]


def make_overlay(image: np.ndarray, result: dict, indices: list[int], caption: str | None = None) -> np.ndarray:
    """Image with outline, box and score of each kept instance, and ``caption`` (the diagnosis)
    in a corner (mrcnn.visualize.draw_overlay); refined masks are outlined in :data:`REFINED_COLOR`."""
    from mrcnn.visualize import draw_overlay

    masks = np.asarray(result["masks"], dtype=bool)[..., indices]
    boxes = np.asarray(result["rois"]).reshape(-1, 4)[indices]
    scores = np.asarray(result["scores"]).reshape(-1)[indices]
    color = {"color": REFINED_COLOR} if any(refined_flags(result, indices)) else {}
    return draw_overlay(image, masks, boxes, scores, caption=caption, **color)


# -------------------------------------------------------------------------------------------
# Diagnosis (models with two or more CLASSES)


def diagnosis_fields(class_probs: Any, classes: Sequence[str]) -> dict[str, Any]:
    """An image's diagnosis record: ``diagnosis`` (most probable class, first on a tie),
    ``diagnosis_probability`` and ``class_probs`` ({class: probability}, in ``classes`` order)."""
    from lesionkit.diagnosis_labels import probability_text
    from lesionkit.diagnosis_metrics import predicted_indices

    probs = np.asarray(class_probs, dtype=np.float64).reshape(-1)
    if probs.shape[0] != len(classes):
        raise ValueError(f"{probs.shape[0]} class probabilities for {len(classes)} classes")
    best = int(predicted_indices(probs[None])[0])
    as_stored = {name: float(probability_text(p)) for name, p in zip(classes, probs, strict=True)}
    return {"diagnosis": classes[best], "diagnosis_probability": as_stored[classes[best]], "class_probs": as_stored}


def diagnosis_caption(record: dict) -> str | None:
    """``"mel 0.82"`` for a record with a diagnosis, else None."""
    if record.get("diagnosis") is None:
        return None
    return f"{record['diagnosis']} {record['diagnosis_probability']:.2f}"


def write_diagnosis_csv(out_dir: str | Path, records: Sequence[dict], classes: Sequence[str]) -> Path | None:
    """``out_dir/diagnosis.csv`` from the records' ``class_probs``, atomically; None when no record
    has a diagnosis (a one-class model).

    ISIC 2018 Task 3 submission format: ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, the image id
    without extension, probabilities (a Task 3 class the model lacks gets 0). When ``classes`` are
    not all Task 3 diagnoses the columns are ``image`` and the classes themselves, in config order.
    """
    from lesionkit.diagnosis_labels import LabelFileError, probability_text, to_task3_order, write_task3_csv

    rows = [(r["id"], [r["class_probs"][name] for name in classes]) for r in records if r.get("class_probs")]
    if not rows:
        return None
    path = Path(out_dir) / DIAGNOSIS_CSV
    try:
        return write_task3_csv(path, [(image_id, to_task3_order(p, classes)) for image_id, p in rows])
    except LabelFileError:  # classes outside Task 3: same layout, the config's own columns
        lines = ["image," + ",".join(classes)]
        lines += [f"{image_id}," + ",".join(probability_text(v) for v in p) for image_id, p in rows]
        return write_text_atomic(path, "\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------------
# One image, one run


def write_prediction(out_dir: str | Path, image_id: str, image: np.ndarray, result: dict,
                     min_confidence: float, top1: bool = False, crop: bool = False,
                     overlay: bool = True, classes: Sequence[str] | None = None) -> dict:
    """Write the files for one image (see module docstring) and return its JSON record.

    ``classes``: the diagnosis classes of a diagnosing model (``result["class_probs"]`` is over
    them); None for a one-class model, whose record has no diagnosis fields.
    """
    out_dir = Path(out_dir)
    shape = (int(image.shape[0]), int(image.shape[1]))
    n = int(np.asarray(result["scores"]).reshape(-1).size)
    masks = np.asarray(result["masks"], dtype=bool).reshape(shape + (n,))
    result = dict(result, masks=masks)
    indices, fell_back = choose_instances(result["scores"], min_confidence)
    mask = lesion_mask(masks, indices, shape, top1)
    record: dict[str, Any] = {
        "id": image_id, "height": shape[0], "width": shape[1],
        "instances": instance_records(result, indices[:1] if top1 else indices, shape),
        "fallback": fell_back,
        "refined": any(refined_flags(result, indices[:1] if top1 else indices)),
        "lesion_area_px": int(mask.sum()),
        "lesion_area_pct": round(100.0 * float(mask.sum()) / (shape[0] * shape[1]), 4),
    }
    if classes is not None and result.get("class_probs") is not None:
        record.update(diagnosis_fields(result["class_probs"], classes))
    files = {"segmentation": f"{image_id}{SEGMENTATION_SUFFIX}"}
    write_png_atomic(out_dir / files["segmentation"], mask.astype(np.uint8) * 255)
    if overlay:
        files["overlay"] = f"{image_id}{OVERLAY_SUFFIX}"
        write_png_atomic(out_dir / files["overlay"], make_overlay(image, result, indices[:1] if top1 else indices,
                                                                  diagnosis_caption(record)))
    if crop:
        box = mask_box(mask)
        record["crop_box"] = box
        if box is not None:
            files["crop"] = f"{image_id}{CROP_SUFFIX}"
            write_png_atomic(out_dir / files["crop"], crop_lesion(image, mask, box))
    record["files"] = files
    return record


def write_summary(out_dir: str | Path, records: list[dict], meta: dict,
                  classes: Sequence[str] | None = None) -> Path:
    """Write ``summary.json``: the run's settings (``meta``) and one record per image.

    With ``classes`` (a diagnosing model) ``diagnosis.csv`` is written first
    (:func:`write_diagnosis_csv`), and the summary adds ``classes``, ``diagnosis_csv`` (its name,
    None without any diagnosis) and ``n_by_diagnosis`` (images per diagnosed class).
    """
    payload = dict(meta)
    if classes is not None:
        csv_path = write_diagnosis_csv(out_dir, records, classes)
        payload["classes"] = list(classes)
        payload["diagnosis_csv"] = csv_path.name if csv_path else None
    payload["n_images"] = len(records)
    payload["n_with_lesion"] = sum(1 for r in records if r.get("instances"))
    diagnosed = [r["diagnosis"] for r in records if r.get("diagnosis") is not None]
    if diagnosed:
        payload["n_by_diagnosis"] = {name: diagnosed.count(name) for name in sorted(set(diagnosed))}
    payload["images"] = records
    return write_json_atomic(Path(out_dir) / SUMMARY_NAME, payload)
