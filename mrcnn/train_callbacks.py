"""Keras callbacks used by :func:`mrcnn.training.train`.

* :class:`NonFiniteGuard` stops training at the first NaN/Inf loss and remembers where.
* :class:`EpochCheckpoint` writes ``mask_rcnn_<name>_NNNN.h5`` after every good epoch
  (atomically, through ``MaskRCNN.save_weights``; a Ctrl-C arriving meanwhile is held until the
  file is complete) and keeps ``MaskRCNN.epoch`` current; with WEIGHTS_EMA the file holds the
  weights' moving average (:func:`averaged_weights`). Before it, with SAVE_OPTIMIZER_STATE, the
  optimisers' state ``optimizer_<name>_NNNN.h5`` (:mod:`mrcnn.optimizer_state`).
* :class:`SafeCSVLogger` keeps ``training.csv`` (one row per epoch: losses and val_ losses),
  rewritten atomically so an interrupted run never leaves a torn file; rows of a resumed run
  replace rows of the same epochs.
* :class:`ScalarSummaries` writes the same numbers as TensorBoard scalars.
* :class:`CosineLearningRate` sets the rate of every step for LR_SCHEDULE "cosine".
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import math
import os
import signal
import threading

import keras
import numpy as np
import tensorflow as tf

from mrcnn.checkpoints import optimizer_state_path
from mrcnn.fileio import TEMP_PREFIX, write_text_atomic
from mrcnn.optimizer_state import OptimizerStateError, averaged_weights, save_optimizer_state
from mrcnn.schedules import learning_rate_at


def _floats(logs: dict | None) -> dict[str, float]:
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[key] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue
    return out


class NonFiniteGuard(keras.callbacks.Callback):
    """Stop at the first batch whose (running) losses are not finite; see ``message``."""

    def __init__(self, steps_per_epoch: int) -> None:
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.epoch = 0
        self.diverged = False
        self.message = ""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        values = _floats(logs)
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad and not self.diverged:
            self.diverged = True
            step = self.epoch * self.steps_per_epoch + batch + 1
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            self.message = (f"training diverged at epoch {self.epoch + 1}, step {batch + 1} (global step {step}):"
                            f" non-finite {', '.join(sorted(bad))} ({shown})")
            print("\n" + self.message)
            self.model.stop_training = True


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch without divergence: save weights to ``mrcnn_model.checkpoint_path``.

    With ``save_optimizer`` (SAVE_OPTIMIZER_STATE) the optimisers' state goes first into
    ``optimizer_<name>_NNNN.h5`` (:mod:`mrcnn.optimizer_state`, recording the stage's ``layers``),
    then the weights, both atomic, under one deferred Ctrl-C; once the checkpoint is complete the
    previous epoch's state file is removed (only the newest checkpoint's is kept: each is about
    twice the trainable weights with AdamW). A kill between the writes leaves the previous
    checkpoint with its own state. A state that cannot be written is one printed line: the
    checkpoint is still written.
    """

    def __init__(self, mrcnn_model, guard: NonFiniteGuard | None = None, write: bool = True,
                 save_optimizer: bool = False, layers: str = "") -> None:
        super().__init__()
        self.mrcnn_model = mrcnn_model
        self.guard = guard
        self.write = write  # False: a non-chief worker of a multi-worker run only counts the epochs
        self.save_optimizer = save_optimizer
        self.layers = layers

    def on_train_begin(self, logs=None):
        if not self.write:
            return
        # Temporary files of writes a killed run never finished (mrcnn.fileio names them
        # .tmp-<pid>-<hex>.tmp: never loadable, not named *.h5); also the older <checkpoint>.h5.tmp.
        folder = glob.escape(self.mrcnn_model.log_dir)
        old_pattern = os.path.basename(self.mrcnn_model.checkpoint_path).replace("{epoch:04d}", "*") + ".tmp"
        for pattern in (f"{TEMP_PREFIX}*", old_pattern):
            for stale in glob.glob(os.path.join(folder, pattern)):
                with contextlib.suppress(OSError):
                    os.remove(stale)

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.diverged:
            return
        if not self.write:
            self.mrcnn_model.epoch = epoch + 1
            return
        path = self.mrcnn_model.checkpoint_path.format(epoch=epoch + 1)
        with sigint_deferred():  # finish the files, then stop
            saved = self.save_optimizer and self._save_optimizer_state(path, epoch + 1)  # first: see the class doc
            with averaged_weights(getattr(self.model, "optimizer", None)):
                self.mrcnn_model.save_weights(path)
            self.mrcnn_model.epoch = epoch + 1
            if saved and epoch > 0:  # only the newest checkpoint's state is kept
                with contextlib.suppress(OSError):
                    os.remove(optimizer_state_path(self.mrcnn_model.checkpoint_path.format(epoch=epoch)))

    def _save_optimizer_state(self, checkpoint: str, epoch: int) -> bool:
        """Write the state of ``epoch`` beside ``checkpoint``; False (and one printed line) when it cannot."""
        try:
            save_optimizer_state(self.model, optimizer_state_path(checkpoint), epoch, self.layers)
        except (OptimizerStateError, OSError) as err:
            print(f"\nnote: the optimizer state of epoch {epoch} was not saved ({err}); a resume from it"
                  " starts the optimizer fresh", flush=True)
            return False
        return True


@contextlib.contextmanager
def sigint_deferred():
    """Hold a SIGINT (Ctrl-C) that arrives inside the block; raise KeyboardInterrupt after it.

    Only in the main thread (where Python delivers signals); elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class SafeCSVLogger(keras.callbacks.Callback):
    """Per-epoch rows (1-based ``epoch`` then sorted keys) in ``path``, rewritten atomically.

    Rows after ``first_epoch`` (left by an abandoned run) are replaced; diverged epochs are not written.
    """

    def __init__(self, path: str, first_epoch: int = 0, guard: NonFiniteGuard | None = None) -> None:
        super().__init__()
        self.path = path
        self.guard = guard
        self.first_epoch = int(first_epoch)
        self.rows: list[dict[str, str]] = []

    def on_train_begin(self, logs=None):
        self.rows = []
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r.get("epoch", 0) or 0) <= self.first_epoch]

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.diverged:
            return  # the epoch has no checkpoint either; the error message has the numbers
        row = {"epoch": str(epoch + 1)}
        row.update({k: f"{v:.6g}" for k, v in sorted(_floats(logs).items())})
        self.rows = [r for r in self.rows if r.get("epoch") != row["epoch"]] + [row]
        fields = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buffer.getvalue(), durable=True)


def _scalar_metadata() -> bytes:
    """Summary metadata that makes TensorBoard show a raw summary as a scalar (no tensorboard import)."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    return metadata.SerializeToString()


_SCALAR_METADATA = _scalar_metadata()


class ScalarSummaries(keras.callbacks.Callback):
    """TensorBoard scalars of every epoch log value (``train/<name>``; val_ values under ``val/``)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__()
        self.log_dir = log_dir
        self.writer = None

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default():
            for key, value in _floats(logs).items():
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                tf.summary.write(tag, tf.constant(value, tf.float32), step=epoch + 1, metadata=_SCALAR_METADATA)
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()


class CosineLearningRate(keras.callbacks.Callback):
    """Sets the optimiser's rate before every step: linear warm-up over ``warmup_steps``, then
    cosine from ``base`` to COSINE_FLOOR x ``base`` at ``total_steps``
    (:func:`mrcnn.schedules.learning_rate_at`).

    The step is global: ``epoch * steps_per_epoch + batch`` with Keras' absolute epoch, so a run
    resumed at epoch k (``initial_epoch``) continues the same curve.
    """

    def __init__(self, base: float, total_steps: int, steps_per_epoch: int, warmup_steps: int = 0) -> None:
        super().__init__()
        self.base = float(base)
        self.total_steps = max(int(total_steps), 1)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_steps = int(warmup_steps)
        self.epoch = 0

    def rate(self, step: int) -> float:
        """The rate of global step ``step`` (0-based)."""
        return learning_rate_at(self.base, step / self.total_steps, step, "cosine", self.warmup_steps)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = int(epoch)

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.rate(self.epoch * self.steps_per_epoch + int(batch))
