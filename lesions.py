#!/usr/bin/env python
"""lesions: Mask R-CNN for dermoscopic skin-lesion segmentation (ISIC 2018 Task 1, HAM10000).

Train on the ISIC 2018 folder layout (or the built-in synthetic demo data), predict lesion masks
for new images, and evaluate them with the ISIC metrics::

    python lesions.py --mode train    --dataset demo --config demo
    python lesions.py --mode predict  --image demo_data/ISIC2018_Task1-2_Training_Input
    python lesions.py --mode evaluate --dataset demo --config demo

Researchers edit :class:`LesionConfig` (the tutorial's defaults) or pick a preset from
``configs/`` with ``--config`` and change single values with ``--set KEY=VALUE``.

This file is the command line only: it turns the arguments into a validated, read-only config
plus a few explicit values, once, and calls the library (:mod:`lesionkit` for the lesion
application, :mod:`mrcnn` for Mask R-CNN). TensorFlow is imported only when a model is needed,
so mistakes in the arguments are answered at once. Every user mistake ends with one line
``lesions: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

# TensorFlow C++ log lines below ERROR are hidden, and ERROR too (e.g. oneDNN's DT_BOOL notice at the first
# step): real failures reach us as Python exceptions. TF_CPP_MIN_LOG_LEVEL=0 shows them all again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lesionkit import dataset_scan, prediction_files  # noqa: E402  (light: no TensorFlow)
from lesionkit.prediction_run import DEFAULT_BATCH_SIZE  # noqa: E402  (light too)
from lesionkit.refine.settings import RefineSettings  # noqa: E402  (light)
from lesionkit.training_run import StartWeights  # noqa: E402
from mrcnn.augmentation import AUGMENTATIONS  # noqa: E402  (light: no TensorFlow)
from mrcnn.checkpoints import final_weights, newest_checkpoint  # noqa: E402
from mrcnn.config import DERIVED_KEYS, Config, ConfigError, diagnoses, diagnosis_classes  # noqa: E402
from mrcnn.dataset import Dataset  # noqa: E402  (= mrcnn.utils.Dataset, without importing TensorFlow)
from mrcnn.downloads import COCO, IMAGENET_RESNET50, WEIGHTS_DIR, fetch_weights  # noqa: E402
from mrcnn.errors import TrainingDivergedError, UserError  # noqa: E402
from mrcnn.multiworker import WorkerLostError, cluster_from_env  # noqa: E402  (light: no TensorFlow)

REPO_DIR = Path(__file__).resolve().parent
CONFIG_DIR = REPO_DIR / "configs"
#: Defaults below are relative to the folder you run from (the repository root in the README).
DEFAULT_DATASET = Path("isic2018")
DEFAULT_LOGS = Path("logs")
DEMO_DIR = Path("demo_data")
COCO_WEIGHTS = WEIGHTS_DIR / COCO.name
IMAGENET_WEIGHTS = WEIGHTS_DIR / IMAGENET_RESNET50.name


class CliError(UserError):
    """A mistake in the command line or its inputs (printed as one line, exit status 2)."""


# ===========================================================================================
# Configuration
# ===========================================================================================


class LesionConfig(Config):
    """Lesion segmentation: one class (lesion) plus background; the tutorial's schedule."""

    NAME = "lesion"
    #: Foreground classes (id 1..K). One class by default; the 7 HAM10000 / ISIC 2018 Task 3
    #: diagnoses for a model that also diagnoses (configs/ham10000_dx.toml). NUM_CLASSES follows.
    CLASSES = ["lesion"]
    BACKBONE = "resnet101"
    IMAGES_PER_GPU = 1
    #: 0 = computed: training images / BATCH_SIZE (one pass over the split per epoch).
    STEPS_PER_EPOCH = 0
    #: 0 = computed: validation images / BATCH_SIZE.
    VALIDATION_STEPS = 0
    DETECTION_MIN_CONFIDENCE = 0.9
    LEARNING_RATE = 0.001

    # Beyond Matterport: the two-stage schedule and the data split --------------------------
    #: Stage 1 trains the heads up to this (absolute) epoch at LEARNING_RATE.
    HEADS_EPOCHS = 20
    #: Stage 2 trains all layers up to this epoch at LEARNING_RATE / 10.
    ALL_EPOCHS = 40
    #: Share of the images held out for validation (unless metadata.csv has a split column).
    VALIDATION_FRACTION = 0.2
    #: Seed of the split, shuffling and augmentation.
    SEED = 42
    #: Training augmentation (mrcnn.augmentation.named_augmentation): "default" = flips,
    #: 90-degree rotations, mild scale / shift and colour jitter; "flips" = the flips and
    #: rotations alone; "scale" = the flips and rotations plus a zoom by 0.5-2x and a shift (for
    #: photos whose lesions are smaller or larger than HAM10000's); "none". benchmarks/quality.py
    #: trains with the same key.
    AUGMENTATION = "default"
    #: ``--dataset demo``: how many synthetic images, and their (height, width).
    DEMO_IMAGES = 100
    DEMO_IMAGE_SIZE = [192, 256]

    # Crop-and-refine stage (lesionkit.refine; checked by RefineSettings.check) ----------------
    #: REFINE (declared on mrcnn.config.Config, default False): train a U-Net refiner after the
    #: detector, in the same run folder, and let predict/evaluate re-segment each kept detection
    #: with it (--no-refine turns it off there).
    #: U-Net input side in px (divisible by 2**REFINE_DEPTH); the ISIC 2018 winner used 512.
    REFINE_CROP_SIZE = 256
    #: Down-sampling levels of the U-Net, and its filters at the first level (doubled per level).
    REFINE_DEPTH = 4
    REFINE_WIDTH = 32
    #: Inference crop: each side of the detected box moved out by this share of the box side
    #: (inside the training windows' range below).
    REFINE_MARGIN = 0.15
    #: Also feed the detector's coarse mask as a fourth input channel.
    REFINE_MASK_CHANNEL = False
    #: Refiner epochs (absolute, like ALL_EPOCHS); steps per epoch (0 = one pass over the
    #: training images), crops per step and Adam's learning rate.
    REFINE_EPOCHS = 20
    REFINE_STEPS_PER_EPOCH = 0
    REFINE_BATCH_SIZE = 8
    REFINE_LEARNING_RATE = 0.001
    #: Training crops: each side [low, high] x the true box's side, the centre moved by up to this
    #: share of the side: the stage learns to fix imperfect boxes. Wider than the ISIC 2018
    #: winner's 81-121 % / 10 %, with which the U-Net sized its mask by the window and
    #: over-segmented at margins above ~5 % (benchmarks/README.md, issue 15).
    REFINE_TRAIN_SCALE = [0.9, 1.5]
    REFINE_TRAIN_SHIFT = 0.15
    #: Refiner probability that counts as lesion.
    REFINE_MASK_THRESHOLD = 0.5

    def validate(self) -> "LesionConfig":
        """Matterport checks plus the schedule and split settings (0 steps = computed later)."""
        if not (isinstance(self.HEADS_EPOCHS, int) and self.HEADS_EPOCHS >= 0):
            raise ConfigError(f"HEADS_EPOCHS must be an integer >= 0, got {self.HEADS_EPOCHS!r}")
        if not (isinstance(self.ALL_EPOCHS, int) and self.ALL_EPOCHS >= self.HEADS_EPOCHS):
            raise ConfigError(f"ALL_EPOCHS ({self.ALL_EPOCHS}) must be >= HEADS_EPOCHS ({self.HEADS_EPOCHS})")
        if self.ALL_EPOCHS < 1:
            raise ConfigError("ALL_EPOCHS must be >= 1 (nothing to train)")
        if not 0.0 <= self.VALIDATION_FRACTION < 1.0:
            raise ConfigError(f"VALIDATION_FRACTION must be in [0, 1), got {self.VALIDATION_FRACTION}")
        if self.AUGMENTATION not in AUGMENTATIONS:
            raise ConfigError(f"AUGMENTATION must be one of {', '.join(AUGMENTATIONS)}, got {self.AUGMENTATION!r}")
        if self.DEMO_IMAGES < 2:
            raise ConfigError(f"DEMO_IMAGES must be >= 2, got {self.DEMO_IMAGES}")
        if len(self.DEMO_IMAGE_SIZE) != 2 or min(self.DEMO_IMAGE_SIZE) < 32:
            raise ConfigError(f"DEMO_IMAGE_SIZE must be [height, width], each >= 32, got {self.DEMO_IMAGE_SIZE}")
        if self.STEPS_PER_EPOCH < 0:
            raise ConfigError(f"STEPS_PER_EPOCH must be >= 0 (0 = computed), got {self.STEPS_PER_EPOCH}")
        steps = self.STEPS_PER_EPOCH
        self.STEPS_PER_EPOCH = steps or 1  # the base check wants >= 1; 0 is resolved from the split
        try:
            super().validate()
        finally:
            self.STEPS_PER_EPOCH = steps
        RefineSettings.from_config(self)  # the REFINE_* keys (one-line ConfigError naming the key)
        return self


def resolve_config_path(name: str) -> Path:
    """``demo`` -> ``configs/demo.toml``; an existing path is used as is."""
    path = Path(name)
    if path.is_file():
        return path
    preset = CONFIG_DIR / f"{name}.toml"
    if preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise CliError(f"config {name!r} not found: give a TOML file or a preset name ({known})")


def apply_saved_config(config: LesionConfig, saved: dict[str, Any]) -> None:
    """Set the values of a training run's ``config.json`` (skipping derived and unknown keys)."""
    keys = set(config.keys())
    for key, value in saved.items():
        if key in DERIVED_KEYS or key not in keys or key in ("GPU_COUNT", "IMAGES_PER_GPU"):
            continue
        try:
            config.set(key, value, source="the checkpoint's config.json")
        except ConfigError:
            continue  # a key from an older version: the default stays


def build_config(preset: str | None, overrides: list[str], saved: dict[str, Any] | None = None,
                 inference: bool = False, batch_size: int = DEFAULT_BATCH_SIZE) -> LesionConfig:
    """LesionConfig <- saved run config <- preset <- ``KEY=VALUE`` overrides; validated and read-only.

    ``inference``: one device, ``batch_size`` images per model call (BATCH_SIZE = IMAGES_PER_GPU).
    """
    config = LesionConfig()
    if saved:
        apply_saved_config(config, saved)
    if preset:
        config.load_toml(resolve_config_path(preset))
    config.apply_overrides(overrides, source="--set")
    if inference:
        config.set("GPU_COUNT", 1)
        config.set("IMAGES_PER_GPU", batch_size, source="--batch-size")
    return config.freeze()


def config_origin(preset: str | None, overrides: list[str], saved_from: Path | None = None) -> str:
    """A short description of where the configuration came from."""
    parts = ["LesionConfig"]
    if saved_from:
        parts.append(f"{saved_from}")
    if preset:
        parts.append(str(resolve_config_path(preset)))
    if overrides:
        parts.append("--set " + " ".join(overrides))
    return " + ".join(parts)


def saved_run_config(weights: Path | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The ``config.json`` written next to a checkpoint by training, if any."""
    path = weights.parent / "config.json" if weights is not None else None
    if path is None or not path.is_file():
        return None, None
    try:
        return json.loads(path.read_text()), path
    except (OSError, json.JSONDecodeError):
        return None, None


def config_for_weights(args: argparse.Namespace, weights: Path | None, inference: bool = False) -> LesionConfig:
    """The config of a run continued or used: its saved config.json <- --config <- --set (printed);
    for inference IMAGES_PER_GPU is ``--batch-size``."""
    saved, saved_from = saved_run_config(weights)
    config = build_config(args.config, args.set, saved, inference=inference,
                          batch_size=inference_batch_size(args))
    config.display(f"Configuration ({config_origin(args.config, args.set, saved_from)})")
    return config


# ===========================================================================================
# Dataset
# ===========================================================================================


class LesionDataset(Dataset):
    """ISIC-style lesion dataset; each image's mask is one instance.

    One class ``lesion`` by default. For a diagnosing config (two or more ``CLASSES``) each image
    carries ``image_info[i]["diagnosis"]`` (its class name, read by the dataset scan) and, with
    ``DIAGNOSIS_HEAD = "roi"``, its instance's class id is the diagnosis (1 + index in CLASSES);
    with ``"image"`` the instance stays class 1 (lesion) and the diagnosis feeds the image head.
    """

    SOURCE = "lesion"
    APPLY_EXIF_ORIENTATION = True  # ISIC masks are drawn on the displayed (EXIF-rotated) image

    def load_lesions(self, dataset_dir: str | Path, subset: str, config: LesionConfig) -> None:
        """Add the ``subset`` ("train", "val" or "all") images of ``dataset_dir`` (tutorial style)."""
        report = dataset_scan.scan_dataset(dataset_dir, classes=diagnosis_classes(config))
        ids = [p.image_id for p in report.pairs]
        train, val = dataset_scan.split_ids(ids, config.VALIDATION_FRACTION, config.SEED, report.splits)
        wanted = {"train": set(train), "val": set(val), "all": set(ids)}[subset]
        self.add_pairs([p for p in report.pairs if p.image_id in wanted], config)

    def add_pairs(self, pairs: list[dataset_scan.Pair], config: Config | None = None) -> None:
        """Register the classes of ``config`` (default: one class, lesion) and one image per pair."""
        names = detector_class_names(config)
        for class_id, name in enumerate(names, start=1):
            self.add_class(self.SOURCE, class_id, name)
        instance_class = {name: i for i, name in enumerate(names, start=1)}
        for pair in pairs:
            extra = {}
            if pair.diagnosis is not None:
                extra["diagnosis"] = pair.diagnosis
            if len(names) > 1:  # the instance's class is the diagnosis (part of the cache key too)
                extra["instance_class"] = instance_class[pair.diagnosis]
            self.add_image(self.SOURCE, image_id=pair.image_id, path=str(pair.image_path),
                           mask_path=str(pair.mask_path), **extra)

    def load_mask(self, image_id: int):
        """Bool masks [H, W, 1] (empty mask -> [H, W, 0]) and class ids [1] (or [0]); the id is the
        image's diagnosis class with DIAGNOSIS_HEAD "roi"."""
        import numpy as np

        from mrcnn.imaging import read_mask

        info = self.image_info[image_id]
        if info["source"] != self.SOURCE:
            return super().load_mask(image_id)
        mask = read_mask(info["mask_path"])
        if not mask.any():
            return np.zeros(mask.shape + (0,), dtype=bool), np.zeros((0,), dtype=np.int32)
        return mask[..., None], np.full((1,), info.get("instance_class", 1), dtype=np.int32)

    def image_reference(self, image_id: int) -> str:
        """The image's file path."""
        info = self.image_info[image_id]
        if info["source"] == self.SOURCE:
            return info["path"]
        return super().image_reference(image_id)


def detector_class_names(config: Config | None) -> list[str]:
    """The detector's foreground class names: CLASSES with DIAGNOSIS_HEAD "roi", else ["lesion"]."""
    if config is not None and diagnoses(config) and config.DIAGNOSIS_HEAD == "roi":
        return list(config.CLASSES)
    return ["lesion"]


def prepare_demo_data(config: LesionConfig, root: Path = DEMO_DIR) -> Path:
    """The synthetic demo dataset for ``config`` (generated once, regenerated when settings change)."""
    size = (int(config.DEMO_IMAGE_SIZE[0]), int(config.DEMO_IMAGE_SIZE[1]))
    seed = int(config.SEED or 0)
    if not dataset_scan.demo_data_is_current(root, config.DEMO_IMAGES, seed, size):
        print(f"Demo data: writing {config.DEMO_IMAGES} synthetic images ({size[1]}x{size[0]}, seed {seed})"
              f" into {root}/ ...", flush=True)
    else:
        print(f"Demo data: {root}/ ({config.DEMO_IMAGES} synthetic images, seed {seed}, cached)")
    return dataset_scan.ensure_demo_data(root, config.DEMO_IMAGES, seed, size)


def dataset_root(dataset: str, config: LesionConfig) -> Path:
    """The dataset folder: ``--dataset DIR``, or the generated demo data for ``--dataset demo``."""
    if str(dataset) == "demo":
        return prepare_demo_data(config)
    if not Path(dataset).exists():
        raise CliError(f"--dataset {dataset} does not exist (give a dataset folder, or --dataset demo)")
    return Path(dataset)


def scan_and_split(root: Path, config: LesionConfig, labels_required: bool = True
                   ) -> tuple[dataset_scan.ScanReport, list[str], list[str]]:
    """Scan and split ``root`` with the config's VALIDATION_FRACTION and SEED (printed, problems named).
    A diagnosing config also reads the labels; ``labels_required`` False (evaluate) keeps unlabelled
    images (their segmentation is scored)."""
    report, train, val = dataset_scan.scan_and_split(root, config.VALIDATION_FRACTION, config.SEED,
                                                     classes=diagnosis_classes(config),
                                                     labels_required=labels_required)
    if not train:
        raise CliError(f"dataset {root} leaves no training image after the split")
    return report, train, val


def make_datasets(report: dataset_scan.ScanReport, *id_lists: list[str],
                  cache_dir: Path | None = None, config: Config | None = None) -> list[LesionDataset]:
    """One prepared LesionDataset per list of ids (classes of ``config``, default one class lesion);
    with ``cache_dir`` they share a preprocessing cache."""
    by_id = {p.image_id: p for p in report.pairs}
    cache = None
    if cache_dir is not None:
        from mrcnn.preprocess_cache import PreprocessCache

        cache = PreprocessCache(cache_dir)
    datasets = []
    for ids in id_lists:
        dataset = LesionDataset()
        dataset.add_pairs([by_id[i] for i in ids], config)
        dataset.prepare()
        if cache is not None:
            dataset.preprocess_cache = cache
        datasets.append(dataset)
    return datasets


def preprocess_cache_dir(no_cache: bool, cache_dir: str | None, root: Path) -> Path | None:
    """The preprocessing cache folder (``--cache-dir``, default ``<dataset>/cache``); None when off or not writable."""
    if no_cache:
        print("Preprocessing cache: off (--no-cache); every image is decoded and resized each epoch")
        return None
    folder = Path(cache_dir) if cache_dir else root / "cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        print(f"Preprocessing cache: {folder}/ is not writable, training without it (use --cache-dir DIR)")
        return None
    print(f"Preprocessing cache: {folder}/ (resized images are reused; --no-cache turns it off)")
    return folder


# ===========================================================================================
# Weights
# ===========================================================================================


def find_last_checkpoint(logs: Path, name: str | None) -> Path:
    """Newest checkpoint of the newest run of config ``name`` (None: of any run) under ``logs``."""
    found = newest_checkpoint(logs, name)
    if found is None:
        raise CliError(f"no trained checkpoint found under {logs}/" + (f" for NAME {name!r}" if name else "")
                       + " (train first, or pass --weights PATH)")
    return found


def resolve_train_weights(choice: str | None, logs: Path, name: str) -> StartWeights:
    """``--weights`` in train mode: where training starts; notes or one-line errors for missing files."""
    if choice is None:
        if COCO_WEIGHTS.is_file():
            return StartWeights("coco", COCO_WEIGHTS)
        print(f"note: {COCO_WEIGHTS} not found, so training starts from random initialisation"
              f" (fine for the demo; for real data use --weights coco, which downloads {COCO.url} into weights/)")
        return StartWeights("none")
    if choice == "none":
        return StartWeights("none")
    if choice == "coco":  # downloaded (progress bar, checksum) when missing
        return StartWeights("coco", fetch_weights(COCO, COCO_WEIGHTS))
    if choice == "imagenet":
        return StartWeights("imagenet", fetch_weights(IMAGENET_RESNET50, IMAGENET_WEIGHTS))
    if choice == "last":
        return StartWeights("last", find_last_checkpoint(logs, name))
    path = Path(choice)
    if not path.is_file():
        raise CliError(f"weights file {path} does not exist (expected coco, imagenet, last, none or a .h5 path)")
    return StartWeights("checkpoint", path)


def resolve_model_weights(choice: str | None, logs: Path) -> Path:
    """Weights for predict/evaluate: a file, or (default, ``last``) the newest checkpoint of any run,
    or the average of its last epochs when training wrote one (AVERAGE_LAST_EPOCHS)."""
    if choice in (None, "last"):
        return final_weights(find_last_checkpoint(logs, name=None))
    if choice in ("coco", "imagenet", "none"):
        raise CliError(f"--weights {choice} is not a lesion model; train first and use --weights last or PATH")
    path = Path(choice)
    if not path.is_file():
        raise CliError(f"weights file {path} does not exist")
    return path


# ===========================================================================================
# Modes
# ===========================================================================================


def run_train(args: argparse.Namespace) -> int:
    """--mode train: scan and split the data, then heads and all-layers stages (or k folds)."""
    from lesionkit.training_run import train_run

    logs = Path(args.logs)
    if cluster_from_env() is not None and args.folds:  # (a malformed TF_CONFIG is refused here too, one line)
        raise CliError("--folds runs one process per fold: it does not combine with a multi-worker TF_CONFIG")
    # The preset and --set decide NAME, and so which run --weights last continues.
    named = build_config(args.config, args.set)
    if args.folds and args.weights == "last":
        start = StartWeights("last")  # each fold resumes its own run (lesionkit.kfold.fold_start_weights)
    else:
        start = resolve_train_weights(args.weights, logs, named.NAME)
    config = config_for_weights(args, start.path if start.kind in ("last", "checkpoint") else None)
    root = dataset_root(args.dataset, config)
    report, train_ids, val_ids = scan_and_split(root, config)
    cache_dir = preprocess_cache_dir(args.no_cache, args.cache_dir, root)
    augmentation = training_augmentation(config)
    if args.folds:
        from lesionkit.kfold import run_kfold

        which = range(args.folds) if args.fold in (None, "all") else [int(args.fold)]
        dataset_scan.report_empty_masks(report.pairs)
        run_kfold(config, report, args.folds, list(which), start, logs,
                  lambda train, val: tuple(make_datasets(report, train, val, cache_dir=cache_dir, config=config)),
                  {"dataset": str(root)}, augmentation)
        return 0
    if not val_ids:
        raise CliError(f"dataset {root} leaves no validation image (raise VALIDATION_FRACTION or add images)")
    train_set_ids = set(train_ids)
    dataset_scan.report_empty_masks([p for p in report.pairs if p.image_id in train_set_ids])
    train_set, val_set = make_datasets(report, train_ids, val_ids, cache_dir=cache_dir, config=config)
    train_run(config, train_set, val_set, start, logs, {"dataset": str(root)}, augmentation)
    print("  next:        python lesions.py --mode predict --image PATH   (uses the newest checkpoint)")
    return 0


def training_augmentation(config: LesionConfig) -> Any:
    """The augmentation AUGMENTATION names, seeded by SEED (None for "none")."""
    from mrcnn.augmentation import named_augmentation

    return named_augmentation(config.AUGMENTATION, config.SEED)


def inference_batch_size(args: argparse.Namespace) -> int:
    """``--batch-size``, or the default (:data:`lesionkit.prediction_run.DEFAULT_BATCH_SIZE`)."""
    return getattr(args, "batch_size", None) or DEFAULT_BATCH_SIZE


def predict_options(args: argparse.Namespace, config: LesionConfig) -> Any:
    """The explicit prediction settings: the config's confidence, the --top1/--crop/--tta flags
    and the batch size (the inference config's BATCH_SIZE, = --batch-size)."""
    from lesionkit.prediction_run import PredictOptions

    return PredictOptions(float(config.DETECTION_MIN_CONFIDENCE), top1=args.top1,
                          crop=args.crop, tta=args.tta, batch_size=int(config.BATCH_SIZE))


def with_refiner(args: argparse.Namespace, model: Any, config: LesionConfig, weights: Path, options: Any) -> Any:
    """``model`` with the run's refinement U-Net (lesionkit.refine) unless --no-refine or REFINE = false."""
    from lesionkit.refine.inference import attach_refiner

    return attach_refiner(model, config, weights, not args.no_refine, options.min_confidence, options.top1)


def refiner_path(model: Any) -> str | None:
    """The refiner checkpoint a (wrapped) model uses, None for the detector alone."""
    refiner = getattr(model, "refiner", None)  # lesionkit.refine.inference.RefinedDetector has one
    return str(refiner.path) if refiner is not None else None


def run_predict(args: argparse.Namespace) -> int:
    """--mode predict: lesion masks, overlays (and crops) for a file, folder or glob."""
    from mrcnn.imaging import read_image

    if not args.image:
        raise CliError("--mode predict needs --image PATH (a file, a folder or a glob)")
    same_folder = bool(args.output) and Path(args.image).is_dir() and Path(args.output).resolve() == Path(
        args.image).resolve()
    paths, skipped, single = prediction_files.list_images(args.image, "--image", skip_outputs=same_folder)
    paths, duplicates = prediction_files.drop_duplicate_ids(paths)
    for name in duplicates:
        print(f"  skipped {name}: an image with the same id came first (its outputs would be overwritten)")
    paths, too_long = split_too_long(paths)
    if single:
        if too_long:
            raise CliError(f"--image {too_long[0]}: the name is too long for its output files (> 255 bytes)")
        read_image(paths[0])  # an unreadable single file is an error before any output exists
    elif not paths:
        raise CliError(f"--image {args.image}: no image left to predict ({len(too_long)} names too long)")
    weights = resolve_model_weights(args.weights, Path(args.logs))
    config = config_for_weights(args, weights, inference=True)
    options = predict_options(args, config)
    from lesionkit.prediction_run import load_inference_model, predict_images

    model = with_refiner(args, load_inference_model(config, weights, Path(args.logs)), config, weights, options)
    out_dir, created = prediction_files.make_output_dir(args.output, "predictions")
    try:
        records, unreadable = predict_images(model, paths, out_dir, options)
        meta = {"weights": str(weights), "min_confidence": options.min_confidence, "top1": options.top1,
                "tta": options.tta, "crop": options.crop, "batch_size": options.batch_size,
                "refiner": refiner_path(model), "skipped_non_images": skipped, "unreadable": unreadable,
                "duplicate_ids": duplicates, "names_too_long": too_long}
        summary = prediction_files.write_summary(out_dir, records, meta, diagnosis_classes(config))
    finally:
        if created:
            prediction_files.remove_empty_dirs(*created)
    found = sum(1 for r in records if r["instances"])
    print(f"\nPredicted {len(records)} image(s): lesion found in {found}."
          f" Skipped {len(skipped)} non-image and {len(unreadable)} unreadable file(s)"
          + (f" and {len(duplicates)} duplicate id(s)" if duplicates else "")
          + (f" and {len(too_long)} name(s) too long for their outputs" if too_long else "") + ".")
    print(f"  masks and overlays: {out_dir}/")
    if (out_dir / prediction_files.DIAGNOSIS_CSV).is_file() and diagnosis_classes(config):
        print(f"  diagnoses:          {out_dir / prediction_files.DIAGNOSIS_CSV} (ISIC 2018 Task 3 format)")
    print(f"  summary:            {summary}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """--mode export: SavedModel / ONNX / TFLite files of a checkpoint, each checked against Keras."""
    from lesionkit import export

    formats = export.parse_formats(args.format or ",".join(export.FORMATS))
    export.check_converters(formats)
    if not args.output:
        raise CliError("--mode export needs --output DIR (a new or empty folder)")
    output = Path(args.output)
    export.check_output(output)  # refused before the model is built
    images = export.check_images(args.image)
    weights = resolve_model_weights(args.weights, Path(args.logs))
    config = export.export_config(config_for_weights(args, weights, inference=True))
    from lesionkit.prediction_run import load_inference_model

    model = load_inference_model(config, weights, Path(args.logs), keep_all=False)
    files = export.export_model(model, formats, output, images, info={"weights": str(weights)})
    print(f"\nExported {', '.join(f.name for f in files)} to {output}/ (all agree with the Keras model;"
          f" details in {output / 'export.json'})")
    return 0


def split_too_long(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """(paths whose output names fit the file system, names of the others)."""
    from lesionkit.prediction_run import output_name_too_long

    too_long = [p.name for p in paths if output_name_too_long(p.stem)]
    for name in too_long:
        print(f"  skipped {name[:40]}...: the name is too long for its output files (> 255 bytes)")
    return [p for p in paths if not output_name_too_long(p.stem)], too_long


def run_evaluate(args: argparse.Namespace) -> int:
    """--mode evaluate: ISIC metrics on the validation split, an --images/--masks pair, or --pred."""
    from lesionkit.evaluation_run import GridOptions, evaluate_with_model

    grid = GridOptions(args.grid, args.worst_first)
    if args.pred:
        return evaluate_existing(args, grid)
    if bool(args.images) != bool(args.masks):
        raise CliError("--images and --masks go together (or use --pred DIR --masks DIR without a model)")
    if args.labels and not args.images:
        raise CliError("--labels goes with --pred or --images/--masks (the validation split uses the dataset's"
                       " own labels)")
    weights = resolve_model_weights(args.weights, Path(args.logs)) if args.images else None
    pairs, weights = (folder_pairs(args.images, args.masks), weights) if args.images else validation_pairs(args)
    config = config_for_weights(args, weights, inference=True)
    if args.images and diagnoses(config):
        pairs = with_labels(pairs, diagnosis_truth(args.labels, args.masks))
    from lesionkit.prediction_run import load_inference_model

    options = predict_options(args, config)
    model = with_refiner(args, load_inference_model(config, weights, Path(args.logs)), config, weights, options)
    out_dir, created = prediction_files.make_output_dir(args.output, "evaluations")
    try:
        evaluate_with_model(model, pairs, out_dir, options, grid)
    finally:
        if created:
            prediction_files.remove_empty_dirs(out_dir / "tta" / "predictions", out_dir / "tta",
                                               out_dir / "predictions", *created)
    return 0


def evaluate_existing(args: argparse.Namespace, grid: Any) -> int:
    """--pred without a model: a folder of ``<id>_segmentation.png`` (+ ``diagnosis.csv``) against
    --masks, or a Task 3 CSV of diagnoses against --labels (or the labels found next to --masks)."""
    from lesionkit.evaluation_run import evaluate_diagnosis_file, evaluate_prediction_folder

    pred = Path(args.pred)
    if not pred.exists():
        raise CliError(f"--pred {pred} does not exist")
    csv_only = pred.is_file()
    if csv_only and pred.suffix.lower() != ".csv":
        raise CliError(f"--pred {pred} is neither a folder of <id>_segmentation.png files nor a .csv of diagnoses"
                       " (ISIC 2018 Task 3 format)")
    if not csv_only and not args.masks:
        raise CliError("--pred DIR needs --masks DIR (the ground-truth masks)")
    for flag, folder in (("--masks", args.masks), ("--images", args.images)):
        if folder and not Path(folder).is_dir():
            raise CliError(f"{flag} {folder} is not a folder")
    labels = diagnosis_truth(args.labels, args.masks)
    if csv_only and labels is None:
        raise CliError(f"--pred {pred} (diagnoses) needs the true diagnoses: --labels FILE (metadata.csv with a dx"
                       " column, or ISIC2018_Task3_Training_GroundTruth.csv)"
                       + (f"; none found next to {args.masks}" if args.masks else ""))
    if csv_only and args.masks:  # the masks folder names the images to score
        labels = {i: labels.get(i) for i in mask_ids(Path(args.masks))}
    out_dir, created = prediction_files.make_output_dir(args.output, "evaluations")
    try:
        if csv_only:
            evaluate_diagnosis_file(pred, labels, out_dir)
        else:
            evaluate_prediction_folder(pred, Path(args.masks), out_dir, Path(args.images) if args.images else None,
                                       grid, labels)
    finally:
        if created:
            prediction_files.remove_empty_dirs(*created)
    return 0


def diagnosis_truth(labels_file: str | None, masks: str | None) -> dict[str, str | None] | None:
    """The true diagnoses (``id -> dx``) for evaluate: ``--labels FILE`` (metadata.csv with ``dx``, or
    a Task 3 ground-truth CSV), else those found next to ``--masks`` (its parent folder, the dataset
    root, then the folder itself); None when there are none."""
    from lesionkit.diagnosis_labels import find_labels
    from lesionkit.diagnosis_scoring import read_label_file

    if labels_file:
        labels = read_label_file(labels_file)
        if not labels:
            raise CliError(f"--labels {labels_file} holds no diagnosis labels (expected image_id and dx columns,"
                           " or image,MEL,NV,BCC,AKIEC,BKL,DF,VASC)")
        return labels
    for folder in ([Path(masks).parent, Path(masks)] if masks else []):
        labels, used, bad = find_labels(folder)
        for line in bad:
            print(f"  warning: {line}")
        if labels:
            print(f"  diagnosis labels from {', '.join(used)}")
            return labels
    return None


def mask_ids(masks: Path) -> list[str]:
    """Image ids of the ground-truth masks in ``masks`` (as the mask scorer names them)."""
    from lesionkit import metrics

    return [metrics.truth_id(p) for p in sorted(masks.iterdir())
            if p.is_file() and p.suffix.lower() in metrics.MASK_SUFFIXES]


def with_labels(pairs: list[dataset_scan.Pair], labels: dict[str, str | None] | None) -> list[dataset_scan.Pair]:
    """``pairs`` with each one's ``diagnosis`` from ``labels`` (unchanged and a note when there are none)."""
    from dataclasses import replace

    if labels is None:
        print("  note: no diagnosis labels (give --labels FILE): the diagnoses are predicted but not scored")
        return pairs
    return [replace(p, diagnosis=labels.get(p.image_id)) for p in pairs]


def folder_pairs(images: str, masks: str) -> list[dataset_scan.Pair]:
    """``--images DIR --masks DIR``: the pairs, with problems reported."""
    report = dataset_scan.pair_folders(images, masks, root=images)
    for line in report.problem_lines():
        print(f"  warning: {line}")
    if not report.pairs:
        raise CliError(f"no image in {images} has a mask in {masks}: "
                       + ("; ".join(report.problem_lines(3)) or "the folders are empty"))
    return report.pairs


def validation_pairs(args: argparse.Namespace) -> tuple[list[dataset_scan.Pair], Path]:
    """(the validation split of ``--dataset``, the checkpoint) for evaluate without --images.

    The split is the one the checkpoint's run wrote (split.json); the dataset settings (demo size,
    split fraction and seed) come from the run's config, so evaluation sees exactly the images
    training held out. The dataset is checked before the weights.
    """
    try:
        weights: Path | None = resolve_model_weights(args.weights, Path(args.logs))
    except CliError:
        weights = None
    config = build_config(args.config, args.set, saved_run_config(weights)[0])
    root = dataset_root(args.dataset, config)
    report, _, val_ids = scan_and_split(root, config, labels_required=False)
    if weights is None:
        weights = resolve_model_weights(args.weights, Path(args.logs))  # the error, now that the data is fine
    split_file = weights.parent / "split.json"
    if split_file.is_file():
        usable = {p.image_id for p in report.pairs}
        val_ids = [i for i in json.loads(split_file.read_text()).get("val", []) if i in usable]
        print(f"  using the validation split of the training run ({split_file}): {len(val_ids)} images")
    if not val_ids:
        raise CliError(f"dataset {root} has no validation images to evaluate on")
    wanted = set(val_ids)
    return [p for p in report.pairs if p.image_id in wanted], weights


# ===========================================================================================
# Command line
# ===========================================================================================


EXAMPLES = """examples:
  python lesions.py --mode train --dataset demo --config demo
  python lesions.py --mode train --dataset isic2018 --config isic2018 --weights coco
  python lesions.py --mode train --weights last          # resume where it stopped
  python lesions.py --mode predict --image photos/ --output out/ --crop
  python lesions.py --mode evaluate --dataset demo --config demo
  python lesions.py --mode export --weights last --format saved_model,onnx,tflite --output exported/
  python lesions.py --mode evaluate --pred out/ --masks isic2018/ISIC2018_Task1_Training_GroundTruth
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (else argparse's one-line usage error, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


class _Once(argparse.Action):
    """Store a value, refusing a second occurrence of the option (argparse keeps the last silently)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, f"_seen_{self.dest}", False):
            parser.error(f"{option_string} given twice (give it once)")
        setattr(namespace, f"_seen_{self.dest}", True)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    """All options (see README.md for examples)."""
    p = _Parser(prog="lesions", description="Mask R-CNN skin-lesion segmentation: train, predict, evaluate, export.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--mode", required=True, action=_Once, choices=("train", "predict", "evaluate", "export"),
                   help="what to do")
    p.add_argument("--config", action=_Once, metavar="NAME|PATH",
                   help="preset in configs/ (demo, isic2018) or a TOML file")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config value (repeatable), e.g. --set LEARNING_RATE=0.0005")
    p.add_argument("--dataset", action=_Once, default=str(DEFAULT_DATASET), metavar="DIR|demo",
                   help="dataset folder (ISIC 2018 or images/+masks/ layout), or 'demo' (default: isic2018)")
    p.add_argument("--weights", action=_Once, metavar="coco|imagenet|last|none|PATH",
                   help="train: start weights (default coco if weights/mask_rcnn_coco.h5 exists, else none);"
                        " predict/evaluate/export: model (default: newest checkpoint under --logs)")
    p.add_argument("--logs", action=_Once, default=str(DEFAULT_LOGS), metavar="DIR",
                   help="checkpoints and logs (default: logs)")
    p.add_argument("--folds", action=_Once, type=int, default=0, metavar="K",
                   help="train: k-fold cross-validation with K folds (deterministic by SEED)")
    p.add_argument("--fold", action=_Once, default=None, metavar="I|all",
                   help="train with --folds: train and evaluate fold I (0-based) or all folds (default all)")
    p.add_argument("--no-cache", action="store_true",
                   help="train: decode and resize every image each epoch (no preprocessing cache)")
    p.add_argument("--cache-dir", action=_Once, metavar="DIR",
                   help="train: preprocessing cache folder (default: <dataset>/cache)")
    p.add_argument("--image", action=_Once, metavar="PATH|DIR|GLOB",
                   help="predict: image file, folder or glob; export: check images (default: synthetic ones)")
    p.add_argument("--output", action=_Once, metavar="DIR", help="predict/evaluate: output folder (default: a new"
                                                                 " folder under predictions/ or evaluations/);"
                                                                 " export: the new folder (required)")
    p.add_argument("--format", action=_Once, metavar="LIST",
                   help="export: comma-separated saved_model,onnx,tflite (default: all three)")
    p.add_argument("--top1", action="store_true", help="predict: mask of the best instance only (default: union)")
    p.add_argument("--crop", action="store_true", help="predict: also write <id>_crop.png, background blacked out")
    p.add_argument("--tta", action="store_true", help="predict/evaluate: test-time augmentation (flips)")
    p.add_argument("--batch-size", action=_Once, type=positive_int, default=None, metavar="N",
                   help=f"predict/evaluate: images per model call (default {DEFAULT_BATCH_SIZE}; images are read"
                        " ahead and files written behind the model in threads)")
    p.add_argument("--no-refine", action="store_true",
                   help="predict/evaluate: detector masks only (do not use the run's refinement U-Net)")
    p.add_argument("--images", action=_Once, metavar="DIR",
                   help="evaluate: image folder (with --masks) instead of the val split")
    p.add_argument("--masks", action=_Once, metavar="DIR", help="evaluate: ground-truth <id>_segmentation.png folder")
    p.add_argument("--pred", action=_Once, metavar="DIR|CSV",
                   help="evaluate: score existing <id>_segmentation.png files (+ diagnosis.csv) in DIR, or the"
                        " diagnoses of an ISIC 2018 Task 3 CSV (no model)")
    p.add_argument("--labels", action=_Once, metavar="CSV",
                   help="evaluate with --pred or --images: true diagnoses, metadata.csv (dx column) or"
                        " ISIC2018_Task3_Training_GroundTruth.csv (default: found next to --masks)")
    p.add_argument("--grid", action=_Once, type=int, default=0, metavar="N",
                   help="evaluate: also save evaluation_grid.png with N images (image / truth / prediction)")
    p.add_argument("--worst-first", action="store_true", help="evaluate: the grid shows the worst Jaccard first")
    return p


MODE_OPTIONS = {
    "train": {"folds", "fold", "no_cache", "cache_dir"},
    "predict": {"image", "output", "top1", "crop", "tta", "batch_size", "no_refine"},
    "evaluate": {"images", "masks", "pred", "labels", "output", "tta", "grid", "worst_first", "batch_size", "no_refine"},
    "export": {"format", "output", "image"},
}


def check_mode_options(args: argparse.Namespace) -> None:
    """Refuse options that do not belong to the chosen mode, and out-of-range values (one line)."""
    every = set().union(*MODE_OPTIONS.values())
    for option in sorted(every):
        if getattr(args, option) and option not in MODE_OPTIONS[args.mode]:
            raise CliError(f"--{option.replace('_', '-')} does not apply to --mode {args.mode}")
    check_fold_options(args.folds, args.fold)
    if args.grid < 0:
        raise CliError(f"--grid N needs N >= 0, got {args.grid}")
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise CliError(f"--output {args.output} exists and is not a folder")


def check_fold_options(folds: int, fold: str | None) -> None:
    """--folds K >= 2; --fold is 'all' or 0..K-1 and needs --folds."""
    if fold is not None and not folds:
        raise CliError("--fold needs --folds K")
    if folds:
        if folds < 2:
            raise CliError(f"--folds K needs K >= 2, got {folds}")
        if fold not in (None, "all") and not (fold.isdigit() and int(fold) < folds):
            raise CliError(f"--fold must be 'all' or a number from 0 to {folds - 1}, got {fold!r}")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def resume_hint(argv: list[str]) -> str:
    """The command that resumes an interrupted training run."""
    words = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word == "--weights":
            skip = True
            continue
        if word.startswith("--weights="):
            continue
        words.append(word)
    return shlex.join(["python", "lesions.py", *words, "--weights", "last"])  # quoted: paths may have spaces


MODES = {"train": run_train, "predict": run_predict, "evaluate": run_evaluate, "export": run_export}


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the mode; user mistakes -> one line and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        check_mode_options(args)
        return MODES[args.mode](args)
    except KeyboardInterrupt:
        hint = f" Resume with: {resume_hint(argv)}" if args.mode == "train" else ""
        print(f"\nlesions: interrupted; complete checkpoints and files are kept.{hint}", file=sys.stderr)
        return 130
    except (TrainingDivergedError, WorkerLostError) as exc:
        print(f"lesions: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except (UserError, OSError) as exc:  # OSError: a file or folder the system refuses (permissions, space)
        print(f"lesions: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
