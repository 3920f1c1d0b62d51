"""Predicting lesion masks for many images with explicit values (no command-line arguments).

:func:`load_inference_model` builds the inference model from a run's config and checks that the
checkpoint describes exactly that architecture; :func:`predict_images` writes each image's
files (:mod:`lesionkit.prediction_files`) and returns their JSON records.

:func:`predict_images` is a three-stage pipeline so that a folder runs at the model's speed:
reader threads decode the next images ahead of the model (at most two batches ahead), the
calling thread runs the model on ``batch_size`` images at a time, and one writer thread writes
each image's files behind it (at most two batches behind). Memory stays that of a few batches
whatever the number of images; results, messages and records keep the input order.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lesionkit.prediction_files import OUTPUT_SUFFIXES, choose_instances, write_prediction
from mrcnn.config import Config, diagnosis_classes
from mrcnn.imaging import ImageReadError, read_image

#: Longest file name most file systems accept (bytes).
MAX_NAME_BYTES = 255
#: Images per model call for predict/evaluate unless asked otherwise: 1 measured fastest on a
#: 2-core CPU at the demo preset's size (benchmarks/README.md, "Batch prediction"); larger
#: batches are for GPUs (--batch-size).
DEFAULT_BATCH_SIZE = 1
#: Threads decoding images ahead of the model.
READ_THREADS = 2


@dataclass(frozen=True)
class PredictOptions:
    """What predict writes: instances scoring >= ``min_confidence`` (else the best one, as a
    fallback); only the best instance with ``top1``; crops with ``crop``; flips and rotations
    merged with ``tta``; ``batch_size`` images per model call (the model's own BATCH_SIZE is set
    to the same value by the CLI; a different one still works, ``detect`` splits or pads)."""

    min_confidence: float
    top1: bool = False
    crop: bool = False
    tta: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


def load_inference_model(config: Config, weights: Path, logs: Path, keep_all: bool = True) -> Any:
    """An inference ``MaskRCNN`` built from ``config`` with ``weights`` loaded.

    With ``keep_all`` the graph keeps every detection (DETECTION_MIN_CONFIDENCE 0):
    :class:`PredictOptions` filters, with its fallback; without it the config's threshold is in
    the graph (export). The checkpoint must hold exactly the model's weighted layers with the same
    shapes, else :class:`mrcnn.weights.WeightsError` (e.g. a BACKBONE other than the run's).
    """
    print("Building the model (TensorFlow) ...", flush=True)
    from mrcnn import model as modellib
    from mrcnn.weights import WeightsError

    graph_config = config.replace(DETECTION_MIN_CONFIDENCE=0.0) if keep_all else config
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


def detect_batch(model: Any, images: list[np.ndarray], options: PredictOptions) -> list[dict]:
    """Matterport's result dict for each image (merged over flips and rotations with ``tta``)."""
    if options.tta:
        from lesionkit.tta import detect_tta_batch

        return detect_tta_batch(model, images, options.min_confidence)
    return model.detect(images, verbose=0)


def _read_or_error(path: Path) -> np.ndarray | ImageReadError:
    try:
        return read_image(path)
    except ImageReadError as exc:
        return exc


def read_ahead(paths: Iterable[Path], pool: ThreadPoolExecutor, depth: int
               ) -> Iterator[tuple[Path, np.ndarray | ImageReadError]]:
    """(path, image [H, W, 3] uint8 or its ImageReadError) in ``paths`` order, decoding up to
    ``depth`` images ahead in ``pool``."""
    pending: collections.deque[tuple[Path, Future]] = collections.deque()
    remaining = iter(paths)
    for path in remaining:
        pending.append((path, pool.submit(_read_or_error, path)))
        if len(pending) >= depth:
            break
    while pending:
        path, future = pending.popleft()
        following = next(remaining, None)
        if following is not None:
            pending.append((following, pool.submit(_read_or_error, following)))
        yield path, future.result()


def readable_batches(paths: list[Path], pool: ThreadPoolExecutor, batch_size: int,
                     on_unreadable: Callable[[Path, ImageReadError], None]
                     ) -> Iterator[list[tuple[Path, np.ndarray]]]:
    """Lists of up to ``batch_size`` (path, image), in order; unreadable files go to ``on_unreadable``."""
    batch: list[tuple[Path, np.ndarray]] = []
    for path, image in read_ahead(paths, pool, depth=2 * batch_size):
        if isinstance(image, ImageReadError):
            on_unreadable(path, image)
            continue
        batch.append((path, image))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_images(model: Any, paths: list[Path], out_dir: Path, options: PredictOptions,
                   on_result: Callable[[str, dict, list[int]], None] | None = None
                   ) -> tuple[list[dict], list[str]]:
    """Predict every image into ``out_dir``; (JSON records in ``paths`` order, unreadable file names).

    Images are decoded ahead and files written behind the model in threads (module docstring),
    ``options.batch_size`` images per model call. ``on_result(image_id, result, kept_indices)``
    is called after each image's files are written, in order, from the writer thread (evaluation
    uses it). A progress bar with ETA counts the images done (shown for two images or more). On
    an exception or Ctrl-C the file being written is finished (files are written atomically),
    queued writes are dropped, and the exception propagates. A diagnosing model (``model.config``)
    adds each image's diagnosis to its record and overlay (:func:`lesionkit.prediction_files.
    write_prediction`); the caller's :func:`lesionkit.prediction_files.write_summary` with those
    classes writes ``diagnosis.csv``.
    """
    from tqdm import tqdm

    classes = diagnosis_classes(getattr(model, "config", None))
    records: list[dict] = []
    unreadable: list[str] = []
    bar = tqdm(total=len(paths), desc="predict" + (" +tta" if options.tta else ""), unit="img",
               disable=len(paths) < 2, file=sys.stdout, dynamic_ncols=True)

    def skip(path: Path, exc: ImageReadError) -> None:
        unreadable.append(path.name)
        tqdm.write(f"  skipped unreadable {path.name}: {' '.join(str(exc).split())}")
        bar.update(1)

    def write(path: Path, image: np.ndarray, result: dict) -> dict:
        record = write_prediction(out_dir, path.stem, image, result, options.min_confidence,
                                  top1=options.top1, crop=options.crop, classes=classes)
        record["image"] = str(path)
        if on_result is not None:
            on_result(path.stem, result, choose_instances(result["scores"], options.min_confidence)[0])
        return record

    def collect(pending: collections.deque[Future], keep: int) -> None:
        while len(pending) > keep:
            records.append(pending.popleft().result())
            bar.update(1)

    reader = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="predict-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="predict-write")  # one thread: records in order
    pending: collections.deque[Future] = collections.deque()
    try:
        for batch in readable_batches(paths, reader, options.batch_size, skip):
            results = detect_batch(model, [image for _, image in batch], options)
            pending.extend(writer.submit(write, path, image, result)
                           for (path, image), result in zip(batch, results, strict=True))
            collect(pending, keep=2 * options.batch_size)
        collect(pending, keep=0)
    finally:
        writer.shutdown(wait=True, cancel_futures=True)
        reader.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return records, unreadable
