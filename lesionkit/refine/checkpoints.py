"""Refiner checkpoint files in a run folder: ``refiner_NNNN.weights.h5`` (epoch 1-based).

They sit next to the detector's ``mask_rcnn_<name>_NNNN.h5`` files and never match their pattern,
so ``--weights last`` and :func:`mrcnn.checkpoints.newest_checkpoint` still find the detector.
Written atomically (:func:`mrcnn.fileio.atomic_path`; the temporary name starts with ``.tmp-``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: ``refiner_<NNNN>.weights.h5`` -> epoch.
REFINER_NAME_RE = re.compile(r"^refiner_(\d{4,})\.weights\.h5$")
#: The training log of the refinement stage, next to ``training.csv``.
REFINER_LOG = "refiner_training.csv"


def refiner_checkpoint_name(epoch: int) -> str:
    """``refiner_0003.weights.h5`` for epoch 3."""
    return f"refiner_{int(epoch):04d}.weights.h5"


def refiner_epoch(path: str | os.PathLike) -> int | None:
    """The epoch of a refiner checkpoint name, else None."""
    match = REFINER_NAME_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def refiner_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Refiner checkpoints in ``run_dir``, lowest epoch first."""
    folder = Path(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and refiner_epoch(p) is not None]
    return sorted(found, key=lambda p: refiner_epoch(p) or 0)


def newest_refiner(run_dir: str | os.PathLike) -> Path | None:
    """The highest-epoch refiner checkpoint of ``run_dir``, None when the run has none."""
    found = refiner_checkpoints(run_dir)
    return found[-1] if found else None
