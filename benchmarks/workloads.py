"""The measured workloads: inference latency, training step time, input-pipeline throughput.

Same workload as the peer harness (``../shared/tools/peers``): ResNet-50-FPN Mask R-CNN,
2 classes, random init, float32, 1000 proposals at inference (2000 in training, 200 sampled
ROIs per image), 100 detections with DETECTION_MIN_CONFIDENCE 0, SGD lr 1e-3 momentum 0.9,
all layers trainable. One synthetic image with one elliptical "lesion", built outside the
timed loop. Each ``run_*`` function returns a list of JSON-ready dicts (one per line).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.timing import LoopResult, peak_rss_mb, time_loop

#: Matterport-default knobs shared with the peers (see the module docstring).
FULL_CONFIG: dict[str, Any] = {
    "BACKBONE": "resnet50", "NUM_CLASSES": 2, "GPU_COUNT": 1, "IMAGE_RESIZE_MODE": "square",
    "POST_NMS_ROIS_INFERENCE": 1000, "POST_NMS_ROIS_TRAINING": 2000, "TRAIN_ROIS_PER_IMAGE": 200,
    "DETECTION_MAX_INSTANCES": 100, "DETECTION_MIN_CONFIDENCE": 0.0, "LEARNING_RATE": 1e-3,
    "LEARNING_MOMENTUM": 0.9, "WEIGHT_DECAY": 1e-4, "SEED": 0,
}
#: ``--quick``: a small model and short loops, only to check that everything runs.
QUICK_CONFIG: dict[str, Any] = {
    **FULL_CONFIG, "RPN_ANCHOR_SCALES": (8, 16, 32, 64, 128), "POST_NMS_ROIS_INFERENCE": 100,
    "POST_NMS_ROIS_TRAINING": 200, "PRE_NMS_LIMIT": 500, "TRAIN_ROIS_PER_IMAGE": 32,
    "DETECTION_MAX_INSTANCES": 20, "FPN_CLASSIF_FC_LAYERS_SIZE": 128, "MAX_GT_INSTANCES": 4,
}


@dataclass(frozen=True)
class Plan:
    """Loop lengths and sizes of one bench run."""

    quick: bool
    threads: int = 2

    def loops(self, mode: str) -> tuple[int, int]:
        """(warm-up, timed runs) for ``mode`` ("infer", "train", "data"), as in the peer harness."""
        if self.quick:
            return 1, 2
        return {"infer": (2, 7), "train": (3, 12), "data": (1, 5)}.get(mode, (2, 7))

    def size(self, size: int) -> int:
        """Image side actually used (``--quick`` shrinks everything to 128/256 px)."""
        return size if not self.quick else (128 if size <= 512 else 256)


def make_config(plan: Plan, size: int, batch: int, **overrides: Any) -> Any:
    """A validated ``mrcnn.config.Config`` for a square ``size`` image and ``batch`` images."""
    from mrcnn.config import Config

    attrs = dict(QUICK_CONFIG if plan.quick else FULL_CONFIG)
    attrs.update(NAME="bench", IMAGES_PER_GPU=int(batch), IMAGE_MIN_DIM=int(size), IMAGE_MAX_DIM=int(size))
    attrs.update(overrides)
    return type("BenchConfig", (Config,), attrs)().validate()


def synthetic_lesion(size: int | tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB image [H, W, 3] with one dark elliptical lesion and its bool mask [H, W, 1]."""
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.ogrid[:h, :w]
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    ry, rx = h * rng.uniform(0.15, 0.3), w * rng.uniform(0.15, 0.3)
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    image = rng.integers(150, 230, size=(h, w, 3), dtype=np.uint8)
    image[mask] = (image[mask] * 0.45).astype(np.uint8)
    return image, mask[:, :, None]


def _array_dataset(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """A prepared mrcnn Dataset serving in-memory (image, masks) pairs."""
    from mrcnn.dataset import Dataset

    class ArrayDataset(Dataset):
        def load_image(self, image_id: int) -> np.ndarray:
            return self.image_info[image_id]["image"]

        def load_mask(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
            masks = self.image_info[image_id]["masks"]
            return masks, np.ones([masks.shape[-1]], np.int32)

    ds = ArrayDataset()
    ds.add_class("bench", 1, "lesion")
    for i, (image, masks) in enumerate(pairs):
        ds.add_image("bench", i, None, image=image, masks=masks)
    ds.prepare()
    return ds


def _file_dataset(pairs: list[tuple[str, str]]) -> Any:
    """A prepared mrcnn Dataset reading (JPEG, PNG mask) files like the CLI's LesionDataset."""
    from mrcnn.dataset import Dataset
    from mrcnn.imaging import read_mask

    class FileDataset(Dataset):
        def load_mask(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
            mask = read_mask(self.image_info[image_id]["mask_path"])
            return mask[..., None], np.ones([1], np.int32)

    ds = FileDataset()
    ds.add_class("bench", 1, "lesion")
    for i, (image_path, mask_path) in enumerate(pairs):
        ds.add_image("bench", i, image_path, mask_path=mask_path)
    ds.prepare()
    return ds


def trainable_params(keras_model: Any) -> int:
    """Number of trainable scalars (as the peers report ``params``)."""
    return int(sum(int(np.prod(v.shape)) for v in keras_model.trainable_weights))


def record(name: str, mode: str, size: int, batch: int, plan: Plan, loop: LoopResult, params: int,
           **extra: Any) -> dict[str, Any]:
    """One JSON-ready measurement in the peer harness's format (plus ``name``)."""
    import keras
    import tensorflow as tf

    summary = loop.summary()
    rec = {"peer": "lesions", "name": name, "mode": mode, "size": size, "batch": batch, **summary,
           "per_image_s": round(summary["median_s"] / batch, 4), "peak_rss_mb": round(peak_rss_mb(), 1),
           "params": params, "warmup": plan.loops(mode)[0], "threads": plan.threads, "quick": plan.quick}
    rec.update(extra)
    rec["versions"] = {"tensorflow": tf.__version__, "keras": keras.__version__}
    rec["cpu"] = cpu_model()
    return rec


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo and the core count (the lent machine changes between runs)."""
    name = "?"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


# -------------------------------------------------------------------------------------------
# Inference

def favour_lesion_class(keras_model: Any, margin: float = 10.0) -> None:
    """Add ``margin`` to the lesion logit's bias, so that (random-init) ROIs are classified as
    lesions and DETECTION_MAX_INSTANCES detections survive: the mask head then runs on all 100
    slots, as in the peers' runs (score threshold 0). Without this, random weights give a
    varying number of detections and the mask head (which skips padded slots) less work."""
    layer = keras_model.get_layer("mrcnn_class_logits")
    kernel, bias = layer.get_weights()
    bias = bias.copy()
    bias[1:] += margin
    layer.set_weights([kernel, bias])


def _cpu_bf16() -> bool:
    from mrcnn.config import cpu_has_bf16

    return cpu_has_bf16()


def precision_name(config: Any) -> str:
    """float32, float16 or bfloat16: the compute type MIXED_PRECISION gives the layers."""
    from mrcnn.config import precision_policy

    policy = precision_policy(config)
    return policy.replace("mixed_", "") if policy else "float32"


def inference_model(config: Any) -> Any:
    """The benchmarked inference MaskRCNN: random weights seeded with config.SEED (otherwise the
    number of detections, and with it the mask head's work, varied between processes: 0 to 100
    seen at 512 px), lesion class favoured (:func:`favour_lesion_class`)."""
    import keras

    from mrcnn.model import MaskRCNN

    keras.utils.set_random_seed(int(config.SEED))
    model = MaskRCNN("inference", config, tempfile.mkdtemp(prefix="bench-logs-"))
    favour_lesion_class(model.keras_model)
    return model


def run_infer(plan: Plan, size: int, batch: int = 1, suffix: str = "", **overrides: Any) -> list[dict[str, Any]]:
    """Latency of ``MaskRCNN.detect`` (mold + graph + unmold/paste, like torchvision) and of the
    graph alone (like Model Garden, 28x28 masks, no pasting), same process. ``overrides`` change
    config values (named by ``suffix`` in the record names, e.g. "_rpn256")."""

    size = plan.size(size)
    config = make_config(plan, size, batch, **overrides)
    model = inference_model(config)
    rng = np.random.default_rng(0)
    images = [synthetic_lesion(size, rng)[0] for _ in range(batch)]
    warmup, runs = plan.loops("infer")
    params = trainable_params(model.keras_model)
    detect_loop = time_loop(lambda: model.detect(images), warmup, runs)
    results = model.detect(images)
    molded, metas, _ = model.mold_inputs(images)
    graph_loop = time_loop(lambda: model._run(molded, metas), warmup, runs)  # noqa: SLF001
    common = {"detections": int(len(results[0]["scores"])), "trace_count": model.detect_trace_count,
              "precision": precision_name(config), "cpu_bf16": _cpu_bf16(),
              "config": _config_summary(config, "infer")}
    return [record(f"infer{size}{suffix}", "infer", size, batch, plan, detect_loop, params, mask_paste=True, **common),
            record(f"infer{size}{suffix}_graph", "infer", size, batch, plan, graph_loop, params, mask_paste=False,
                   **common)]


# -------------------------------------------------------------------------------------------
# Training

def training_batch(config: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of training inputs (dict keyed by mrcnn.input_pipeline.INPUT_NAMES) from synthetic lesions."""
    from mrcnn.input_pipeline import INPUT_NAMES, build_training_sample, get_training_anchors

    rng = np.random.default_rng(seed)
    size = int(config.IMAGE_SHAPE[0])
    dataset = _array_dataset([synthetic_lesion(size, rng) for _ in range(batch)])
    anchors = get_training_anchors(config)
    samples = [build_training_sample(dataset, config, i, anchors, rng=np.random.default_rng([seed, i]))
               for i in dataset.image_ids]
    return {name: np.stack([s[name] for s in samples]) for name in INPUT_NAMES}


def compiled_train_step(model: Any, config: Any, learning_rate: float = 1e-3) -> Callable[[dict], dict]:
    """All layers trainable, SGD compiled, optimizer slots built; returns a tf.function(train_step)."""
    import tensorflow as tf

    from mrcnn.training import compile_training_model, set_trainable

    set_trainable(model, "all")
    compile_training_model(model.keras_model, learning_rate, config)
    model.keras_model.optimizer.build(model.keras_model.trainable_variables)
    return tf.function(model.keras_model.train_step)


def run_train(plan: Plan, size: int, batch: int, suffix: str = "", **overrides: Any) -> list[dict[str, Any]]:
    """Seconds per training step (forward, backward, SGD update; all layers) at ``size``, ``batch``;
    ``overrides`` change config values (named by ``suffix``, e.g. "_bf16")."""
    import tensorflow as tf

    from mrcnn.model import MaskRCNN

    size = plan.size(size)
    config = make_config(plan, size, batch, **overrides)
    model = MaskRCNN("training", config, tempfile.mkdtemp(prefix="bench-logs-"))
    step = compiled_train_step(model, config)
    inputs = {k: tf.constant(v) for k, v in training_batch(config, batch).items()}
    losses: dict[str, Any] = {}

    def one_step() -> None:
        losses.update(step(inputs))
        float(losses["loss"])  # wait for the step

    warmup, runs = plan.loops("train")
    if size >= 1024:  # ~3x the work of 512 px: fewer iterations keep the whole bench near 10 min
        warmup, runs = min(warmup, 2), min(runs, 6)
    loop = time_loop(one_step, warmup, runs)
    params = trainable_params(model.keras_model)
    return [record(f"train{size}_b{batch}{suffix}", "train", size, batch, plan, loop, params,
                   precision=precision_name(config), cpu_bf16=_cpu_bf16(),
                   warmup=warmup, last_loss=round(float(losses["loss"]), 4), trace_count=int(step.experimental_get_tracing_count()),
                   config=_config_summary(config, "train"))]


# -------------------------------------------------------------------------------------------
# Input pipeline

def write_isic_like_files(folder: str | Path, count: int, size: tuple[int, int], seed: int = 0
                          ) -> list[tuple[str, str]]:
    """``count`` JPEG photos [h, w] (quality 90) with PNG masks, like ISIC 2018 inputs."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        h, w = size
        # Smooth skin-like background (upsampled noise) so the JPEG has realistic entropy.
        low = rng.integers(120, 230, size=(h // 50 + 1, w // 50 + 1, 3), dtype=np.uint8)
        image = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
        image = cv2.add(image, rng.integers(0, 12, size=(h, w, 3), dtype=np.uint8))
        _, mask = synthetic_lesion((h, w), rng)
        image[mask[:, :, 0]] = (image[mask[:, :, 0]] * 0.5).astype(np.uint8)
        image_path, mask_path = folder / f"ISIC_{i:07d}.jpg", folder / f"ISIC_{i:07d}_segmentation.png"
        cv2.imwrite(str(image_path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(mask_path), mask[:, :, 0].astype(np.uint8) * 255)
        pairs.append((str(image_path), str(mask_path)))
    return pairs


def run_data(plan: Plan, size: int = 1024, batch: int = 1, augment: bool = False) -> list[dict[str, Any]]:
    """Images per second delivered by ``mrcnn.input_pipeline.make_dataset`` from ISIC-sized JPEGs
    (3000x2000, or 600x400 with ``--quick``): decode, resize to ``size``, optional default
    augmentation, RPN targets, batching; training-ready tensors, no model. (The project has no
    decoded-image cache, so there is no cached variant.)"""
    from mrcnn.input_pipeline import default_augmentation, make_dataset

    size = plan.size(size)
    config = make_config(plan, size, batch)
    photo = (400, 600) if plan.quick else (2000, 3000)
    folder = tempfile.mkdtemp(prefix="bench-isic-")
    pairs = write_isic_like_files(folder, 4 if plan.quick else 12, photo)
    dataset = _file_dataset(pairs)
    ds = make_dataset(dataset, config, shuffle=True, augmentation=default_augmentation(0) if augment else None,
                      seed=0)
    iterator = iter(ds)
    chunk = 2 if plan.quick else 8  # batches per timed iteration

    def deliver() -> None:
        for _ in range(chunk):
            next(iterator)["input_image"].numpy()

    warmup, runs = plan.loops("data")
    loop = time_loop(deliver, warmup, runs)
    per_s = sorted(chunk * batch / s for s in loop.seconds)
    name = f"data{size}" + ("_aug" if augment else "")
    return [record(name, "data", size, batch, plan, loop, 0, images_per_s=round(float(np.median(per_s)), 2),
                   images_per_s_p10=round(float(np.percentile(per_s, 10)), 2),
                   images_per_s_p90=round(float(np.percentile(per_s, 90)), 2),
                   photo_hw=list(photo), files=len(pairs), images_per_iteration=chunk * batch,
                   augmentation=augment, cpu_count=os.cpu_count())]


def _config_summary(config: Any, mode: str) -> dict[str, Any]:
    """The knobs that define the workload, for the JSON line."""
    keys = ["BACKBONE", "NUM_CLASSES", "IMAGES_PER_GPU", "DETECTION_MIN_CONFIDENCE", "MIXED_PRECISION",
            "RPN_CONV_CHANNELS"]
    keys += (["POST_NMS_ROIS_INFERENCE", "DETECTION_MAX_INSTANCES"] if mode == "infer" else
             ["POST_NMS_ROIS_TRAINING", "TRAIN_ROIS_PER_IMAGE", "TRAIN_MASKS_ON_POSITIVES_ONLY", "TRAIN_BN"])
    out = {k: getattr(config, k) for k in keys}
    if mode == "train":
        out["mask_head_rois"] = (int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO)
                                 if config.TRAIN_MASKS_ON_POSITIVES_ONLY else int(config.TRAIN_ROIS_PER_IMAGE))
    return out
