"""File size and CPU latency per image of the exported models against Keras, in one run.

For each image size (IMAGE_MIN_DIM = IMAGE_MAX_DIM = size; the demo preset's 128 and 512 by
default) it builds the model of ``--config`` (default ``configs/demo.toml``) with ``--weights``
(a checkpoint; the same weights serve every size, the convolutions do not depend on it; ``none``:
random weights), writes SavedModel, ONNX and TFLite (float32 and float16) to a temporary folder,
and times ``MaskRCNN.detect`` (Keras, numpy pre/post-processing) and each file's runtime on the
same images (uint8 in, full-size masks out), rounds interleaved across formats; the median per
image is reported. One JSON line is printed (``--record FILE`` appends it)::

    python benchmarks/export_bench.py --weights last
    python benchmarks/export_bench.py --config tests/data/tiny.toml --sizes 64 --repeats 1 --weights none

Images: the real samples of ``../shared/data/real_samples`` when present (600x450 to 3024x2016),
else synthetic ones. Wall-clock times on a shared machine are noisy: run it on an idle one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lesions  # noqa: E402
from lesionkit import export  # noqa: E402

REAL_SAMPLES = REPO.parent / "shared" / "data" / "real_samples" / "images"


def bench_images(count: int) -> list[np.ndarray]:
    """Up to ``count`` real samples, else synthetic images."""
    spec = str(REAL_SAMPLES) if REAL_SAMPLES.is_dir() else None
    return export.check_images(spec, count)


def build_model(config_path: str, size: int, weights: Path | None):
    """Inference MaskRCNN of the preset at ``size`` px (square), weights loaded when given."""
    from mrcnn.model import MaskRCNN

    config = lesions.build_config(config_path, [f"IMAGE_MIN_DIM={size}", f"IMAGE_MAX_DIM={size}"], inference=True)
    model = MaskRCNN("inference", export.export_config(config), tempfile.mkdtemp())
    if weights is not None:
        model.load_weights(str(weights), by_name=False, strict=True, verbose=0)
    return model


def write_all(model, folder: Path, formats: list[str]) -> dict[str, Path]:
    """Every format's file (no agreement check: the CLI does that)."""
    from lesionkit.export_graph import DeployableDetector

    detector = DeployableDetector(model)
    paths = {"saved_model": export.write_saved_model(detector, folder / "saved_model")[0]}
    if "onnx" in formats:
        paths["onnx"] = export.write_onnx(detector, folder / "model.onnx")
    if "tflite" in formats:
        paths["tflite"] = export.write_tflite(model, folder / "model.tflite")
        paths["tflite_float16"] = export.write_tflite(model, folder / "model_float16.tflite", float16=True)
    return paths


def runners(model, paths: dict[str, Path]) -> dict:
    """name -> callable(uint8 image) for Keras and every written file."""
    make = {"saved_model": export.saved_model_runner, "onnx": export.onnx_runner,
            "tflite": export.tflite_runner, "tflite_float16": export.tflite_runner}
    return {"keras": lambda image: model.detect([image], verbose=0)[0],
            **{name: make[name](path) for name, path in paths.items()}}


def time_rounds(run: dict, images: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median ms per image of each runner; one warm-up call each, then rounds interleaved."""
    for fn in run.values():
        fn(images[0])
    times: dict[str, list[float]] = {name: [] for name in run}
    for _ in range(repeats):
        for image in images:
            for name, fn in run.items():
                start = time.perf_counter()
                fn(image)
                times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: round(statistics.median(values), 1) for name, values in times.items()}


def bench_size(args: argparse.Namespace, size: int, weights: Path | None, images: list[np.ndarray]) -> dict:
    model = build_model(args.config, size, weights)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_all(model, Path(folder), args.formats)
        sizes = {name: round(export.size_of(path) / 1e6, 1) for name, path in paths.items()}
        weights_mb = round(sum(v.nbytes for v in model.keras_model.get_weights()) / 1e6, 1)
        latency = time_rounds(runners(model, paths), images, args.repeats)
    return {"size": size, "mb": {"keras": weights_mb, **sizes}, "ms_per_image": latency}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    parser.add_argument("--weights", default="last", help="checkpoint, 'last' (newest under logs/) or 'none'")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", default="onnx,tflite", help="besides SavedModel: onnx,tflite")
    parser.add_argument("--record", type=Path)
    args = parser.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    weights = None if args.weights == "none" else lesions.resolve_model_weights(args.weights, REPO / "logs")
    images = bench_images(args.images)
    rows = [bench_size(args, size, weights, images) for size in args.sizes]
    result = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0],
              "weights": str(weights), "images": [list(im.shape[:2]) for im in images], "repeats": args.repeats,
              "rows": rows}
    line = json.dumps(result)
    print(line)
    if args.record:
        with args.record.open("a") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
