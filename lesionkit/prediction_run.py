"""Predicting lesion masks for many images with explicit values (no command-line arguments).

:func:`load_inference_model` builds the inference model from a run's config and checks that the
checkpoint describes exactly that architecture; :func:`predict_images` writes each image's
files (:mod:`lesionkit.prediction_files`) and returns their JSON records.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionkit.prediction_files import OUTPUT_SUFFIXES, choose_instances, write_prediction
from mrcnn.config import Config
from mrcnn.imaging import ImageReadError, read_image

#: Longest file name most file systems accept (bytes).
MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class PredictOptions:
    """What predict writes: instances scoring >= ``min_confidence`` (else the best one, as a
    fallback); only the best instance with ``top1``; crops with ``crop``; flips and rotations
    merged with ``tta``."""

    min_confidence: float
    top1: bool = False
    crop: bool = False
    tta: bool = False


def load_inference_model(config: Config, weights: Path, logs: Path) -> Any:
    """An inference ``MaskRCNN`` built from ``config`` with ``weights`` loaded.

    The graph keeps every detection (DETECTION_MIN_CONFIDENCE 0): :class:`PredictOptions` filters,
    with its fallback. The checkpoint must hold exactly the model's weighted layers with the same
    shapes, else :class:`mrcnn.weights.WeightsError` (e.g. a BACKBONE other than the run's).
    """
    print("Building the model (TensorFlow) ...", flush=True)
    from mrcnn import model as modellib
    from mrcnn.weights import WeightsError

    graph_config = config.replace(DETECTION_MIN_CONFIDENCE=0.0)
    model = modellib.MaskRCNN(mode="inference", config=graph_config, model_dir=str(logs))
    try:
        model.load_weights(str(weights), by_name=False, strict=True, verbose=0)
    except WeightsError as exc:
        raise WeightsError(f"{exc} (the checkpoint does not match the config: was it trained with another"
                           " BACKBONE, NUM_CLASSES or head size?)") from None
    print(f"Loaded weights {weights}", flush=True)
    return model


def output_name_too_long(image_id: str) -> bool:
    """True when one of the image's output file names would exceed :data:`MAX_NAME_BYTES`."""
    longest = max(len(suffix.encode()) for suffix in OUTPUT_SUFFIXES)
    return len(image_id.encode()) + longest > MAX_NAME_BYTES


def detect_one(model: Any, image: Any, options: PredictOptions) -> dict:
    """Matterport's result dict for one image (merged over flips and rotations with ``tta``)."""
    if options.tta:
        from lesionkit.tta import detect_tta

        return detect_tta(model, image, options.min_confidence)
    return model.detect([image], verbose=0)[0]


def predict_images(model: Any, paths: list[Path], out_dir: Path, options: PredictOptions,
                   on_result: Callable[[str, dict, list[int]], None] | None = None
                   ) -> tuple[list[dict], list[str]]:
    """Predict every image into ``out_dir``; (JSON records, unreadable file names).

    ``on_result(image_id, result, kept_indices)`` is called after each image (evaluation uses it).
    A progress bar with ETA is shown for two images or more.
    """
    from tqdm import tqdm

    records, unreadable = [], []
    bar = tqdm(paths, desc="predict" + (" +tta" if options.tta else ""), unit="img", disable=len(paths) < 2,
               file=sys.stdout, dynamic_ncols=True)
    for path in bar:
        try:
            image = read_image(path)
        except ImageReadError as exc:
            unreadable.append(path.name)
            tqdm.write(f"  skipped unreadable {path.name}: {' '.join(str(exc).split())}")
            continue
        result = detect_one(model, image, options)
        record = write_prediction(out_dir, path.stem, image, result, options.min_confidence,
                                  top1=options.top1, crop=options.crop)
        record["image"] = str(path)
        records.append(record)
        if on_result is not None:
            on_result(path.stem, result, choose_instances(result["scores"], options.min_confidence)[0])
    return records, unreadable
