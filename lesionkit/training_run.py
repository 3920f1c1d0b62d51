"""One training run with explicit values: start weights, stages, split record, report.

The command line (``lesions.py --mode train``) resolves its arguments into a frozen config, the
datasets and a :class:`StartWeights`, then calls :func:`train_run`; k-fold cross-validation
(:mod:`lesionkit.kfold`) calls it once per fold. Nothing here reads command-line arguments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesionkit import dataset_scan
from mrcnn.checkpoints import average_of, checkpoints_in
from mrcnn.config import Config
from mrcnn.schedules import COSINE_FLOOR

#: Layers whose shape depends on NUM_CLASSES: not taken from COCO weights.
COCO_EXCLUDE = ("mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_bbox", "mrcnn_mask", "mrcnn_diagnosis_logits")


@dataclass(frozen=True)
class StartWeights:
    """Where training starts: ``kind`` is coco, imagenet, checkpoint (resume that run) or none."""

    kind: str
    path: Path | None = None

    @property
    def exclude(self) -> tuple[str, ...]:
        """Layers not loaded: COCO's class-specific heads (another NUM_CLASSES)."""
        return COCO_EXCLUDE if self.kind == "coco" else ()


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule: train ``layers`` up to the absolute epoch ``final_epoch``."""

    layers: str
    final_epoch: int
    learning_rate: float


def training_stages(config: Config, start_epoch: int) -> list[Stage]:
    """Stages still to run after ``start_epoch``: heads to HEADS_EPOCHS at LEARNING_RATE, then all
    layers to ALL_EPOCHS at LEARNING_RATE / 10 (with LR_SCHEDULE "cosine" both start from
    LEARNING_RATE: :func:`schedule_callbacks` sets every step's rate)."""
    all_layers_rate = config.LEARNING_RATE if config.LR_SCHEDULE == "cosine" else config.LEARNING_RATE / 10
    todo = []
    if start_epoch < config.HEADS_EPOCHS:
        todo.append(Stage("heads", config.HEADS_EPOCHS, config.LEARNING_RATE))
    if start_epoch < config.ALL_EPOCHS and config.ALL_EPOCHS > config.HEADS_EPOCHS:
        todo.append(Stage("all", config.ALL_EPOCHS, all_layers_rate))
    return todo


def schedule_callbacks(config: Config) -> list:
    """With LR_SCHEDULE "cosine": the callback that sets each step's rate over all ALL_EPOCHS x
    STEPS_PER_EPOCH steps (resolved steps, :func:`complete_steps`); none with "stages"."""
    if config.LR_SCHEDULE != "cosine":
        return []
    from mrcnn.train_callbacks import CosineLearningRate

    return [CosineLearningRate(config.LEARNING_RATE, config.ALL_EPOCHS * config.STEPS_PER_EPOCH,
                               config.STEPS_PER_EPOCH, config.LR_WARMUP_STEPS)]


def stage_line(stage: Stage, first_epoch: int, config: Config) -> str:
    """What a stage does, printed before it starts."""
    if config.LR_SCHEDULE == "cosine":
        rate = (f"on the run's cosine learning rate ({config.LR_WARMUP_STEPS} warm-up steps to"
                f" {config.LEARNING_RATE:g}, {config.LEARNING_RATE * COSINE_FLOOR:g} at epoch {config.ALL_EPOCHS})")
    else:
        rate = f"at learning rate {stage.learning_rate:g}"
    return (f"Stage '{stage.layers}': epochs {first_epoch}..{stage.final_epoch} {rate}"
            f" ({config.STEPS_PER_EPOCH} steps/epoch)")


def complete_steps(config: Config, n_train: int, n_val: int, workers: int = 1) -> Config:
    """``config`` with STEPS_PER_EPOCH / VALIDATION_STEPS of 0 resolved to one pass over each split
    (a step takes BATCH_SIZE images on each of ``workers`` machines)."""
    changes = {}
    batch = config.BATCH_SIZE * workers
    if config.STEPS_PER_EPOCH == 0:
        changes["STEPS_PER_EPOCH"] = max(1, -(-n_train // batch))
    if config.VALIDATION_STEPS == 0 and n_val:
        changes["VALIDATION_STEPS"] = max(1, -(-n_val // batch))
    return config.replace(**changes) if changes else config


def image_ids(dataset: Any) -> list[str]:
    """The ids (file stems) of a prepared dataset's images, in order."""
    return [str(info["id"]) for info in dataset.image_info]


def train_run(config: Config, train_set: Any, val_set: Any, start: StartWeights, logs: Path,
              split_info: dict, augmentation: Any = None) -> Path:
    """Build the training model, load ``start``, run the remaining stages; returns the run folder.

    Steps of 0 are resolved here (:func:`complete_steps`). Writes ``split.json`` (the train and
    validation ids plus ``split_info``) into the run folder before the first step. Under a
    multi-worker ``TF_CONFIG`` (:mod:`mrcnn.multiworker`) every worker calls this with the same
    arguments; only the chief writes files.
    """
    from mrcnn import multiworker

    cluster = multiworker.cluster_from_env()
    config = complete_steps(config, len(train_set.image_info), len(val_set.image_info),
                            1 if cluster is None else cluster.size)
    print("Building the model (TensorFlow) ...", flush=True)
    from mrcnn import model as modellib
    from mrcnn.diagnosis import resolve_class_weights

    config = resolve_class_weights(config, train_set, verbose=True)

    model = modellib.MaskRCNN(mode="training", config=config, model_dir=str(logs))
    if start.path is not None:
        print(f"Loading {start.kind} weights from {start.path}", flush=True)
        model.load_weights(str(start.path), by_name=True, exclude=list(start.exclude))
    log_dir = Path(model.log_dir)
    chief = multiworker.is_chief()
    if chief:
        dataset_scan.write_split(log_dir / "split.json", image_ids(train_set), image_ids(val_set), split_info)
    todo = training_stages(config, model.epoch)
    started = time.time()
    if not todo:
        print(f"Nothing to do: the checkpoint is at epoch {model.epoch} and ALL_EPOCHS is {config.ALL_EPOCHS}"
              + (" (detector); the refiner comes next." if config.REFINE else "."))
    for stage in todo:
        print(f"\n{stage_line(stage, model.epoch + 1, config)}", flush=True)
        model.train(train_set, val_set, learning_rate=stage.learning_rate, epochs=stage.final_epoch,
                    layers=stage.layers, augmentation=augmentation, custom_callbacks=schedule_callbacks(config),
                    list_layers=False)  # the stage line says it
    cache = getattr(train_set, "preprocess_cache", None)  # optional attribute of mrcnn Datasets
    if cache is not None and todo:
        print(f"Preprocessing cache: {cache.summary()}")
    if chief and todo:
        average_tail(config, log_dir)
    refined = refine_stage(config, train_set, val_set, log_dir) if chief else False
    if chief and (todo or refined):
        report_training(log_dir, time.time() - started)
    elif not chief:
        print(f"\nTraining done in {(time.time() - started) / 60:.1f} min; the chief wrote the checkpoints and logs.")
    return log_dir


def average_tail(config: Config, log_dir: Path) -> Path | None:
    """With AVERAGE_LAST_EPOCHS >= 2: the mean of the run's last epochs' weights, written next to
    the checkpoints (what predict and evaluate load by default); says where. None when off."""
    from mrcnn.weights import write_tail_average

    written = write_tail_average(log_dir, config.AVERAGE_LAST_EPOCHS)
    if written is not None:
        print(f"Averaged the weights of the last {config.AVERAGE_LAST_EPOCHS} epochs (or as many as this run"
              f" wrote) into {written.name}: predict and evaluate use it", flush=True)
    return written


def refine_stage(config: Config, train_set: Any, val_set: Any, log_dir: Path) -> bool:
    """The refiner after the detector, in the same run folder (:mod:`lesionkit.refine`), when REFINE
    is on; continues its newest checkpoint there. True when it trained an epoch."""
    if not config.REFINE:
        return False
    from lesionkit.refine.checkpoints import newest_refiner
    from lesionkit.refine.settings import RefineSettings
    from lesionkit.refine.training import train_refiner

    before = newest_refiner(log_dir)
    return train_refiner(RefineSettings.from_config(config), train_set, val_set, log_dir) != before


def report_training(log_dir: Path, seconds: float) -> None:
    """Plot the training curves and say where checkpoints, logs and plots are."""
    log = log_dir / "training.csv"
    plot = log_dir / "training_curves.png"
    if log.is_file():
        try:
            from mrcnn.visualize import plot_training_curves

            plot_training_curves(str(log), str(plot))
        except (ImportError, ValueError, OSError) as exc:
            print(f"note: could not plot the training curves ({exc})")
    checkpoints = checkpoints_in(log_dir)
    print(f"\nTraining done in {seconds / 60:.1f} min.")
    print(f"  checkpoints: {log_dir}/ ({len(checkpoints)} files, newest {checkpoints[-1].name if checkpoints else '-'})")
    averaged = average_of(checkpoints[-1]) if checkpoints else None
    if averaged is not None:
        print(f"  averaged:    {averaged.name} (the weights predict and evaluate load)")
    from lesionkit.refine.checkpoints import newest_refiner

    refiner = newest_refiner(log_dir)
    if refiner is not None:
        print(f"  refiner:     {refiner} (log: {log_dir / 'refiner_training.csv'})")
    print(f"  logs:        {log if log.is_file() else log_dir}")
    if plot.is_file():
        print(f"  plots:       {plot}")
