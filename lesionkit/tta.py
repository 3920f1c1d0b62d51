"""Test-time augmentation (TTA) for lesion segmentation: flips and 90-degree rotations.

:func:`detect_tta` runs ``model.detect`` on the image and on each transformed copy, maps each
result's lesion mask (union of the instances scoring at least ``min_confidence``, or the best one
when none does) back to the original orientation exactly (flips and rotations are permutations of
pixels), and merges them by pixel-wise majority vote. The merged lesion is returned as a single
instance in ``detect``'s format, with the mean of the variants' best scores as its score, so
:mod:`lesionkit.prediction_files` writes it like any other result. :func:`detect_tta_batch` does
the same for several images with one ``detect`` call over all their variants (which ``detect``
batches by BATCH_SIZE). With a :class:`lesionkit.refine.inference.RefinedDetector` as ``model``
both stages run on every variant, and the merged result says ``refined`` when any variant's mask
was refined. A diagnosing model's ``class_probs`` are averaged over the variants.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

#: name -> (forward transform, inverse transform) on [H, W, ...] arrays.
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (lambda a: a, lambda a: a),
    "hflip": (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
    "vflip": (lambda a: a[::-1], lambda a: a[::-1]),
    "rot90": (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
}


def best_lesion_mask(result: dict, shape: tuple[int, int], min_confidence: float) -> tuple[np.ndarray, float]:
    """(bool [H, W] union of instances >= ``min_confidence`` (else the best one), best score or 0)."""
    scores = np.asarray(result["scores"], dtype=float).reshape(-1)
    if scores.size == 0:
        return np.zeros(shape, dtype=bool), 0.0
    masks = np.asarray(result["masks"], dtype=bool).reshape(shape + (scores.size,))
    keep = scores >= min_confidence
    if not keep.any():
        keep = scores == scores.max()
    return masks[..., keep].any(axis=-1), float(scores.max())


def merge_masks(masks: list[np.ndarray]) -> np.ndarray:
    """Pixel-wise majority vote (ties count as lesion) of bool [H, W] masks."""
    votes = np.sum(np.stack(masks).astype(np.int32), axis=0)
    return 2 * votes >= len(masks)


def as_result(mask: np.ndarray, score: float) -> dict[str, np.ndarray]:
    """One-instance (or empty) result dict in ``MaskRCNN.detect``'s format."""
    if not mask.any() or score <= 0:
        h, w = mask.shape
        return {"rois": np.zeros((0, 4), np.int32), "class_ids": np.zeros((0,), np.int32),
                "scores": np.zeros((0,), np.float32), "masks": np.zeros((h, w, 0), bool)}
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]
    return {"rois": np.array([box], np.int32), "class_ids": np.array([1], np.int32),
            "scores": np.array([score], np.float32), "masks": mask[..., None]}


def detect_tta_batch(model: Any, images: list[np.ndarray], min_confidence: float = 0.5,
                     transforms: tuple[str, ...] = tuple(TRANSFORMS)) -> list[dict[str, np.ndarray]]:
    """:func:`detect_tta` for each image; one ``model.detect`` call over every image's variants."""
    variants = [np.ascontiguousarray(TRANSFORMS[name][0](image)) for image in images for name in transforms]
    results = model.detect(variants, verbose=0) if variants else []
    merged = []
    for i, image in enumerate(images):
        masks, scores, refined, class_probs = [], [], [], []
        for j, name in enumerate(transforms):
            variant, result = variants[i * len(transforms) + j], results[i * len(transforms) + j]
            mask, score = best_lesion_mask(result, variant.shape[:2], min_confidence)
            masks.append(np.ascontiguousarray(TRANSFORMS[name][1](mask)))
            scores.append(score)
            refined.append(bool(np.asarray(result.get("refined", False)).any()))  # lesionkit.refine's flag
            if result.get("class_probs") is not None:
                class_probs.append(np.asarray(result["class_probs"], dtype=np.float32))
        found = [s for s in scores if s > 0]
        mask = merge_masks(masks) if masks else np.zeros((int(image.shape[0]), int(image.shape[1])), bool)
        out = as_result(mask, float(np.mean(found)) if found else 0.0)
        out["refined"] = np.full(out["scores"].shape, any(refined))  # both stages ran on every variant
        if class_probs:  # a diagnosing model: the mean of the variants' class probabilities
            out["class_probs"] = np.mean(np.stack(class_probs), axis=0).astype(np.float32)
        merged.append(out)
    return merged


def detect_tta(model: Any, image: np.ndarray, min_confidence: float = 0.5,
               transforms: tuple[str, ...] = tuple(TRANSFORMS)) -> dict[str, np.ndarray]:
    """``detect`` on ``image`` under each transform, masks mapped back and merged (one instance)."""
    return detect_tta_batch(model, [image], min_confidence, transforms)[0]
