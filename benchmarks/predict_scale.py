"""Prediction over a folder: images per second one-by-one vs batched, and memory over 10,000 images.

Generates synthetic dermoscopy images (``lesionkit.synthetic``) at the demo preset's size
(``configs/demo.toml``: DEMO_IMAGE_SIZE 128x160, molded to 128x128) into a temporary folder and
builds the demo preset's inference model with random weights (Keras' initialisers, seeded by
``--seed``; the graph keeps every detection, as ``lesions.py --mode predict`` does, so each image
has up to DETECTION_MAX_INSTANCES instances to write), or loads ``--weights FILE``.

**Speed** (``--speed-images``, default 64): each round runs, in rotating order,

* ``one_by_one``: the loop of a Matterport user and of predict before batching: read an image,
  ``model.detect([image])`` with BATCH_SIZE 1, write its files, next;
* ``batch_<B>`` for each ``--batch-sizes`` B: ``lesionkit.prediction_run.predict_images`` with a
  BATCH_SIZE B model (images decoded ahead and files written behind the model in threads);

and reports images/s per variant (median over ``--rounds``) and the ratio to ``one_by_one``.

**Scale** (``--scale-images``, default 10,000; 0 skips): ``predict_images`` over that many images
with ``--scale-batch`` (default: predict's default), sampling the process's resident memory
(VmRSS) and its peak (VmHWM, from /proc/self/status) before the run and after every 1,000 images.

Prints one JSON object on stdout (progress bars go to stderr; ``--record FILE`` also writes it)::

    python benchmarks/predict_scale.py
    python benchmarks/predict_scale.py --scale-images 0 --speed-images 32 --rounds 2   # speed only, quick
    python benchmarks/predict_scale.py --speed-images 0 --scale-images 10000          # memory only
"""

from __future__ import annotations

import argparse
import contextlib
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
from lesionkit.prediction_files import write_prediction  # noqa: E402
from lesionkit.prediction_run import DEFAULT_BATCH_SIZE, PredictOptions, predict_images  # noqa: E402
from lesionkit.synthetic import encode_pair, make_lesion_image  # noqa: E402
from mrcnn.fileio import write_bytes_atomic  # noqa: E402
from mrcnn.imaging import read_image  # noqa: E402

SAMPLE_EVERY = 1000


def memory_mb() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and its peak so far (VmHWM), in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key.lower()] = round(int(value.split()[0]) / 1024, 1)
    return fields


def write_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` synthetic lesion JPEGs of ``size`` (height, width) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image, masks = make_lesion_image(np.random.default_rng([seed, i]), *size)
        path = folder / f"SYN_{i:07d}.jpg"
        write_bytes_atomic(path, encode_pair(image, masks)[0])
        paths.append(path)
    return paths


def build_models(batch_sizes: list[int], weights: str | None, seed: int, overrides: list[str]
                 ) -> tuple[dict[int, object], object]:
    """{batch size: inference MaskRCNN of the demo preset + ``overrides``}, all with the same
    weights; the config."""
    import keras

    from lesionkit.prediction_run import load_inference_model
    from mrcnn import model as modellib

    keras.utils.set_random_seed(seed)
    models, first = {}, None
    for batch in sorted(set(batch_sizes)):
        config = lesions.build_config("demo", overrides, inference=True, batch_size=batch)
        if weights:
            models[batch] = load_inference_model(config, Path(weights), Path(tempfile.gettempdir()))
        else:
            models[batch] = modellib.MaskRCNN("inference", config.replace(DETECTION_MIN_CONFIDENCE=0.0),
                                              tempfile.gettempdir())
            if first is None:
                first = models[batch].keras_model.get_weights()
            models[batch].keras_model.set_weights(first)
    return models, lesions.build_config("demo", overrides, inference=True)


def one_by_one(model, paths: list[Path], out: Path, options: PredictOptions) -> None:
    """Read, detect one image, write; next (no threads, BATCH_SIZE 1)."""
    for path in paths:
        image = read_image(path)
        result = model.detect([image])[0]
        write_prediction(out, path.stem, image, result, options.min_confidence)


def measure_speed(models: dict, paths: list[Path], work: Path, batch_sizes: list[int], rounds: int,
                  confidence: float) -> dict:
    """Images/s per variant (median over rounds, rotating order), and ratios to one_by_one."""
    variants = {"one_by_one": lambda out: one_by_one(models[1], paths, out, PredictOptions(confidence, batch_size=1))}
    for batch in batch_sizes:
        variants[f"batch_{batch}"] = (lambda out, b=batch: predict_images(
            models[b], paths, out, PredictOptions(confidence, batch_size=b)))
    for model in models.values():  # trace each graph once before timing
        model.detect([read_image(paths[0])])
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out = work / f"speed-{name}-{r}"
            start = time.perf_counter()
            variants[name](out)
            rates[name].append(len(paths) / (time.perf_counter() - start))
            print(f"  round {r + 1}: {name} {rates[name][-1]:.1f} img/s", file=sys.stderr, flush=True)
    medians = {name: round(statistics.median(v), 2) for name, v in rates.items()}
    return {"images": len(paths), "rounds": rounds, "images_per_s": medians,
            "all_images_per_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
            "ratio_to_one_by_one": {k: round(v / medians["one_by_one"], 3) for k, v in medians.items()}}


def measure_scale(model, paths: list[Path], out: Path, batch: int, confidence: float) -> dict:
    """predict_images over ``paths`` with memory samples before and after every SAMPLE_EVERY images."""
    model.detect([read_image(paths[0])])
    samples = [{"images": 0, **memory_mb()}]
    done = [0]
    start = time.perf_counter()

    def sample(image_id: str, result: dict, kept: list[int]) -> None:
        done[0] += 1
        if done[0] % SAMPLE_EVERY == 0 or done[0] == len(paths):
            samples.append({"images": done[0], "seconds": round(time.perf_counter() - start, 1), **memory_mb()})
            print(f"  {samples[-1]}", file=sys.stderr, flush=True)

    records, unreadable = predict_images(model, paths, out, PredictOptions(confidence, batch_size=batch),
                                         on_result=sample)
    seconds = time.perf_counter() - start
    by_count = {s["images"]: s for s in samples}
    first = by_count.get(min(SAMPLE_EVERY, len(paths)))
    return {"images": len(paths), "written": len(records), "unreadable": len(unreadable), "batch_size": batch,
            "seconds": round(seconds, 1), "images_per_s": round(len(paths) / seconds, 2),
            "rss_mb_after_first_1000": first["vmrss"], "peak_rss_mb_after_first_1000": first["vmhwm"],
            "rss_mb_at_end": samples[-1]["vmrss"], "peak_rss_mb_at_end": samples[-1]["vmhwm"],
            "samples": samples}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speed-images", type=int, default=64, help="folder size for the speed comparison (0 skips)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scale-images", type=int, default=10_000, help="images for the memory run (0 skips)")
    p.add_argument("--scale-batch", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--weights", help="a checkpoint of the demo preset (default: random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a value of the demo preset, as lesions.py --set does (e.g. BACKBONE=\"resnet18\")")
    p.add_argument("--work", help="folder for images and outputs (default: a temporary folder, removed)")
    p.add_argument("--record", help="also write the JSON to this file")
    args = p.parse_args(argv)
    sizes = [1, *args.batch_sizes] if args.speed_images else []
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        models, config = build_models(sizes + ([args.scale_batch] if args.scale_images else []), args.weights,
                                      args.seed, args.set)
        size = tuple(int(v) for v in config.DEMO_IMAGE_SIZE)
        confidence = float(config.DETECTION_MIN_CONFIDENCE)
        result: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "config": "demo", "set": args.set, "image_size": list(size),
                        "weights": args.weights or "random",
                        "cpu_count": os.cpu_count(), "load_avg_start": list(os.getloadavg())}
        with contextlib.redirect_stdout(sys.stderr):  # progress bars and model messages: stderr
            if args.speed_images:
                paths = write_images(work / "speed", args.speed_images, size, args.seed)
                result["speed"] = measure_speed(models, paths, work, args.batch_sizes, args.rounds, confidence)
            if args.scale_images:
                start = time.perf_counter()
                paths = write_images(work / "scale", args.scale_images, size, args.seed + 1)
                result["scale_generate_seconds"] = round(time.perf_counter() - start, 1)
                result["scale"] = measure_scale(models[args.scale_batch], paths, work / "scale-out",
                                                args.scale_batch, confidence)
        result["load_avg_end"] = list(os.getloadavg())
    text = json.dumps(result)
    print(text)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
