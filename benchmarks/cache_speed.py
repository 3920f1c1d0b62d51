"""Speed of the preprocessing cache: decode + resize per epoch, uncached vs cached.

Generates synthetic ISIC-sized JPEGs (default 6 at 4000x3000, smooth colour + noise, quality 92,
about 3 MB each, with masks) into a temporary folder and, when present, also uses the six real
dermoscopy samples of ``../shared/data/real_samples`` (read in place; their cache goes to a
temporary folder). For each IMAGE_MAX_DIM it times epochs of ``resize_sample`` (what
``load_image_gt`` does without the cache), the first cached epoch (decode + resize + write), and
cached epochs (read the ``.npz``), checks the cached arrays equal the uncached ones, and prints one
JSON object (``--record FILE`` also writes it)::

    python benchmarks/cache_speed.py
    python benchmarks/cache_speed.py --images 6 --size 4000x3000 --max-dims 512 1024 --epochs 3

Files are read from the page cache in both cases (warm epochs), as in training on a machine whose
memory holds the dataset; from a cold disk the uncached path also pays for reading the JPEG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lesions  # noqa: E402
from lesionkit import dataset_scan  # noqa: E402
from mrcnn.preprocess_cache import PreprocessCache, resize_sample  # noqa: E402

REAL_SAMPLES = REPO.parent / "shared" / "data" / "real_samples"


def write_synthetic(root: Path, n: int, width: int, height: int, seed: int = 0) -> None:
    """n JPEGs [height, width] (skin-like gradients + noise + a dark ellipse) and 0/255 PNG masks."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.1, 0.3) * height, rng.uniform(0.1, 0.3) * width
        lesion = (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 <= 1
        base = np.stack([190 + 25 * np.sin(xx / (200 + 40 * i)), 150 + 20 * np.cos(yy / 260),
                         130 + 20 * np.sin((xx + yy) / 380)], axis=-1)
        base[lesion] *= 0.55
        image = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"SYN_{i:07d}.jpg", quality=92)
        Image.fromarray(lesion.astype(np.uint8) * 255).save(root / "masks" / f"SYN_{i:07d}_segmentation.png")


def dataset_for(root: Path) -> lesions.LesionDataset:
    dataset = lesions.LesionDataset()
    dataset.add_pairs(dataset_scan.scan_dataset(root).pairs)
    dataset.prepare()
    return dataset


def config_for(max_dim: int) -> lesions.LesionConfig:
    config = lesions.LesionConfig()
    config.set("IMAGE_MAX_DIM", max_dim)
    config.set("IMAGE_MIN_DIM", min(800, max_dim))
    return config.validate()


def epoch_seconds(load, ids) -> float:
    """Wall seconds for one pass of ``load(image_id)`` over ``ids``."""
    start = time.perf_counter()
    for image_id in ids:
        load(image_id)
    return time.perf_counter() - start


def measure(dataset, config, cache_root: Path, epochs: int) -> dict:
    """Per-epoch seconds uncached / first cached epoch / cached, speed-up, entry size, equality."""
    ids = list(dataset.image_ids)
    uncached = [epoch_seconds(lambda i: resize_sample(dataset, config, i), ids) for _ in range(epochs)]
    cache = PreprocessCache(cache_root)
    build = epoch_seconds(lambda i: cache.load(dataset, config, i), ids)
    cached = [epoch_seconds(lambda i: cache.load(dataset, config, i), ids) for _ in range(epochs)]
    identical = all(_same(cache.load(dataset, config, i), resize_sample(dataset, config, i)) for i in ids)
    sizes = [p.stat().st_size for p in cache_root.rglob("*.npz")]
    u, c = float(np.median(uncached)), float(np.median(cached))
    return {"max_dim": int(config.IMAGE_MAX_DIM), "min_dim": int(config.IMAGE_MIN_DIM), "n_images": len(ids),
            "uncached_s_per_epoch": round(u, 4), "first_cached_epoch_s": round(build, 4),
            "cached_s_per_epoch": round(c, 4), "uncached_ms_per_image": round(1000 * u / len(ids), 2),
            "cached_ms_per_image": round(1000 * c / len(ids), 2), "speedup": round(u / c, 1),
            "cache_mb_per_image": round(float(np.mean(sizes)) / 1e6, 3), "identical": identical,
            "stats": dict(cache.stats)}


def _same(a, b) -> bool:
    return (np.array_equal(a.image, b.image) and a.image.dtype == b.image.dtype and np.array_equal(a.mask, b.mask)
            and tuple(a.window) == tuple(b.window) and a.scale == b.scale)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=6, help="synthetic images (default 6)")
    p.add_argument("--size", default="4000x3000", help="synthetic WIDTHxHEIGHT (default 4000x3000)")
    p.add_argument("--max-dims", type=int, nargs="+", default=[512, 1024], help="IMAGE_MAX_DIM values")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per variant (median reported)")
    p.add_argument("--real", default=str(REAL_SAMPLES), help="real-sample folder ('' to skip)")
    p.add_argument("--record", help="also write the JSON to this file")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    result: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                    "loadavg_start": os.getloadavg()[0], "epochs": args.epochs, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cache_speed_") as tmp:
        tmp = Path(tmp)
        sources = {f"synthetic {width}x{height} JPEG": tmp / "synthetic"}
        write_synthetic(sources[next(iter(sources))], args.images, width, height)
        if args.real and Path(args.real).is_dir():
            sources["real_samples (600x450 .. 3024x2016)"] = Path(args.real)
        for name, root in sources.items():
            dataset = dataset_for(root)
            for max_dim in args.max_dims:
                run = measure(dataset, config_for(max_dim), tmp / f"cache_{len(result['runs'])}", args.epochs)
                result["runs"].append({"source": name} | run)
                print(json.dumps(result["runs"][-1]), file=sys.stderr, flush=True)
    result["loadavg_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
