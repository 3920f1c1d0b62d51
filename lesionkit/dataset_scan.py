"""Finding lesion images and masks on disk, checking them, and splitting them.

Two folder layouts are recognised (the first one found wins):

* **ISIC 2018 Task 1**: ``ISIC2018_Task1-2_Training_Input/<id>.jpg`` and
  ``ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png``;
* **plain**: ``images/<id>.jpg`` and ``masks/<id>_segmentation.png``, optionally with a
  ``metadata.csv`` whose ``image_id`` and ``split`` (``train``/``val``) columns fix the split
  (as in HAM10000 exports).

:func:`scan_dataset` pairs images with masks without decoding whole images (headers, a 1/8-scale
JPEG decode, PNG chunk checksums), so it stays fast and light on thousands of files and on very
large images. Everything that cannot be
used is counted in a :class:`ScanReport` with the first few names, for the user to see before
training starts. :func:`split_ids` makes a deterministic train/validation split.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from mrcnn.errors import UserError
from mrcnn.fileio import write_json_atomic

#: File extensions treated as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: Suffix of an ISIC ground-truth mask file: ``<id>_segmentation.png``.
MASK_SUFFIX = "_segmentation.png"
#: (layout name, image folder, mask folder), in the order they are looked for.
LAYOUTS = (
    ("isic2018", "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    ("plain", "images", "masks"),
)
#: How many example names a report shows per problem.
SHOW_FIRST = 5


class DatasetLayoutError(UserError):
    """The dataset folder is missing, empty or not in a known layout (one-line message)."""


@dataclass(frozen=True)
class Pair:
    """One usable image with its ground-truth mask."""

    image_id: str
    image_path: Path
    mask_path: Path
    #: The image's diagnosis (one of ``config.CLASSES``) when the scan read labels, else None.
    diagnosis: str | None = None


@dataclass
class ScanReport:
    """What :func:`scan_dataset` found: usable pairs and every kind of problem, by name."""

    root: Path
    layout: str
    image_dir: Path
    mask_dir: Path
    pairs: list[Pair] = field(default_factory=list)
    images_without_mask: list[str] = field(default_factory=list)
    masks_without_image: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    splits: dict[str, str] | None = None
    # Diagnosis labels (filled by lesionkit.diagnosis_labels.attach_labels for a diagnosing config)
    label_missing: list[str] = field(default_factory=list)
    label_unknown: list[str] = field(default_factory=list)
    label_files_bad: list[str] = field(default_factory=list)
    label_files: list[str] = field(default_factory=list)
    #: False when unlabelled images are kept (evaluation) rather than skipped (training).
    labels_required: bool = True

    PROBLEMS = (
        ("images_without_mask", "image(s) without a mask (skipped)"),
        ("masks_without_image", "mask(s) without an image (ignored)"),
        ("unreadable", "unreadable or truncated file(s) (skipped)"),
        ("size_mismatch", "mask(s) of a different size than the image (skipped)"),
        ("duplicate_ids", "duplicate id(s) (first file kept)"),
        ("not_images", "non-image file(s) (ignored)"),
        ("label_missing", "image(s) without a diagnosis label (skipped)"),
        ("label_unknown", "image(s) with a diagnosis not in CLASSES (skipped)"),
        ("label_files_bad", "label file(s) that do not parse (ignored)"),
    )

    def problem_lines(self, show: int = SHOW_FIRST) -> list[str]:
        """One human-readable line per kind of problem found, with the first ``show`` names."""
        lines = []
        for attr, text in self.PROBLEMS:
            names = getattr(self, attr)
            if attr.startswith("label_") and attr != "label_files_bad" and not self.labels_required:
                text = text.replace("(skipped)", "(segmentation scored, no diagnosis)")
            if names:
                more = f", ... ({len(names) - show} more)" if len(names) > show else ""
                lines.append(f"{len(names)} {text}: {', '.join(names[:show])}{more}")
        return lines

    def to_dict(self) -> dict:
        """Counts and the full name lists, JSON-friendly (written next to the split)."""
        out: dict = {"root": str(self.root), "layout": self.layout, "usable_pairs": len(self.pairs)}
        for attr, _ in self.PROBLEMS:
            out[attr] = list(getattr(self, attr))
        if self.label_files:
            out["label_files"] = list(self.label_files)
            counts: dict[str, int] = {}
            for pair in self.pairs:
                if pair.diagnosis is not None:
                    counts[pair.diagnosis] = counts.get(pair.diagnosis, 0) + 1
            out["diagnoses"] = dict(sorted(counts.items()))
        return out


# -------------------------------------------------------------------------------------------
# Layout


def find_layout(root: str | Path) -> tuple[str, Path, Path]:
    """Return (layout name, image folder, mask folder) for ``root``.

    Raises :class:`DatasetLayoutError` naming the folders expected when none is found.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset path {root} is not a folder")
    for name, images, masks in LAYOUTS:
        if (root / images).is_dir():
            if not (root / masks).is_dir():
                raise DatasetLayoutError(f"dataset {root} has {images}/ but no {masks}/ folder for the masks")
            return name, root / images, root / masks
    if not any(root.iterdir()):
        raise DatasetLayoutError(
            f"dataset folder {root} is empty; expected {LAYOUTS[0][1]}/ and {LAYOUTS[0][2]}/ (see isic2018/README.md)")
    expected = " or ".join(f"{i}/ + {m}/" for _, i, m in LAYOUTS)
    raise DatasetLayoutError(f"dataset folder {root} has no known layout; expected {expected} inside it")


def is_image_name(path: str | Path) -> bool:
    """True when the file name has an image extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def mask_id(path: Path) -> str | None:
    """``ISIC_0000000_segmentation.png`` -> ``ISIC_0000000`` (any image extension, e.g. a mask
    saved as ``_segmentation.jpg``); None for other names."""
    path = Path(path)
    tail = MASK_SUFFIX[: -len(".png")]
    if is_image_name(path) and path.stem.lower().endswith(tail):
        return path.stem[: -len(tail)]
    return None


# -------------------------------------------------------------------------------------------
# Cheap file checks (no full decode of large images)


def image_size(path: Path, decode: bool = True, exif: bool = True) -> tuple[int, int] | None:
    """(height, width), or None when the file is unreadable; never decodes a large image in full.

    With ``exif`` the size is the displayed one (EXIF rotation applied, as ``mrcnn.imaging.read_image``
    does for photos); without it, the stored one (masks: ``mrcnn.imaging.read_mask`` ignores EXIF).
    With ``decode`` the file is also checked for truncation without holding it in memory: a JPEG
    is decoded at 1/8 scale, a PNG has every chunk read and its checksum verified (no
    decompression), other formats are decoded.
    """
    stored = stored_and_displayed_size(path, decode)
    if stored is None:
        return None
    return stored[1] if exif else stored[0]


def stored_and_displayed_size(path: Path, decode: bool = True
                              ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((h, w) as stored, (h, w) as displayed after the EXIF rotation), or None when unreadable."""
    from PIL import Image  # local: keeps ``import lesions`` fast

    try:
        if path.stat().st_size == 0:
            return None
        with Image.open(path) as im:
            width, height = im.size
            orientation = _orientation(im)
            is_png = im.format == "PNG"
            if decode and not is_png:
                _check_decodes(im)
        if decode and is_png:  # verify() must come straight after open
            with Image.open(path) as im:
                _check_decodes(im)
    except Exception:  # noqa: BLE001 - PIL raises many kinds for broken files
        return None
    stored = (height, width)
    return stored, (stored[::-1] if orientation in (5, 6, 7, 8) else stored)


def _orientation(im) -> int:
    """The EXIF orientation tag of an open Pillow image (1 = as stored), without decoding it.

    Pillow's ``getexif()`` decodes a whole PNG to look for an eXIf chunk after the pixel data, so
    for a PNG only an eXIf chunk before the pixels (where the PNG specification puts it) counts.
    """
    from PIL import Image

    try:
        if im.format == "PNG":
            exif = Image.Exif()
            exif.load(im.info.get("exif") or b"")
            return int(exif.get(0x0112, 1))
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block is not fatal
        return 1


def _check_decodes(im) -> None:
    """Raise when ``im`` (a just-opened Pillow image) is truncated or corrupt; memory stays small."""
    if im.format == "PNG":
        im.verify()  # reads every chunk and checks its CRC up to IEND: catches truncation
    elif im.format == "JPEG":
        im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()
    else:
        im.load()


# -------------------------------------------------------------------------------------------
# Scanning


def _index_images(folder: Path, report: ScanReport) -> dict[str, Path]:
    """Map id -> image path for every image file in ``folder``; count non-images and duplicates."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() or path.name.startswith("."):
            continue
        if not is_image_name(path):
            report.not_images.append(path.name)
            continue
        if path.stem in found:
            report.duplicate_ids.append(path.name)
            continue
        found[path.stem] = path
    return found


def _index_masks(folder: Path, report: ScanReport) -> dict[str, Path]:
    """Map id -> mask path for every ``<id>_segmentation.png`` (or ``<id>.png``) in ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir() or path.name.startswith("."):
            continue
        key = mask_id(path) or (path.stem if is_image_name(path) else None)
        if key is None:
            report.not_images.append(path.name)
            continue
        if key in found:
            report.duplicate_ids.append(path.name)
            continue
        found[key] = path
    return found


def pair_folders(image_dir: str | Path, mask_dir: str | Path, check_files: bool = True,
                 root: str | Path | None = None, layout: str = "folders") -> ScanReport:
    """Pair ``image_dir/<id>.<ext>`` with ``mask_dir/<id>_segmentation.png``; report the rest.

    With ``check_files`` every image and mask is opened (header, 1/8-scale JPEG decode, PNG
    checksums) and unreadable ones or size mismatches are skipped and counted. The image's size
    is its displayed one (EXIF rotation applied), the mask's the stored one.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for folder, what in ((image_dir, "image"), (mask_dir, "mask")):
        if not folder.is_dir():
            raise DatasetLayoutError(f"{what} folder {folder} does not exist")
    report = ScanReport(root=Path(root or image_dir), layout=layout, image_dir=image_dir, mask_dir=mask_dir)
    images = _index_images(image_dir, report)
    masks = _index_masks(mask_dir, report)
    report.masks_without_image = sorted(masks.keys() - images.keys())
    for image_id, image_path in images.items():
        mask_path = masks.get(image_id)
        if mask_path is None:
            report.images_without_mask.append(image_path.name)
            continue
        if check_files and not _pair_is_usable(image_id, image_path, mask_path, report):
            continue
        report.pairs.append(Pair(image_id, image_path, mask_path))
    return report


def _pair_is_usable(image_id: str, image_path: Path, mask_path: Path, report: ScanReport) -> bool:
    """Check both files open and agree in size; record the problem otherwise."""
    sizes = stored_and_displayed_size(image_path, decode=True)
    if sizes is None:
        report.unreadable.append(image_path.name)
        return False
    stored, img = sizes
    msk = image_size(mask_path, decode=True, exif=False)  # masks are used as stored (see read_mask)
    if msk is None:
        report.unreadable.append(mask_path.name)
        return False
    if img != msk:
        hint = "; the mask matches the image before its EXIF rotation" if msk == stored else ""
        report.size_mismatch.append(f"{image_id} ({img[1]}x{img[0]} vs {msk[1]}x{msk[0]}{hint})")
        return False
    return True


def scan_dataset(root: str | Path, check_files: bool = True, classes: list[str] | None = None,
                 labels_required: bool = True) -> ScanReport:
    """Find the layout under ``root``, pair images with masks and read any ``metadata.csv`` split.

    With ``classes`` (the diagnosis classes of a diagnosing config) every pair also gets its
    diagnosis label (:func:`lesionkit.diagnosis_labels.attach_labels`: ``dx`` of metadata.csv or
    the ISIC 2018 Task 3 ground truth); pairs without a usable label are counted, and skipped
    unless ``labels_required`` is False (evaluation: their segmentation is still scored).
    Raises :class:`DatasetLayoutError` for a missing/empty/unknown folder or when no usable pair
    remains (the message says what was found instead).
    """
    layout, image_dir, mask_dir = find_layout(root)
    report = pair_folders(image_dir, mask_dir, check_files=check_files, root=root, layout=layout)
    report.splits = read_split_column(Path(root) / "metadata.csv")
    if not report.pairs:
        details = "; ".join(report.problem_lines(3)) or f"{image_dir.name}/ holds no images"
        raise DatasetLayoutError(f"no usable image/mask pair in {root}: {details}")
    if classes:
        from lesionkit.diagnosis_labels import attach_labels

        attach_labels(report, classes, required=labels_required)
    return report


def read_split_column(csv_path: Path) -> dict[str, str] | None:
    """``image_id -> 'train'|'val'`` from a metadata.csv with a ``split`` column, else None."""
    if not csv_path.is_file():
        return None
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "split" not in reader.fieldnames or "image_id" not in reader.fieldnames:
            return None
        splits = {}
        for row in reader:
            value = (row.get("split") or "").strip().lower()
            if value in ("train", "val", "validation"):
                splits[row["image_id"].strip()] = "val" if value.startswith("val") else "train"
    return splits or None


# -------------------------------------------------------------------------------------------
# Splitting


def split_ids(ids: list[str], val_fraction: float, seed: int | None,
              given: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Deterministic (train ids, val ids).

    With ``given`` (from metadata.csv) ids listed there keep their split; ids not listed are
    split like the rest. Otherwise the sorted ids are shuffled with ``random.Random(seed)`` and
    the first ``round(val_fraction * n)`` (at least 1 when ``val_fraction > 0`` and n >= 2) go to
    validation. Both lists come back sorted.
    """
    ids = sorted(set(ids))
    given = given or {}
    fixed_train = [i for i in ids if given.get(i) == "train"]
    fixed_val = [i for i in ids if given.get(i) == "val"]
    free = [i for i in ids if i not in given]
    n_val = int(round(val_fraction * len(free)))
    if not given and val_fraction > 0 and len(free) >= 2:
        n_val = min(max(n_val, 1), len(free) - 1)  # keep at least one image on each side
    order = list(free)
    random.Random(0 if seed is None else seed).shuffle(order)
    val = sorted(fixed_val + order[:n_val])
    train = sorted(fixed_train + order[n_val:])
    return train, val


def write_split(path: str | Path, train: list[str], val: list[str], extra: dict | None = None) -> Path:
    """Write ``{"train": [...], "val": [...], ...}`` as JSON atomically; returns the path."""
    payload = {"n_train": len(train), "n_val": len(val), "train": train, "val": val}
    payload.update(extra or {})
    return write_json_atomic(path, payload, indent=1)


# -------------------------------------------------------------------------------------------
# Synthetic demo data


def _demo_stamp(n_images: int, seed: int, size: tuple[int, int]) -> dict:
    return {"n_images": int(n_images), "seed": int(seed), "size": [int(size[0]), int(size[1])]}


def demo_data_is_current(root: str | Path, n_images: int, seed: int, size: tuple[int, int]) -> bool:
    """True when ``root`` holds demo data generated with exactly these settings."""
    stamp_file = Path(root) / "demo.json"
    try:
        return json.loads(stamp_file.read_text()) == _demo_stamp(n_images, seed, size)
    except (OSError, ValueError):
        return False


def ensure_demo_data(root: str | Path, n_images: int, seed: int, size: tuple[int, int]) -> Path:
    """Synthetic ISIC-layout data (:func:`lesionkit.synthetic.write_isic_dataset`) in ``root``.

    Reused while ``demo.json`` records the same settings; otherwise written into a temporary
    folder and renamed into place, so an interrupted generation never leaves half a dataset.
    """
    import shutil

    from lesionkit.synthetic import write_isic_dataset

    root = Path(root)
    if demo_data_is_current(root, n_images, seed, size):
        return root
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_isic_dataset(tmp, int(n_images), seed=int(seed), size=(int(size[0]), int(size[1])))
        (tmp / "demo.json").write_text(json.dumps(_demo_stamp(n_images, seed, size)))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# -------------------------------------------------------------------------------------------
# k-fold cross-validation


def kfold_split(ids: list[str], k: int, seed: int | None) -> list[tuple[list[str], list[str]]]:
    """``k`` deterministic (train ids, val ids) folds: every id is validated exactly once.

    The sorted ids are shuffled with ``random.Random(seed)`` and dealt round-robin into ``k``
    folds, so fold sizes differ by at most one. Raises ValueError when ``k`` is out of range.
    """
    ids = sorted(set(ids))
    if not 2 <= k <= len(ids):
        raise DatasetLayoutError(f"k-fold cross-validation with {k} folds needs 2 <= folds <= the number of images"
                                 f" ({len(ids)})")
    order = list(ids)
    random.Random(0 if seed is None else seed).shuffle(order)
    folds = [sorted(order[i::k]) for i in range(k)]
    return [(sorted(i for j, f in enumerate(folds) if j != n for i in f), folds[n]) for n in range(k)]


def mean_and_std(summaries: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """``{key: {"mean": m, "std": s}}`` over the folds' summaries (population std; None if absent)."""
    import math

    out: dict[str, dict[str, float | None]] = {}
    for key in keys:
        values = [float(s[key]) for s in summaries if s.get(key) is not None and not math.isnan(float(s[key]))]
        if not values:
            out[key] = {"mean": None, "std": None}
            continue
        mean = sum(values) / len(values)
        out[key] = {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))}
    return out


# -------------------------------------------------------------------------------------------
# Mask content


def count_empty_masks(pairs: list[Pair], limit: int = 200) -> tuple[int, int]:
    """(masks checked, masks without any lesion pixel) over at most ``limit`` pairs spread evenly.

    Decodes each checked mask in full (:func:`mrcnn.imaging.read_mask`, the one binarisation
    rule); unreadable masks are not counted (the scan reports them).
    """
    from mrcnn.imaging import ImageReadError, read_mask

    step = max(1, -(-len(pairs) // limit))
    checked = empty = 0
    for pair in pairs[::step]:
        try:
            mask = read_mask(pair.mask_path)
        except (ImageReadError, OSError):
            continue
        checked += 1
        empty += not mask.any()
    return checked, empty


def report_empty_masks(pairs: list[Pair]) -> tuple[int, int]:
    """Print a warning when every training mask checked holds no lesion (nothing to learn: inverted
    or colour-coded masks?), a note when some do; returns :func:`count_empty_masks`."""
    checked, empty = count_empty_masks(pairs)
    if checked and empty == checked:
        print(f"  warning: all {checked} training masks checked are empty (no lesion pixel): the model cannot"
              " learn a lesion; masks must show the lesion in white (255) on black (0)")
    elif empty:
        print(f"  note: {empty} of {checked} training masks checked are empty (images without a lesion)")
    return checked, empty


# -------------------------------------------------------------------------------------------
# Scan and split, reported


def scan_and_split(root: str | Path, val_fraction: float, seed: int | None, classes: list[str] | None = None,
                   labels_required: bool = True) -> tuple[ScanReport, list[str], list[str]]:
    """(scan report, train ids, validation ids) of ``root``, printing the layout, counts and problems.

    A ``split`` column in ``metadata.csv`` decides the split; otherwise :func:`split_ids` with
    ``val_fraction`` and ``seed``. ``classes``, ``labels_required``: diagnosis labels (:func:`scan_dataset`).
    """
    print(f"Scanning dataset {root} ...", flush=True)
    report = scan_dataset(root, classes=classes, labels_required=labels_required)
    ids = [p.image_id for p in report.pairs]
    train, val = split_ids(ids, val_fraction, seed, report.splits)
    how = "split column of metadata.csv" if report.splits else f"VALIDATION_FRACTION {val_fraction}, SEED {seed}"
    print(f"  layout {report.layout}: {len(ids)} usable image/mask pairs -> {len(train)} train,"
          f" {len(val)} validation ({how})")
    if report.label_files:
        counts = report.to_dict()["diagnoses"]
        print(f"  diagnosis labels from {', '.join(report.label_files)}: "
              + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for line in report.problem_lines():
        print(f"  warning: {line}")
    return report, train, val
