#!/usr/bin/env python
"""Shift check: the validation images re-drawn under the shifts that real, unseen data shows.

A model tuned on one dataset (HAM10000 at 200x150) loses points on lesions from other cameras,
clinics and sizes (benchmarks/README.md: 0.820 on HAM val, 0.734 on 361 unseen real images). This
check makes such shifts from the validation split itself, deterministically (seeded by ``seed``
and the image's position), so every setting can be scored on val *and* under shift:

============== =========================================================================
kind           what changes
============== =========================================================================
larger         resized x1.8-2.5 (bicubic): a higher-resolution camera
smaller        resized x0.5-0.7 (area): a lower-resolution one
crop           an off-centre crop of 55-80 % of each side that keeps the lesion's centre
colour         per-channel gains 0.8-1.2, gamma 0.7-1.4, saturation 0.6-1.4
illumination   a linear brightness ramp from 0.55-0.8 to 1.1-1.3 across the image
vignette       the synthetic generator's dark corners / dermoscope field (lesionkit.synthetic)
ruler_hairs    a ruler and hairs drawn by the synthetic generator
============== =========================================================================

Image ``i`` of the sample gets kind ``KINDS[i % 7]``; images are written as JPEG (quality 90),
masks as PNG (0/255, nearest-neighbour for resizes, so they stay binary). :func:`kind_means`
gives the mean of each metric per kind and the number of images under 0.65 Jaccard. Used by
:mod:`benchmarks.quality`; alone::

    python benchmarks/shift_check.py --images DIR --masks DIR --out shift_set/   # writes the set
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from lesionkit.dataset_scan import Pair  # noqa: E402
from lesionkit.synthetic import add_artefacts  # noqa: E402
from mrcnn.fileio import write_bytes_atomic  # noqa: E402
from mrcnn.imaging import read_image, read_mask  # noqa: E402

KINDS = ("larger", "smaller", "crop", "colour", "illumination", "vignette", "ruler_hairs")
#: Jaccard below which an image counts 0 in the thresholded Jaccard (ISIC 2018).
FAIL_BELOW = 0.65


def _resize(image: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    size = (max(8, round(w * factor)), max(8, round(h * factor)))
    interpolation = cv2.INTER_CUBIC if factor > 1 else cv2.INTER_AREA
    return (cv2.resize(image, size, interpolation=interpolation),
            cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool))


def _crop(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = mask.shape
    ch, cw = (int(round(s * rng.uniform(0.55, 0.8))) for s in (h, w))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    cy = (rows[0] + rows[-1]) / 2 if rows.size else h / 2
    cx = (cols[0] + cols[-1]) / 2 if cols.size else w / 2
    # the window's top-left corner so that the lesion's centre stays inside, anywhere from edge to edge
    y0 = int(np.clip(rng.uniform(cy - ch + 1, cy), 0, h - ch))
    x0 = int(np.clip(rng.uniform(cx - cw + 1, cx), 0, w - cw))
    return image[y0:y0 + ch, x0:x0 + cw], mask[y0:y0 + ch, x0:x0 + cw]


def _colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    x = x * rng.uniform(0.8, 1.2, size=3)
    x = np.clip(x, 0, 1) ** rng.uniform(0.7, 1.4)
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.6, 1.4)
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def _illumination(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    t = (np.cos(angle) * xx / max(w - 1, 1) + np.sin(angle) * yy / max(h - 1, 1))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    low, high = rng.uniform(0.55, 0.8), rng.uniform(1.1, 1.3)
    gain = low + (high - low) * t
    return np.clip(image.astype(np.float32) * gain[..., None], 0, 255).astype(np.uint8)


def shift_pair(image: np.ndarray, mask: np.ndarray, kind: str,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H', W', 3], mask bool [H', W']) under shift ``kind`` (see the module table)."""
    if kind == "larger":
        return _resize(image, mask, rng.uniform(1.8, 2.5))
    if kind == "smaller":
        return _resize(image, mask, rng.uniform(0.5, 0.7))
    if kind == "crop":
        return _crop(image, mask, rng)
    if kind == "colour":
        return _colour(image, rng), mask
    if kind == "illumination":
        return _illumination(image, rng), mask
    if kind == "vignette":
        return add_artefacts(rng, image, ("vignette",)), mask
    if kind == "ruler_hairs":
        return add_artefacts(rng, image, ("hairs", "ruler")), mask
    raise ValueError(f"unknown shift {kind!r}; known: {', '.join(KINDS)}")


def write_shift_set(pairs: list[Pair], folder: Path, seed: int = 0) -> tuple[list[Pair], dict[str, str]]:
    """Write each pair under its shift into ``folder/images`` + ``folder/masks``; (new pairs, id -> kind).

    The new pairs keep each image's ``diagnosis``, so a diagnosing model is scored under shift too.
    """
    folder = Path(folder)
    pairs_out, kinds = [], {}
    for index, pair in enumerate(pairs):
        kind = KINDS[index % len(KINDS)]
        rng = np.random.default_rng([seed, index])
        image, mask = shift_pair(read_image(pair.image_path), read_mask(pair.mask_path), kind, rng)
        ok_jpg, jpg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        ok_png, png = cv2.imencode(".png", np.where(mask, 255, 0).astype(np.uint8))
        if not (ok_jpg and ok_png):
            raise RuntimeError(f"OpenCV could not encode the shifted {pair.image_id}")
        image_path = folder / "images" / f"{pair.image_id}.jpg"
        mask_path = folder / "masks" / f"{pair.image_id}_segmentation.png"
        write_bytes_atomic(image_path, jpg.tobytes())
        write_bytes_atomic(mask_path, png.tobytes())
        pairs_out.append(dataclasses.replace(pair, image_path=image_path, mask_path=mask_path))
        kinds[pair.image_id] = kind
    return pairs_out, kinds


def kind_means(rows: list[dict[str, Any]], kinds: dict[str, str], key: str = "jaccard") -> dict[str, Any]:
    """Per shift kind: mean ``key`` over its images; plus ``below_065`` (images under 0.65 Jaccard)."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        values = [float(r[key]) for r in rows if kinds.get(r["image_id"]) == kind]
        out[kind] = round(float(np.mean(values)), 4) if values else None
    out["below_065"] = sum(1 for r in rows if float(r["jaccard"]) < FAIL_BELOW)
    return out


def kind_accuracy(rows: list[dict[str, Any]], kinds: dict[str, str]) -> dict[str, Any]:
    """Per shift kind: the share of labelled images whose predicted diagnosis (``pred_dx``) is the
    true one (``true_dx``); None for a kind without labelled images (scores.csv rows)."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        hits = [r["pred_dx"] == r["true_dx"] for r in rows
                if kinds.get(r["image_id"]) == kind and r.get("true_dx") not in (None, "")]
        out[kind] = round(float(np.mean(hits)), 4) if hits else None
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the shift set of an image + mask folder pair (to look at, or to evaluate with lesions.py)."""
    p = argparse.ArgumentParser(prog="shift_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from lesionkit.dataset_scan import pair_folders

    pairs = pair_folders(args.images, args.masks, root=args.images).pairs
    written, kinds = write_shift_set(pairs, Path(args.out), args.seed)
    print(f"wrote {len(written)} shifted pairs into {args.out}/images + masks"
          f" ({', '.join(f'{k}: {list(kinds.values()).count(k)}' for k in KINDS)})")
    print(f"score a model on them: python lesions.py --mode evaluate --images {args.out}/images"
          f" --masks {args.out}/masks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
