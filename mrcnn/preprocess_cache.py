"""Preprocessing cache: decode and resize each training image and its masks once, keep the result.

ISIC images are up to 6000x4000 JPEGs; decoding and resampling one takes far longer than a
training step needs. :class:`PreprocessCache` stores what :func:`resize_sample` returns (the
image resized and padded as ``IMAGE_RESIZE_MODE`` / ``IMAGE_MIN_DIM`` / ``IMAGE_MAX_DIM`` /
``IMAGE_MIN_SCALE`` ask, its masks resized alike, and window / scale / padding) in one ``.npz``
per image::

    <cache root>/<mode>_min<IMAGE_MIN_DIM>_max<IMAGE_MAX_DIM>_scale<IMAGE_MIN_SCALE>/<image id>-<hash>.npz

Each entry records a key: the source files' absolute paths, sizes and mtimes (``path`` and every
``*_path`` of the image's ``image_info``), the resize settings, whether the dataset applies EXIF
orientation (``APPLY_EXIF_ORIENTATION``, also part of the entry's file name, so a dataset reading
stored pixels and one reading upright images keep separate entries of the same file), the dataset
class's ``load_image``/``load_mask`` code, ``mrcnn/imaging.py`` and the library versions. An entry whose
key differs, or that cannot be read completely (truncated, bad CRC, wrong shapes), is rebuilt
and replaced. Entries are written to a temporary file and renamed into place, so parallel
tf.data workers (or two runs) never see half a file; a cache folder that cannot be written only
costs the speed-up (one warning). ``crop`` mode draws a random crop per call and is not cached.

The cache is opt-in for :class:`mrcnn.utils.Dataset` users: set ``dataset.preprocess_cache =
PreprocessCache(folder)`` and :func:`mrcnn.input_pipeline.load_image_gt` uses it. Augmentation still runs
after the (cached) resize. Boxes and windows are (y1, x1, y2, x2), pixels, y2/x2 exclusive.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrcnn import imaging
from mrcnn.fileio import atomic_path
from mrcnn.imaging import resize_image, resize_mask

logger = logging.getLogger(__name__)

#: Bump when the entry layout or the meaning of its arrays changes.
FORMAT_VERSION = 1
#: Default folder name under the dataset root (``isic2018/cache/``).
CACHE_FOLDER = "cache"
#: Resize modes whose result is a pure function of the image and settings (``crop`` is random).
CACHEABLE_MODES = ("none", "square", "pad64")


@dataclass
class ResizedSample:
    """One image and its instances after :func:`mrcnn.imaging.resize_image`, before augmentation.

    image uint8 [H, W, 3]; mask bool [H, W, N]; class_ids int32 [N]; original_shape (h, w, c) of
    the decoded file; window (y1, x1, y2, x2) of the image inside the padded result; scale the
    resize factor; padding [(top, bottom), (left, right), (0, 0)]; crop (y, x, h, w) or None.
    """

    image: np.ndarray
    mask: np.ndarray
    class_ids: np.ndarray
    original_shape: tuple[int, ...]
    window: tuple[int, int, int, int]
    scale: float
    padding: list[tuple[int, int]]
    crop: Any = None


# -------------------------------------------------------------------------------------------
# The uncached path


def resize_settings(config: Any) -> dict[str, Any]:
    """The config values the resized result depends on."""
    return {"mode": str(config.IMAGE_RESIZE_MODE), "min_dim": config.IMAGE_MIN_DIM,
            "max_dim": config.IMAGE_MAX_DIM, "min_scale": config.IMAGE_MIN_SCALE}


def resize_sample(dataset: Any, config: Any, image_id: int) -> ResizedSample:
    """Decode image ``image_id`` and its masks and resize both as the config says (no cache)."""
    image = dataset.load_image(image_id)
    mask, class_ids = dataset.load_mask(image_id)
    original_shape = tuple(int(v) for v in image.shape)
    settings = resize_settings(config)
    image, window, scale, padding, crop = resize_image(
        image, min_dim=settings["min_dim"], min_scale=settings["min_scale"], max_dim=settings["max_dim"],
        mode=settings["mode"])
    mask = np.asarray(mask, dtype=bool).reshape(mask.shape[0], mask.shape[1], -1)
    mask = resize_mask(mask, scale, padding, crop) if mask.shape[0] else np.zeros(image.shape[:2] + (0,), bool)
    class_ids = np.asarray(class_ids, dtype=np.int32).reshape(-1)
    return ResizedSample(image, mask, class_ids, original_shape, tuple(int(v) for v in window), scale,
                         [(int(a), int(b)) for a, b in padding], crop)


# -------------------------------------------------------------------------------------------
# Keys


def source_files(info: dict[str, Any]) -> list[str]:
    """Absolute paths of an image's source files: ``path`` and every ``*_path`` entry of its info."""
    names = ["path"] + sorted(k for k in info if k.endswith("_path"))
    values = [info.get(k) for k in names]
    return [os.path.abspath(v) for v in values if isinstance(v, (str, os.PathLike)) and str(v)]


def file_stamp(path: str) -> list[Any]:
    """[path, size in bytes, mtime in ns]; size and mtime are -1 for a file that cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return [path, -1, -1]
    return [path, int(st.st_size), int(st.st_mtime_ns)]


def _file_digest(path: str | None) -> str:
    """sha1 of a file's bytes ("" when it cannot be read)."""
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest() if path else ""
    except OSError:
        return ""


def _code_text(obj: Any) -> str:
    """Source code of a function (its qualified name when the source is not available)."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return getattr(obj, "__qualname__", repr(obj))


def code_fingerprint(dataset_class: type) -> str:
    """Hash of the code that produces an entry: loaders, imaging.py, this module and library versions."""
    import PIL
    import scipy

    parts = [str(FORMAT_VERSION), np.__version__, scipy.__version__, PIL.__version__,
             _file_digest(imaging.__file__), _file_digest(__file__),
             _code_text(dataset_class.load_image), _code_text(dataset_class.load_mask)]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def exif_orientation(dataset: Any) -> bool:
    """The dataset's ``APPLY_EXIF_ORIENTATION`` (False, pixels as stored, when it has none)."""
    return bool(getattr(dataset, "APPLY_EXIF_ORIENTATION", False))


def entry_key(info: dict[str, Any], settings: dict[str, Any], code: str, exif: bool = False) -> str:
    """The JSON key stored in (and compared with) an entry."""
    stamps = [file_stamp(p) for p in source_files(info)]
    fields = {"version": FORMAT_VERSION, "id": str(info.get("id")), "source": str(info.get("source")),
              "files": stamps, "settings": settings, "exif": bool(exif), "code": code}
    if "instance_class" in info:  # a dataset that gives instances a per-image class (diagnosis)
        fields["instance_class"] = int(info["instance_class"])
    return json.dumps(fields, sort_keys=True)


def settings_folder(settings: dict[str, Any]) -> str:
    """Folder name for one set of resize settings, e.g. ``square_min800_max1024_scale0``."""
    name = f"{settings['mode']}_min{settings['min_dim']}_max{settings['max_dim']}_scale{settings['min_scale']:g}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def entry_name(info: dict[str, Any], exif: bool = False) -> str:
    """File name of an image's entry: its id (sanitised) plus a hash of its source, path and EXIF setting."""
    ident = f"{info.get('source')}\n{info.get('id')}\n{'|'.join(source_files(info))}\nexif={bool(exif)}"
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(info.get("id")))[:80] or "image"
    return f"{stem}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}.npz"


# -------------------------------------------------------------------------------------------
# Entries on disk


def write_entry(path: Path, sample: ResizedSample, key: str) -> None:
    """Write ``sample`` and ``key`` to ``path`` atomically (:func:`mrcnn.fileio.atomic_path`)."""
    arrays = {
        "key": np.array(key),
        "image": np.ascontiguousarray(sample.image),
        "mask_bits": np.packbits(sample.mask, axis=None),
        "mask_shape": np.array(sample.mask.shape, dtype=np.int64),
        "class_ids": np.asarray(sample.class_ids, dtype=np.int32),
        "original_shape": np.array(sample.original_shape, dtype=np.int64),
        "window": np.array(sample.window, dtype=np.int64),
        "scale": np.array(sample.scale),  # int 1 stays int: image_meta's dtype follows it
        "padding": np.array(sample.padding, dtype=np.int64).reshape(-1, 2),
    }
    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _unpack_entry(z: Any) -> ResizedSample:
    """ResizedSample from an opened entry; ValueError when the arrays do not fit together."""
    image = z["image"]
    shape = tuple(int(v) for v in z["mask_shape"])
    bits = z["mask_bits"]
    if image.dtype != np.uint8 or image.ndim != 3 or len(shape) != 3 or shape[:2] != image.shape[:2]:
        raise ValueError(f"image {image.shape} {image.dtype} and mask {shape} do not fit")
    count = int(np.prod(shape))
    if bits.dtype != np.uint8 or bits.size != (count + 7) // 8:
        raise ValueError("mask bits have the wrong size")
    mask = np.unpackbits(bits, count=count).reshape(shape).view(bool)
    class_ids = z["class_ids"]
    window, padding = z["window"], z["padding"]
    if class_ids.shape != (shape[2],) or window.shape != (4,) or padding.ndim != 2 or padding.shape[1] != 2:
        raise ValueError("class ids, window or padding have the wrong shape")
    scale = z["scale"].item()
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale {scale!r} is not a number")
    return ResizedSample(image, mask, class_ids.astype(np.int32), tuple(int(v) for v in z["original_shape"]),
                         tuple(int(v) for v in window), scale, [(int(a), int(b)) for a, b in padding], None)


def read_entry(path: Path, key: str) -> tuple[ResizedSample | None, str]:
    """(sample, "hit"), or (None, "missing" | "stale" | "corrupt") when it must be (re)built."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None, "stale"
            return _unpack_entry(z), "hit"
    except FileNotFoundError:
        return None, "missing"
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt, never fatal
        logger.warning("preprocessing cache: rebuilding unreadable entry %s (%s)", path, " ".join(str(exc).split()))
        return None, "corrupt"


# -------------------------------------------------------------------------------------------
# The cache


class PreprocessCache:
    """Resized images and masks under ``root``; thread-safe; counts hits, misses and rebuilds.

    ``stats`` counts "hit", "missing" (built for the first time), "stale" (a source file or the
    code changed), "corrupt" (unreadable entry), "uncached" (crop mode) and "write_failed".
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._code: dict[type, str] = {}
        self._warned_write = False

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def fingerprint(self, dataset_class: type) -> str:
        """code_fingerprint of a dataset class, computed once."""
        code = self._code.get(dataset_class)
        if code is None:
            code = self._code[dataset_class] = code_fingerprint(dataset_class)
        return code

    def entry_path(self, dataset: Any, config: Any, image_id: int) -> Path:
        """Where image ``image_id``'s entry for ``config``'s resize settings lives."""
        return (self.root / settings_folder(resize_settings(config))
                / entry_name(dataset.image_info[image_id], exif_orientation(dataset)))

    def load(self, dataset: Any, config: Any, image_id: int) -> ResizedSample:
        """The resized sample: read from the cache, or built with :func:`resize_sample` and stored."""
        settings = resize_settings(config)
        if settings["mode"] not in CACHEABLE_MODES:
            self._count("uncached")
            return resize_sample(dataset, config, image_id)
        info = dataset.image_info[image_id]
        exif = exif_orientation(dataset)
        key = entry_key(info, settings, self.fingerprint(type(dataset)), exif)
        path = self.root / settings_folder(settings) / entry_name(info, exif)
        sample, status = read_entry(path, key)
        self._count(status)
        if sample is not None:
            return sample
        sample = resize_sample(dataset, config, image_id)
        self._store(path, sample, key)
        return sample

    def _store(self, path: Path, sample: ResizedSample, key: str) -> None:
        """Write an entry; a failure (read-only folder, disk full) is counted and warned about once."""
        try:
            write_entry(path, sample, key)
        except OSError as exc:
            self._count("write_failed")
            if not self._warned_write:
                self._warned_write = True
                logger.warning("preprocessing cache: cannot write %s (%s); continuing without caching",
                               path.parent, " ".join(str(exc).split()))

    def summary(self) -> str:
        """One line: folder and counts, e.g. ``isic2018/cache: 80 hits, 20 built, 0 rebuilt``."""
        s = self.stats
        line = (f"{self.root}: {s['hit']} hits, {s['missing']} built, {s['stale'] + s['corrupt']} rebuilt")
        if s["write_failed"]:
            line += f", {s['write_failed']} not written"
        if s["uncached"]:
            line += f", {s['uncached']} uncached (crop mode)"
        return line
