"""Run folders and checkpoint files: Matterport's naming, in one place.

A training run writes into ``<model_dir>/<name><YYYYmmddTHHMM>/`` (``name`` = the config's NAME
in lower case) one checkpoint per epoch, ``mask_rcnn_<name>_<epoch:04d>.h5`` (epoch 1-based, the
number of epochs completed), and with AVERAGE_LAST_EPOCHS = N at its end
``mask_rcnn_<name>_<epoch:04d>_average<N>.h5``, the mean of the last N (not a checkpoint: training
never resumes from it). Next to each checkpoint, ``optimizer_<name>_<epoch:04d>.h5`` holds the
optimiser's state of that epoch (:mod:`mrcnn.optimizer_state`; not weights: its name matches neither
the checkpoint pattern nor ``mask_rcnn_*``, which Matterport's ``find_last`` sorts and takes the last
of). These functions build, parse and find such names; nothing else in the package spells the pattern.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

#: Time stamp of a run folder (minute resolution, as Matterport).
RUN_STAMP_FORMAT = "%Y%m%dT%H%M"
#: ``<name><YYYYmmddTHHMM>`` -> (name, stamp).
RUN_FOLDER_RE = re.compile(r"^(.+?)(\d{8}T\d{4})$")
#: ``mask_rcnn_<name>_<NNNN>.h5`` -> (name, epoch).
CHECKPOINT_NAME_RE = re.compile(r"^mask_rcnn_(.+)_(\d{4,})\.h5$")
#: ``mask_rcnn_<name>_<NNNN>_average<N>.h5`` -> (name, epoch, N).
AVERAGE_NAME_RE = re.compile(r"^mask_rcnn_(.+)_(\d{4,})_average(\d+)\.h5$")
#: Prefix of the optimiser state of checkpoint ``mask_rcnn_<name>_<NNNN>.h5``: ``optimizer_<name>_<NNNN>.h5``.
OPTIMIZER_STATE_PREFIX = "optimizer_"


def run_folder_name(name: str, when: datetime.datetime) -> str:
    """``<name lower case><YYYYmmddTHHMM>``, e.g. ``lesion20261206T0130``."""
    return f"{str(name).lower()}{when:{RUN_STAMP_FORMAT}}"


def checkpoint_template(name: str) -> str:
    """File name with an ``{epoch:04d}`` field: ``mask_rcnn_<name>_{epoch:04d}.h5``."""
    return f"mask_rcnn_{str(name).lower()}_" + "{epoch:04d}.h5"


def checkpoint_epoch(path: str | os.PathLike) -> int | None:
    """The epoch of a checkpoint file name, or None when the name is not a checkpoint's."""
    match = CHECKPOINT_NAME_RE.match(Path(path).name)
    return int(match.group(2)) if match else None


def parse_checkpoint_path(path: str | os.PathLike) -> tuple[datetime.datetime, int] | None:
    """(run time stamp, epoch) of ``.../<name>YYYYmmddTHHMM/mask_rcnn_<name>_NNNN.h5``, else None."""
    path = Path(path)
    epoch = checkpoint_epoch(path)
    folder = RUN_FOLDER_RE.match(path.parent.name)
    if epoch is None or folder is None:
        return None
    try:
        return datetime.datetime.strptime(folder.group(2), RUN_STAMP_FORMAT), epoch
    except ValueError:
        return None


def checkpoints_in(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``folder``, lowest epoch first (temporary files are not checkpoints)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and checkpoint_epoch(p) is not None]
    return sorted(found, key=lambda p: (checkpoint_epoch(p), p.name))


def run_folders(model_dir: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Run folders under ``model_dir``, newest time stamp first; only config ``name``'s when given.

    The name must match exactly (case-insensitive): the runs of ``lesion_fold0`` are not runs of
    ``lesion``.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    runs = []
    for folder in model_dir.iterdir():
        match = RUN_FOLDER_RE.match(folder.name)
        if folder.is_dir() and match and (name is None or match.group(1) == str(name).lower()):
            runs.append((match.group(2), folder.name, folder))
    return [folder for _, _, folder in sorted(runs, reverse=True)]


def average_path(checkpoint: str | os.PathLike, count: int) -> Path:
    """Where the mean of the ``count`` checkpoints ending at ``checkpoint`` goes (same folder)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_average{int(count)}.h5")


def average_of(checkpoint: str | os.PathLike) -> Path | None:
    """The tail average written for ``checkpoint`` (its epoch, its folder), else None; the one
    over the most epochs when there are several."""
    checkpoint = Path(checkpoint)
    found = []
    if checkpoint.parent.is_dir():
        for path in checkpoint.parent.iterdir():
            match = AVERAGE_NAME_RE.match(path.name)
            if match and path.is_file() and path.name.startswith(checkpoint.stem + "_average"):
                found.append((int(match.group(3)), path))
    return max(found)[1] if found else None


def optimizer_state_path(checkpoint: str | os.PathLike) -> Path:
    """Where the optimiser state saved with ``checkpoint`` (``mask_rcnn_<name>_NNNN.h5``) goes:
    ``optimizer_<name>_NNNN.h5`` in the same folder. ValueError for a name that is not a checkpoint's."""
    checkpoint = Path(checkpoint)
    if checkpoint_epoch(checkpoint) is None:
        raise ValueError(f"{checkpoint.name} is not a checkpoint name (mask_rcnn_<name>_NNNN.h5)")
    return checkpoint.with_name(OPTIMIZER_STATE_PREFIX + checkpoint.name[len("mask_rcnn_"):])


def final_weights(checkpoint: str | os.PathLike) -> Path:
    """The weights that predict for a run whose newest checkpoint is ``checkpoint``: its tail
    average when training wrote one (AVERAGE_LAST_EPOCHS), else the checkpoint itself."""
    return average_of(checkpoint) or Path(checkpoint)


def newest_checkpoint(model_dir: str | os.PathLike, name: str | None = None) -> Path | None:
    """Highest-epoch checkpoint of the newest run (of config ``name``) that has one, else None."""
    for run in run_folders(model_dir, name):
        found = checkpoints_in(run)
        if found:
            return found[-1]
    return None
