"""The refinement stage's training: U-Net on lesion crops, checkpointed atomically, resumable.

:func:`train_refiner` trains in a run folder (the detector's, ``logs/<run>/``): it continues
from the newest ``refiner_NNNN.weights.h5`` there (the crops continue the same seeded sequence)
up to ``REFINE_EPOCHS``, writes one checkpoint per epoch (temporary file, synced, renamed; a
Ctrl-C during the write is held until the file is complete) and a row per epoch in
``refiner_training.csv``. A NaN/Inf loss stops it with :class:`mrcnn.errors.TrainingDivergedError`
(the last good checkpoint is kept). Keras shows a progress bar with ETA per epoch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras

from lesionkit.refine.checkpoints import REFINER_LOG, newest_refiner, refiner_checkpoint_name, refiner_epoch
from lesionkit.refine.crops import RefineCrops
from lesionkit.refine.settings import RefineSettings
from lesionkit.refine.unet import build_unet, refine_loss
from mrcnn.errors import TrainingDivergedError
from mrcnn.fileio import atomic_path
from mrcnn.train_callbacks import NonFiniteGuard, SafeCSVLogger, sigint_deferred
from mrcnn.weights import WeightsError


class RefinerCheckpoint(keras.callbacks.Callback):
    """After each good epoch: ``run_dir/refiner_NNNN.weights.h5``, atomically and durably."""

    def __init__(self, run_dir: Path, guard: NonFiniteGuard | None = None) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.guard = guard
        self.last: Path | None = None

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.diverged:
            return
        path = self.run_dir / refiner_checkpoint_name(epoch + 1)
        with sigint_deferred(), atomic_path(path, durable=True, suffix=".tmp.weights.h5") as tmp:
            self.model.save_weights(str(tmp))  # Keras 3 wants the .weights.h5 ending
        self.last = path


def compiled_unet(settings: RefineSettings) -> keras.Model:
    """The U-Net compiled with Adam at REFINE_LEARNING_RATE and BCE + soft Dice."""
    net = build_unet(settings)
    net.compile(optimizer=keras.optimizers.Adam(settings.learning_rate), loss=refine_loss)
    return net


def load_refiner_weights(net: keras.Model, path: Path) -> None:
    """Load a refiner checkpoint into ``net``; WeightsError naming the file when it does not fit
    (another REFINE_DEPTH, REFINE_WIDTH or REFINE_MASK_CHANNEL; the U-Net is fully convolutional,
    so another REFINE_CROP_SIZE loads and runs, at a scale it was not trained for)."""
    try:
        with warnings.catch_warnings():  # Keras warns per skipped layer before it raises
            warnings.simplefilter("ignore", UserWarning)
            net.load_weights(str(path))
    except (ValueError, OSError, KeyError) as exc:
        raise WeightsError(f"refiner checkpoint {path} does not match the REFINE_* settings of the config"
                           f" (crop size, depth, width, mask channel): {' '.join(str(exc).split())[:200]}") from None


def loader_threads() -> int:
    """Threads that read and crop training images (decoding a large ISIC JPEG takes ~0.25 s;
    OpenCV and Pillow release the GIL): up to 8, one per CPU core."""
    return max(1, min(8, os.cpu_count() or 1))


def train_refiner(settings: RefineSettings, train_set: Any, val_set: Any | None, run_dir: Path,
                  epochs: int | None = None, callbacks: Sequence[keras.callbacks.Callback] = (),
                  verbose: int | str = "auto") -> Path | None:
    """Train (or continue) the refiner in ``run_dir`` up to ``epochs`` (default REFINE_EPOCHS).

    ``train_set`` / ``val_set``: prepared ``mrcnn`` Datasets (``val_set`` may be None or empty:
    no validation loss). The initial weights and dropout follow ``settings.seed`` (SEED) plus the
    first epoch, as the detector's do. Returns the newest refiner checkpoint (None when nothing was
    trained).
    """
    run_dir = Path(run_dir)
    final = settings.epochs if epochs is None else int(epochs)
    start = newest_refiner(run_dir)
    start_epoch = refiner_epoch(start) if start is not None else 0
    if start_epoch >= final:
        print(f"Refiner: {start.name if start else '-'} is at epoch {start_epoch}, REFINE_EPOCHS is {final}:"
              " nothing to train.")
        return start
    keras.utils.set_random_seed(settings.seed + start_epoch)  # SEED makes the initial weights reproducible
    net = compiled_unet(settings)
    if start is not None:
        print(f"Refiner: continuing from {start}", flush=True)
        load_refiner_weights(net, start)
    train_data = RefineCrops(train_set, settings, train=True, steps=settings.steps_per_epoch,
                             workers=loader_threads(), use_multiprocessing=False)
    train_data.set_epoch(start_epoch)
    val_data = None
    if val_set is not None and len(val_set.image_ids):
        val_data = RefineCrops(val_set, settings, train=False)
    print(f"\nStage 'refiner': epochs {start_epoch + 1}..{final}, U-Net depth {settings.depth} width"
          f" {settings.width} on {settings.crop_size} px crops ({settings.channels} channels),"
          f" {len(train_data)} steps/epoch of {settings.batch_size}", flush=True)
    guard = NonFiniteGuard(len(train_data))
    checkpoint = RefinerCheckpoint(run_dir, guard)
    net.fit(train_data, validation_data=val_data, epochs=final, initial_epoch=start_epoch, verbose=verbose,
            callbacks=[guard, SafeCSVLogger(str(run_dir / REFINER_LOG), start_epoch, guard), checkpoint,
                       *callbacks])
    if guard.diverged:
        raise TrainingDivergedError(f"refiner {guard.message}; the last good checkpoint is kept")
    return newest_refiner(run_dir)
