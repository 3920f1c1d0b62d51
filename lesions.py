#!/usr/bin/env python
"""lesions: Mask R-CNN for dermoscopic skin-lesion segmentation (ISIC 2018 Task 1, HAM10000).

Train on the ISIC 2018 folder layout (or the built-in synthetic demo data), predict lesion masks
for new images, and evaluate them with the ISIC metrics::

    python lesions.py --mode train    --dataset demo --config demo
    python lesions.py --mode predict  --image demo_data/ISIC2018_Task1-2_Training_Input
    python lesions.py --mode evaluate --dataset demo --config demo

Researchers edit :class:`LesionConfig` (the tutorial's defaults) or pick a preset from
``configs/`` with ``--config`` and change single values with ``--set KEY=VALUE``.
TensorFlow is imported only when a model is needed, so mistakes in the arguments are answered
at once. Every user mistake ends with one line ``lesions: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lesionkit import dataset_scan, prediction_files  # noqa: E402  (light: no TensorFlow)
from mrcnn.config import DERIVED_KEYS, Config, ConfigError  # noqa: E402
from mrcnn.dataset import Dataset  # noqa: E402  (= mrcnn.utils.Dataset, without importing TensorFlow)

REPO_DIR = Path(__file__).resolve().parent
CONFIG_DIR = REPO_DIR / "configs"
#: Defaults below are relative to the folder you run from (the repository root in the README).
DEFAULT_DATASET = Path("isic2018")
DEFAULT_LOGS = Path("logs")
DEMO_DIR = Path("demo_data")
COCO_WEIGHTS = Path("weights") / "mask_rcnn_coco.h5"
IMAGENET_WEIGHTS = Path("weights") / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
COCO_URL = "https://github.com/matterport/Mask_RCNN/releases/download/v2.0/mask_rcnn_coco.h5"
IMAGENET_URL = ("https://github.com/fchollet/deep-learning-models/releases/download/v0.2/"
                "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
#: Layers whose shape depends on NUM_CLASSES: not taken from COCO weights.
COCO_EXCLUDE = ["mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_bbox", "mrcnn_mask"]
CHECKPOINT_RE = re.compile(r"^mask_rcnn_.*_(\d{4,})\.h5$")
#: A training run's folder: ``<config NAME, lower case><YYYYmmddTHHMM>`` (Matterport's naming).
RUN_FOLDER_RE = re.compile(r"^(.+?)(\d{8}T\d{4})$")
#: Exception class names that are the user's mistake (one line, exit 2), wherever they come from.
USER_ERRORS = {"CliError", "ConfigError", "ImageReadError", "WeightsError", "DatasetLayoutError", "InputError",
               "FileNotFoundError", "NotADirectoryError", "IsADirectoryError"}


class CliError(ValueError):
    """A mistake in the command line or its inputs (printed as one line, exit status 2)."""


# ===========================================================================================
# Configuration
# ===========================================================================================


class LesionConfig(Config):
    """Lesion segmentation: one class (lesion) plus background; the tutorial's schedule."""

    NAME = "lesion"
    NUM_CLASSES = 1 + 1  # background + lesion
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
    #: ``--dataset demo``: how many synthetic images, and their (height, width).
    DEMO_IMAGES = 100
    DEMO_IMAGE_SIZE = [192, 256]

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


def build_config(args: argparse.Namespace, saved: dict[str, Any] | None = None,
                 inference: bool = False) -> LesionConfig:
    """LesionConfig <- saved run config <- --config preset <- --set overrides; validated."""
    config = LesionConfig()
    if saved:
        apply_saved_config(config, saved)
    if args.config:
        config.load_toml(resolve_config_path(args.config))
    config.apply_overrides(args.set or [], source="--set")
    if inference:
        config.set("GPU_COUNT", 1)
        config.set("IMAGES_PER_GPU", 1)
    return config.validate()


def print_config(config: Config, origin: str) -> None:
    """Print the effective configuration (every key), as Matterport's ``display()`` does."""
    print(f"Configuration ({origin}):")
    for key in sorted(config.keys()):
        value = getattr(config, key)
        if hasattr(value, "tolist"):
            value = value.tolist()
        print(f"  {key:30} {value}")
    sys.stdout.flush()


def config_origin(args: argparse.Namespace, saved_from: Path | None = None) -> str:
    """A short description of where the configuration came from."""
    parts = ["LesionConfig"]
    if saved_from:
        parts.append(f"{saved_from}")
    if args.config:
        parts.append(str(resolve_config_path(args.config)))
    if args.set:
        parts.append("--set " + " ".join(args.set))
    return " + ".join(parts)


# ===========================================================================================
# Dataset
# ===========================================================================================


class LesionDataset(Dataset):
    """ISIC-style lesion dataset: one class ``lesion``; each image's mask is one instance."""

    SOURCE = "lesion"

    def load_lesions(self, dataset_dir: str | Path, subset: str, config: LesionConfig) -> None:
        """Add the ``subset`` ("train", "val" or "all") images of ``dataset_dir`` (tutorial style)."""
        report = dataset_scan.scan_dataset(dataset_dir)
        ids = [p.image_id for p in report.pairs]
        train, val = dataset_scan.split_ids(ids, config.VALIDATION_FRACTION, config.SEED, report.splits)
        wanted = {"train": set(train), "val": set(val), "all": set(ids)}[subset]
        self.add_pairs([p for p in report.pairs if p.image_id in wanted])

    def add_pairs(self, pairs: list[dataset_scan.Pair]) -> None:
        """Register the class and one image per (image, mask) pair."""
        self.add_class(self.SOURCE, 1, "lesion")
        for pair in pairs:
            self.add_image(self.SOURCE, image_id=pair.image_id, path=str(pair.image_path),
                           mask_path=str(pair.mask_path))

    def load_mask(self, image_id: int):
        """Bool masks [H, W, 1] (empty mask -> [H, W, 0]) and class ids [1] (or [0])."""
        import numpy as np

        from mrcnn.imaging import read_mask

        info = self.image_info[image_id]
        if info["source"] != self.SOURCE:
            return super().load_mask(image_id)
        mask = read_mask(info["mask_path"])
        if not mask.any():
            return np.zeros(mask.shape + (0,), dtype=bool), np.zeros((0,), dtype=np.int32)
        return mask[..., None], np.ones((1,), dtype=np.int32)

    def image_reference(self, image_id: int) -> str:
        """The image's file path."""
        info = self.image_info[image_id]
        if info["source"] == self.SOURCE:
            return info["path"]
        return super().image_reference(image_id)


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


def dataset_root(args: argparse.Namespace, config: LesionConfig) -> Path:
    """The dataset folder: ``--dataset DIR``, or the generated demo data for ``--dataset demo``."""
    if str(args.dataset) == "demo":
        return prepare_demo_data(config)
    return Path(args.dataset)


def scan_and_split(root: Path, config: LesionConfig) -> tuple[dataset_scan.ScanReport, list[str], list[str]]:
    """Scan the dataset, report problems, split it; refuse when a split would be empty."""
    print(f"Scanning dataset {root} ...", flush=True)
    report = dataset_scan.scan_dataset(root)
    ids = [p.image_id for p in report.pairs]
    train, val = dataset_scan.split_ids(ids, config.VALIDATION_FRACTION, config.SEED, report.splits)
    how = "split column of metadata.csv" if report.splits else (
        f"VALIDATION_FRACTION {config.VALIDATION_FRACTION}, SEED {config.SEED}")
    print(f"  layout {report.layout}: {len(ids)} usable image/mask pairs -> {len(train)} train,"
          f" {len(val)} validation ({how})")
    for line in report.problem_lines():
        print(f"  warning: {line}")
    if not train:
        raise CliError(f"dataset {root} leaves no training image after the split")
    return report, train, val


def make_datasets(report: dataset_scan.ScanReport, *id_lists: list[str],
                  cache_dir: Path | None = None) -> list[LesionDataset]:
    """One prepared LesionDataset per list of ids; with ``cache_dir`` they share a preprocessing cache."""
    by_id = {p.image_id: p for p in report.pairs}
    cache = None
    if cache_dir is not None:
        from mrcnn.preprocess_cache import PreprocessCache

        cache = PreprocessCache(cache_dir)
    datasets = []
    for ids in id_lists:
        dataset = LesionDataset()
        dataset.add_pairs([by_id[i] for i in ids])
        dataset.prepare()
        if cache is not None:
            dataset.preprocess_cache = cache
        datasets.append(dataset)
    return datasets


def preprocess_cache_dir(args: argparse.Namespace, root: Path) -> Path | None:
    """The preprocessing cache folder (``--cache-dir``, default ``<dataset>/cache``); None when off or not writable."""
    if getattr(args, "no_cache", False):
        print("Preprocessing cache: off (--no-cache); every image is decoded and resized each epoch")
        return None
    folder = Path(args.cache_dir) if getattr(args, "cache_dir", None) else root / "cache"
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
# Weights and checkpoints
# ===========================================================================================


def checkpoints_in(folder: Path) -> list[Path]:
    """Complete checkpoints ``mask_rcnn_<name>_NNNN.h5`` in ``folder``, oldest epoch first."""
    found = [p for p in folder.glob("mask_rcnn_*.h5") if CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def find_last_checkpoint(logs: Path, name: str | None = "lesion") -> Path:
    """Newest checkpoint of the newest run under ``logs``.

    Run folders are ``<NAME><YYYYmmddTHHMM>``; with ``name`` only that config NAME's runs count
    (training resumes its own run), with None every run does (predict/evaluate: whatever was
    trained last, e.g. after ``--set NAME=isic_b``). Newest = latest time stamp.
    """
    if logs.is_dir():
        runs = []
        for folder in logs.iterdir():
            match = RUN_FOLDER_RE.match(folder.name)
            if folder.is_dir() and match and (name is None or match.group(1) == name.lower()):
                runs.append((match.group(2), folder.name, folder))
        for _, _, run in sorted(runs, reverse=True):
            found = checkpoints_in(run)
            if found:
                return found[-1]
    raise CliError(f"no trained checkpoint found under {logs}/ (train first, or pass --weights PATH)")


def resolve_train_weights(choice: str | None, logs: Path, name: str) -> tuple[str, Path | None]:
    """(kind, path) for ``--weights`` in train mode; notes or one-line errors for missing files."""
    if choice is None:
        if COCO_WEIGHTS.is_file():
            return "coco", COCO_WEIGHTS
        print(f"note: {COCO_WEIGHTS} not found, so training starts from random initialisation"
              f" (fine for the demo; for real data download {COCO_URL} into weights/, see weights/README.md)")
        return "none", None
    if choice == "none":
        return "none", None
    if choice == "coco":
        if not COCO_WEIGHTS.is_file():
            raise CliError(f"--weights coco: {COCO_WEIGHTS} not found; download {COCO_URL} into weights/"
                           " (or use --weights none)")
        return "coco", COCO_WEIGHTS
    if choice == "imagenet":
        if not IMAGENET_WEIGHTS.is_file():
            raise CliError(f"--weights imagenet: ImageNet weights are not available offline; download"
                           f" {IMAGENET_URL} into weights/ (or use --weights coco|none)")
        return "imagenet", IMAGENET_WEIGHTS
    if choice == "last":
        return "last", find_last_checkpoint(logs, name)
    path = Path(choice)
    if not path.is_file():
        raise CliError(f"weights file {path} does not exist (expected coco, imagenet, last, none or a .h5 path)")
    return "path", path


def resolve_model_weights(choice: str | None, logs: Path) -> Path:
    """Weights for predict/evaluate: a file, or (default, ``last``) the newest checkpoint."""
    if choice in (None, "last"):
        return find_last_checkpoint(logs, name=None)
    if choice in ("coco", "imagenet", "none"):
        raise CliError(f"--weights {choice} is not a lesion model; train first and use --weights last or PATH")
    path = Path(choice)
    if not path.is_file():
        raise CliError(f"weights file {path} does not exist")
    return path


def saved_run_config(weights: Path | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The ``config.json`` written next to a checkpoint by training, if any."""
    if weights is None:
        return None, None
    path = weights.parent / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()), path
        except (OSError, json.JSONDecodeError):
            return None, None
    return None, None


def load_weights(model: Any, kind: str, path: Path | None) -> None:
    """Load ``path`` into ``model`` the way ``kind`` needs (COCO without the class-specific heads)."""
    if path is None:
        return
    print(f"Loading {kind} weights from {path}", flush=True)
    if kind == "coco":
        model.load_weights(str(path), by_name=True, exclude=COCO_EXCLUDE)
    elif kind == "imagenet":
        model.load_weights(str(path), by_name=True)
    else:
        model.load_weights(str(path), by_name=True)


# ===========================================================================================
# Train
# ===========================================================================================


def resolve_steps(config: LesionConfig, n_train: int, n_val: int) -> None:
    """Fill STEPS_PER_EPOCH / VALIDATION_STEPS when they are 0 (one pass over each split)."""
    if config.STEPS_PER_EPOCH == 0:
        config.STEPS_PER_EPOCH = max(1, -(-n_train // config.BATCH_SIZE))
    if config.VALIDATION_STEPS == 0 and n_val:
        config.VALIDATION_STEPS = max(1, -(-n_val // config.BATCH_SIZE))


def stages(config: LesionConfig, start_epoch: int) -> list[tuple[str, int, float]]:
    """(layers, final epoch, learning rate) still to run after ``start_epoch``."""
    todo = []
    if start_epoch < config.HEADS_EPOCHS:
        todo.append(("heads", config.HEADS_EPOCHS, config.LEARNING_RATE))
    if start_epoch < config.ALL_EPOCHS and config.ALL_EPOCHS > config.HEADS_EPOCHS:
        todo.append(("all", config.ALL_EPOCHS, config.LEARNING_RATE / 10))
    return todo


def run_train(args: argparse.Namespace) -> int:
    """--mode train: scan and split the data, then heads and all-layers stages (or k folds)."""
    logs = Path(args.logs)
    weights_kind, weights_path = resolve_train_weights(args.weights, logs, LesionConfig.NAME)
    # Resuming (--weights last|PATH of our checkpoint): the run's saved config is the base.
    saved, saved_from = saved_run_config(weights_path) if weights_kind in ("last", "path") else (None, None)
    config = build_config(args, saved)
    print_config(config, config_origin(args, saved_from))
    root = dataset_root(args, config)
    report, train_ids, val_ids = scan_and_split(root, config)
    if args.folds:
        return run_kfold(args, config, report, root, (weights_kind, weights_path))
    if not val_ids:
        raise CliError(f"dataset {root} leaves no validation image (raise VALIDATION_FRACTION or add images)")
    train_one(config, report, train_ids, val_ids, (weights_kind, weights_path), logs, {"dataset": str(root)},
              preprocess_cache_dir(args, root))
    return 0


def train_one(config: LesionConfig, report: dataset_scan.ScanReport, train_ids: list[str], val_ids: list[str],
              weights: tuple[str, Path | None], logs: Path, split_info: dict, cache_dir: Path | None = None) -> Path:
    """Build the training model, load ``weights``, run the remaining stages; returns the run folder.

    With ``cache_dir`` the decoded and resized images are kept there (:mod:`mrcnn.preprocess_cache`).
    """
    resolve_steps(config, len(train_ids), len(val_ids))
    train_set, val_set = make_datasets(report, train_ids, val_ids, cache_dir=cache_dir)
    print("Building the model (TensorFlow) ...", flush=True)
    from mrcnn import model as modellib

    model = modellib.MaskRCNN(mode="training", config=config, model_dir=str(logs))
    load_weights(model, *weights)
    start = int(getattr(model, "epoch", 0) or 0)
    log_dir = Path(model.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    dataset_scan.write_split(log_dir / "split.json", train_ids, val_ids, split_info | {"scan": report.to_dict()})
    todo = stages(config, start)
    if not todo:
        print(f"Nothing to do: the checkpoint is at epoch {start} and ALL_EPOCHS is {config.ALL_EPOCHS}.")
        return log_dir
    augmentation = _augmentation(config)
    started = time.time()
    for layers, final_epoch, learning_rate in todo:
        print(f"\nStage '{layers}': epochs {int(getattr(model, 'epoch', 0) or 0) + 1}..{final_epoch}"
              f" at learning rate {learning_rate:g} ({config.STEPS_PER_EPOCH} steps/epoch)", flush=True)
        model.train(train_set, val_set, learning_rate=learning_rate, epochs=final_epoch, layers=layers,
                    augmentation=augmentation)
    cache = getattr(train_set, "preprocess_cache", None)
    if cache is not None:
        print(f"Preprocessing cache: {cache.summary()}")
    report_training(log_dir, time.time() - started)
    return log_dir


def run_kfold(args: argparse.Namespace, config: LesionConfig, report: dataset_scan.ScanReport, root: Path,
              weights: tuple[str, Path | None]) -> int:
    """--folds K --fold I|all: train and evaluate fold I (or every fold, then mean and std)."""
    import copy

    from lesionkit import evaluation

    logs = Path(args.logs)
    base_name = re.sub(r"_fold\d+$", "", str(config.NAME))
    folds = dataset_scan.kfold_split([p.image_id for p in report.pairs], args.folds, config.SEED)
    wanted = range(args.folds) if args.fold == "all" else [int(args.fold)]
    summaries = []
    cache_dir = preprocess_cache_dir(args, root)
    for i in wanted:
        train_ids, val_ids = folds[i]
        fold_config = copy.deepcopy(config)
        fold_config.set("NAME", f"{base_name}_fold{i}")
        fold_weights = weights
        if weights[0] == "last":  # resume this fold's own run
            fold_weights = ("last", find_last_checkpoint(logs, fold_config.NAME))
        print(f"\n=== Fold {i} of {args.folds} (0-based): {len(train_ids)} train, {len(val_ids)} validation ===")
        log_dir = train_one(fold_config, report, train_ids, val_ids, fold_weights, logs,
                            {"dataset": str(root), "folds": args.folds, "fold": i, "seed": config.SEED,
                             "all_folds": [f[1] for f in folds]}, cache_dir)
        summaries.append(evaluate_fold(args, log_dir, report, val_ids))
        print("\n".join(evaluation.summary_lines({f"fold {i}": summaries[-1]})))
    if len(summaries) > 1:
        write_kfold_summary(logs, base_name, summaries)
    return 0


def evaluate_fold(args: argparse.Namespace, log_dir: Path, report: dataset_scan.ScanReport,
                  val_ids: list[str]) -> dict:
    """Evaluate the newest checkpoint of ``log_dir`` on the fold's validation ids."""
    eval_args = copy_args(args, weights=str(checkpoints_in(log_dir)[-1]), tta=False, top1=False, crop=False)
    model, _, _, min_confidence = load_inference_model(eval_args)
    wanted = set(val_ids)
    pairs = [p for p in report.pairs if p.image_id in wanted]
    truth = {p.image_id: p.mask_path for p in pairs}
    summary = evaluate_model(model, pairs, log_dir / "evaluation", min_confidence, eval_args, truth, tta=False)
    print(f"  fold evaluation: {log_dir / 'evaluation' / 'summary.json'}")
    return {k: v for k, v in summary.items() if k not in ("rows", "problems")}


def copy_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    """A copy of ``args`` with some attributes changed."""
    return argparse.Namespace(**(vars(args) | changes))


def write_kfold_summary(logs: Path, name: str, summaries: list[dict]) -> Path:
    """``logs/<name>_kfold_<stamp>.json``: per-fold summaries and mean/std; prints the table."""
    import datetime

    from lesionkit import evaluation

    stats = dataset_scan.mean_and_std(summaries, evaluation.HEADLINE[1:])
    path = logs / f"{name}_kfold_{datetime.datetime.now():%Y%m%dT%H%M%S}.json"
    prediction_files.write_json_atomic(path, evaluation.json_safe({"folds": len(summaries), "mean_std": stats,
                                                             "per_fold": {str(i): s for i, s in
                                                                          enumerate(summaries)}}))
    print(f"\nk-fold cross-validation over {len(summaries)} folds (mean ± std):")
    for key, value in stats.items():
        if value["mean"] is not None:
            print(f"  {key:18}  {value['mean']:.4f} ± {value['std']:.4f}")
    print(f"  summary: {path}")
    return path


def _augmentation(config: LesionConfig) -> Any:
    """The library's default augmentation (flips, rotations, colour) seeded by SEED, if present."""
    try:
        from mrcnn.input_pipeline import default_augmentation
    except ImportError:
        return None
    return default_augmentation(config.SEED)


def report_training(log_dir: Path, seconds: float) -> None:
    """Plot the training curves and say where checkpoints, logs and plots are."""
    csvs = sorted(log_dir.glob("*.csv"))
    plot = log_dir / "training_curves.png"
    if csvs:
        try:
            from mrcnn.visualize import plot_training_curves

            plot_training_curves(str(csvs[0]), str(plot))
        except (ImportError, ValueError, OSError) as exc:
            print(f"note: could not plot the training curves ({exc})")
    checkpoints = checkpoints_in(log_dir)
    print(f"\nTraining done in {seconds / 60:.1f} min.")
    print(f"  checkpoints: {log_dir}/ ({len(checkpoints)} files, newest {checkpoints[-1].name if checkpoints else '-'})")
    print(f"  logs:        {', '.join(str(c) for c in csvs) or log_dir}")
    if plot.is_file():
        print(f"  plots:       {plot}")
    print("  next:        python lesions.py --mode predict --image PATH   (uses the newest checkpoint)")


# ===========================================================================================
# Predict
# ===========================================================================================


def load_inference_model(args: argparse.Namespace) -> tuple[Any, LesionConfig, Path, float]:
    """Resolve the weights, build the inference config and model; (model, config, weights, min score).

    The config saved next to the checkpoint by training is the base, so a model trained with
    ``--config demo`` predicts with the same image size and backbone without repeating it.
    """
    weights = resolve_model_weights(args.weights, Path(args.logs))
    saved, saved_from = saved_run_config(weights)
    config = build_config(args, saved, inference=True)
    print_config(config, config_origin(args, saved_from))
    min_confidence = float(config.DETECTION_MIN_CONFIDENCE)
    config.set("DETECTION_MIN_CONFIDENCE", 0.0)  # keep everything; prediction_files filters, with fallback
    print("Building the model (TensorFlow) ...", flush=True)
    from mrcnn import model as modellib

    model = modellib.MaskRCNN(mode="inference", config=config, model_dir=str(args.logs))
    model.load_weights(str(weights), by_name=True, verbose=0)
    print(f"Loaded weights {weights}", flush=True)
    return model, config, weights, min_confidence


def predict_images(model: Any, paths: list[Path], out_dir: Path, min_confidence: float,
                   args: argparse.Namespace, tta: bool = False,
                   on_result: Any = None) -> tuple[list[dict], list[str]]:
    """Predict every image into ``out_dir``; (JSON records, unreadable file names).

    ``on_result(image_id, result, kept_indices)`` is called after each image (evaluate uses it).
    """
    from tqdm import tqdm

    from lesionkit.prediction_files import choose_instances, write_prediction
    from mrcnn.imaging import ImageReadError, read_image

    records, unreadable = [], []
    bar = tqdm(paths, desc="predict" + (" +tta" if tta else ""), unit="img", disable=len(paths) < 2,
               file=sys.stdout, dynamic_ncols=True)
    for path in bar:
        try:
            image = read_image(path)
        except ImageReadError as exc:
            unreadable.append(path.name)
            tqdm.write(f"  skipped unreadable {path.name}: {one_line(exc)}")
            continue
        if tta:
            from lesionkit.tta import detect_tta

            result = detect_tta(model, image, min_confidence)
        else:
            result = model.detect([image], verbose=0)[0]
        record = write_prediction(out_dir, path.stem, image, result, min_confidence,
                                  top1=getattr(args, "top1", False), crop=getattr(args, "crop", False))
        record["image"] = str(path)
        records.append(record)
        if on_result is not None:
            on_result(path.stem, result, choose_instances(result["scores"], min_confidence)[0])
    return records, unreadable


def run_predict(args: argparse.Namespace) -> int:
    """--mode predict: lesion masks, overlays (and crops) for a file, folder or glob."""
    if not args.image:
        raise CliError("--mode predict needs --image PATH (a file, a folder or a glob)")
    paths, skipped, single = prediction_files.list_images(args.image, "--image")
    paths, duplicates = prediction_files.drop_duplicate_ids(paths)
    for name in duplicates:
        print(f"  skipped {name}: an image with the same id came first (its outputs would be overwritten)")
    if single:
        from mrcnn.imaging import read_image

        read_image(paths[0])  # an unreadable single file is an error before any output exists
    model, config, weights, min_confidence = load_inference_model(args)
    out_dir, created = prediction_files.make_output_dir(args.output, "predictions")
    try:
        records, unreadable = predict_images(model, paths, out_dir, min_confidence, args, tta=args.tta)
        from lesionkit.prediction_files import write_summary

        meta = {"weights": str(weights), "min_confidence": min_confidence, "top1": args.top1, "tta": args.tta,
                "crop": args.crop, "skipped_non_images": skipped, "unreadable": unreadable,
                "duplicate_ids": duplicates}
        summary = write_summary(out_dir, records, meta)
    finally:
        if created:
            prediction_files.remove_empty_dirs(out_dir)
    found = sum(1 for r in records if r["instances"])
    print(f"\nPredicted {len(records)} image(s): lesion found in {found}."
          f" Skipped {len(skipped)} non-image and {len(unreadable)} unreadable file(s)"
          + (f" and {len(duplicates)} duplicate id(s)." if duplicates else "."))
    print(f"  masks and overlays: {out_dir}/")
    print(f"  summary:            {summary}")
    return 0


# ===========================================================================================
# Evaluate
# ===========================================================================================


def run_evaluate(args: argparse.Namespace) -> int:
    """--mode evaluate: ISIC metrics on the validation split, an --images/--masks pair, or --pred."""
    if args.pred:
        return evaluate_prediction_folder(args)
    if bool(args.images) != bool(args.masks):
        raise CliError("--images and --masks go together (or use --pred DIR --masks DIR without a model)")
    pairs = folder_pairs(args) if args.images else validation_pairs(args)
    model, config, weights, min_confidence = load_inference_model(args)
    out_dir, created = prediction_files.make_output_dir(args.output, "evaluations")
    truth = {p.image_id: p.mask_path for p in pairs}
    images = {p.image_id: p.image_path for p in pairs}
    columns: dict[str, dict] = {}
    try:
        for variant in (["plain", "tta"] if args.tta else ["plain"]):
            folder = out_dir if variant == "plain" else out_dir / "tta"
            columns[variant] = evaluate_model(model, pairs, folder, min_confidence, args, truth, variant == "tta")
    finally:
        if created:
            prediction_files.remove_empty_dirs(out_dir / "tta" / "predictions", out_dir / "tta", out_dir / "predictions", out_dir)
    if "tta" in columns:  # the main summary.json reports the metrics with and without TTA
        from lesionkit import evaluation, metrics

        plain = columns["plain"]
        with_tta = {k: v for k, v in columns["tta"].items() if k not in ("rows", "problems")}
        summary = {k: v for k, v in plain.items() if k not in ("rows", "problems")} | {"tta": with_tta}
        metrics.write_scores(plain["rows"], evaluation.json_safe(summary), out_dir, plain["problems"])
    finish_evaluation(columns, out_dir, args, images, truth, out_dir / "predictions")
    return 0


def evaluate_model(model: Any, pairs: list[dataset_scan.Pair], folder: Path, min_confidence: float,
                   args: argparse.Namespace, truth: dict[str, Path], tta: bool) -> dict:
    """Predict ``pairs`` into ``folder/predictions``, score them, write scores.csv + summary.json."""
    import numpy as np

    from lesionkit import evaluation, metrics
    from lesionkit.prediction_files import write_summary

    pred_dir = folder / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    ap = evaluation.ApAccumulator()

    def add_ap(image_id: str, result: dict, kept: list[int]) -> None:
        masks = np.asarray(result["masks"], dtype=bool)[..., kept]
        ap.add(metrics.load_mask(truth[image_id]), masks, np.asarray(result["scores"])[kept])

    records, unreadable = predict_images(model, [p.image_path for p in pairs], pred_dir, min_confidence, args,
                                         tta=tta, on_result=add_ap)
    write_summary(pred_dir, records, {"min_confidence": min_confidence, "tta": tta, "unreadable": unreadable})
    rows, summary, problems = evaluation.score_pairs(pred_dir, truth)
    summary.update(ap.summary())
    metrics.write_scores(rows, evaluation.json_safe(summary), folder, problems + [f"{n}: unreadable image"
                                                                                 for n in unreadable])
    summary["rows"] = rows
    summary["problems"] = problems
    return summary


def folder_pairs(args: argparse.Namespace) -> list[dataset_scan.Pair]:
    """``--images DIR --masks DIR``: the pairs, with problems reported."""
    report = dataset_scan.pair_folders(args.images, args.masks, root=args.images)
    for line in report.problem_lines():
        print(f"  warning: {line}")
    if not report.pairs:
        raise CliError(f"no image in {args.images} has a mask in {args.masks}: "
                       + ("; ".join(report.problem_lines(3)) or "the folders are empty"))
    return report.pairs


def validation_pairs(args: argparse.Namespace) -> list[dataset_scan.Pair]:
    """The validation split of ``--dataset`` (the split the checkpoint's run wrote, if present).

    The dataset settings (demo size, split fraction and seed) come from the checkpoint's run
    config, so evaluation sees exactly the images training held out.
    """
    try:
        weights: Path | None = resolve_model_weights(args.weights, Path(args.logs))
    except CliError:
        weights = None  # the dataset is checked first; this error comes again when the model loads
    config = build_config(args, saved_run_config(weights)[0])
    root = dataset_root(args, config)
    report, _, val_ids = scan_and_split(root, config)
    split_file = weights.parent / "split.json" if weights else None
    if split_file is not None and split_file.is_file():
        usable = {p.image_id for p in report.pairs}
        val_ids = [i for i in json.loads(split_file.read_text()).get("val", []) if i in usable]
        print(f"  using the validation split of the training run ({split_file}): {len(val_ids)} images")
    if not val_ids:
        raise CliError(f"dataset {root} has no validation images to evaluate on")
    wanted = set(val_ids)
    return [p for p in report.pairs if p.image_id in wanted]


def evaluate_prediction_folder(args: argparse.Namespace) -> int:
    """--pred DIR --masks DIR: score existing ``<id>_segmentation.png`` files, no model."""
    from lesionkit import evaluation, metrics

    if not args.masks:
        raise CliError("--pred needs --masks DIR (the ground-truth masks)")
    for flag, folder in (("--pred", args.pred), ("--masks", args.masks)):
        if not Path(folder).is_dir():
            raise CliError(f"{flag} {folder} is not a folder")
    rows, summary, problems = metrics.score_folders(args.pred, args.masks)
    if not rows:
        raise CliError(f"nothing to score in {args.pred}: {'; '.join(problems[:3]) or 'no predictions'}")
    out_dir, _ = prediction_files.make_output_dir(args.output, "evaluations")
    metrics.write_scores(rows, evaluation.json_safe(summary), out_dir, problems)
    summary.update(rows=rows, problems=problems)
    truth = {metrics.truth_id(p): p for p in Path(args.masks).iterdir() if p.is_file()}
    images = {}
    if args.images:
        images = {p.stem: p for p in Path(args.images).iterdir() if dataset_scan.is_image_name(p)}
    finish_evaluation({"value": summary}, out_dir, args, images, truth, Path(args.pred))
    return 0


def finish_evaluation(columns: dict[str, dict], out_dir: Path, args: argparse.Namespace,
                      images: dict[str, Path], truth: dict[str, Path], pred_dir: Path) -> None:
    """Print problems and the table, save the grid, say where the files are."""
    from lesionkit import evaluation

    first = next(iter(columns.values()))
    for line in first["problems"][:10]:
        print(f"  warning: {line}")
    if len(first["problems"]) > 10:
        print(f"  ... {len(first['problems']) - 10} more problems in summary.json")
    print()
    print("\n".join(evaluation.summary_lines(columns)))
    if args.grid:
        grid = evaluation.grid_rows(first["rows"], images, truth, pred_dir, args.grid, args.worst_first)
        if grid:
            from mrcnn.visualize import save_evaluation_grid

            print(f"  grid:    {save_evaluation_grid(grid, out_dir / 'evaluation_grid.png')}")
        else:
            print("  note: no grid (it needs the images: add --images DIR)")
    print(f"  scores:  {out_dir / 'scores.csv'}")
    print(f"  summary: {out_dir / 'summary.json'}" + (f" (TTA: {out_dir / 'tta'}/)" if "tta" in columns else ""))

# ===========================================================================================
# Command line
# ===========================================================================================


EXAMPLES = """examples:
  python lesions.py --mode train --dataset demo --config demo
  python lesions.py --mode train --dataset isic2018 --config isic2018 --weights coco
  python lesions.py --mode train --weights last          # resume where it stopped
  python lesions.py --mode predict --image photos/ --output out/ --crop
  python lesions.py --mode evaluate --dataset demo --config demo
  python lesions.py --mode evaluate --pred out/ --masks isic2018/ISIC2018_Task1_Training_GroundTruth
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """All options (see README.md for examples)."""
    p = _Parser(prog="lesions", description="Mask R-CNN skin-lesion segmentation: train, predict, evaluate.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("--mode", required=True, choices=("train", "predict", "evaluate"), help="what to do")
    p.add_argument("--config", metavar="NAME|PATH", help="preset in configs/ (demo, isic2018) or a TOML file")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config value (repeatable), e.g. --set LEARNING_RATE=0.0005")
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), metavar="DIR|demo",
                   help="dataset folder (ISIC 2018 or images/+masks/ layout), or 'demo' (default: isic2018)")
    p.add_argument("--weights", metavar="coco|imagenet|last|none|PATH",
                   help="train: start weights (default coco if weights/mask_rcnn_coco.h5 exists, else none);"
                        " predict/evaluate: model (default: newest checkpoint under --logs)")
    p.add_argument("--logs", default=str(DEFAULT_LOGS), metavar="DIR", help="checkpoints and logs (default: logs)")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="train: k-fold cross-validation with K folds (deterministic by SEED)")
    p.add_argument("--fold", default=None, metavar="I|all",
                   help="train with --folds: train and evaluate fold I (0-based) or all folds (default all)")
    p.add_argument("--no-cache", action="store_true",
                   help="train: decode and resize every image each epoch (no preprocessing cache)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="train: preprocessing cache folder (default: <dataset>/cache)")
    p.add_argument("--image", metavar="PATH|DIR|GLOB", help="predict: image file, folder or glob")
    p.add_argument("--output", metavar="DIR", help="predict/evaluate: output folder (default: a new folder"
                                                   " under predictions/ or evaluations/)")
    p.add_argument("--top1", action="store_true", help="predict: mask of the best instance only (default: union)")
    p.add_argument("--crop", action="store_true", help="predict: also write <id>_crop.png, background blacked out")
    p.add_argument("--tta", action="store_true", help="predict/evaluate: test-time augmentation (flips)")
    p.add_argument("--images", metavar="DIR", help="evaluate: image folder (with --masks) instead of the val split")
    p.add_argument("--masks", metavar="DIR", help="evaluate: ground-truth <id>_segmentation.png folder")
    p.add_argument("--pred", metavar="DIR", help="evaluate: score existing <id>_segmentation.png files (no model)")
    p.add_argument("--grid", type=int, default=0, metavar="N",
                   help="evaluate: also save evaluation_grid.png with N images (image / truth / prediction)")
    p.add_argument("--worst-first", action="store_true", help="evaluate: the grid shows the worst Jaccard first")
    return p


def check_mode_options(args: argparse.Namespace) -> None:
    """Refuse options that do not belong to the chosen mode (one line)."""
    allowed = {
        "train": {"folds", "fold", "no_cache", "cache_dir"},
        "predict": {"image", "output", "top1", "crop", "tta"},
        "evaluate": {"images", "masks", "pred", "output", "tta", "grid", "worst_first"},
    }[args.mode]
    for option in ("image", "output", "top1", "crop", "tta", "images", "masks", "pred", "grid", "worst_first",
                   "folds", "fold", "no_cache", "cache_dir"):
        if getattr(args, option) and option not in allowed:
            raise CliError(f"--{option.replace('_', '-')} does not apply to --mode {args.mode}")
    check_fold_options(args)
    if args.grid < 0:
        raise CliError(f"--grid N needs N >= 0, got {args.grid}")
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise CliError(f"--output {args.output} exists and is not a folder")


def check_fold_options(args: argparse.Namespace) -> None:
    """--folds K >= 2; --fold is 'all' or 0..K-1 and needs --folds."""
    if args.fold is not None and not args.folds:
        raise CliError("--fold needs --folds K")
    if args.folds:
        if args.folds < 2:
            raise CliError(f"--folds K needs K >= 2, got {args.folds}")
        args.fold = args.fold or "all"
        if args.fold != "all" and not (args.fold.isdigit() and int(args.fold) < args.folds):
            raise CliError(f"--fold must be 'all' or a number from 0 to {args.folds - 1}, got {args.fold!r}")


def is_user_error(exc: BaseException) -> bool:
    """True when ``exc`` (or a base class) is one of :data:`USER_ERRORS`."""
    return any(cls.__name__ in USER_ERRORS for cls in type(exc).__mro__)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
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


MODES = {"train": run_train, "predict": run_predict, "evaluate": run_evaluate}


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
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        if type(exc).__name__ == "TrainingDivergedError":
            print(f"lesions: error: {one_line(exc)}", file=sys.stderr)
            return 1
        if is_user_error(exc):
            print(f"lesions: error: {one_line(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
