"""The refinement stage's settings: the ``REFINE_*`` keys of a config, validated in one place.

:meth:`RefineSettings.from_config` reads them (``lesions.LesionConfig`` declares them with their
defaults and comments) and :meth:`RefineSettings.check` refuses bad values with a one-line
:class:`mrcnn.config.ConfigError` naming the key; ``LesionConfig.validate`` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mrcnn.config import ConfigError

#: Config key -> RefineSettings field.
KEYS = {
    "REFINE": "enabled",
    "REFINE_CROP_SIZE": "crop_size",
    "REFINE_DEPTH": "depth",
    "REFINE_WIDTH": "width",
    "REFINE_MARGIN": "margin",
    "REFINE_MASK_CHANNEL": "mask_channel",
    "REFINE_EPOCHS": "epochs",
    "REFINE_STEPS_PER_EPOCH": "steps_per_epoch",
    "REFINE_BATCH_SIZE": "batch_size",
    "REFINE_LEARNING_RATE": "learning_rate",
    "REFINE_TRAIN_SCALE": "train_scale",
    "REFINE_TRAIN_SHIFT": "train_shift",
    "REFINE_MASK_THRESHOLD": "threshold",
}


@dataclass(frozen=True)
class RefineSettings:
    """The U-Net's shape, its crops and its training schedule (see ``LesionConfig``'s comments)."""

    enabled: bool = True
    crop_size: int = 128
    depth: int = 4
    width: int = 16
    margin: float = 0.1
    mask_channel: bool = False
    epochs: int = 10
    steps_per_epoch: int = 0
    batch_size: int = 8
    learning_rate: float = 0.001
    train_scale: tuple[float, float] = (0.81, 1.21)
    train_shift: float = 0.1
    threshold: float = 0.5
    seed: int = 42

    @classmethod
    def from_config(cls, config: Any) -> "RefineSettings":
        """The settings of ``config`` (which must have every ``REFINE_*`` key), checked."""
        missing = [k for k in KEYS if not hasattr(config, k)]
        if missing:
            raise ConfigError(f"config has no {missing[0]} (refinement keys are declared in lesions.LesionConfig)")
        values = {field: getattr(config, key) for key, field in KEYS.items()}
        values["train_scale"] = tuple(float(v) for v in values["train_scale"])
        return cls(**values, seed=int(config.SEED or 0)).check()

    @property
    def channels(self) -> int:
        """Input channels: RGB, plus the detector's coarse mask with ``mask_channel``."""
        return 4 if self.mask_channel else 3

    def check(self) -> "RefineSettings":
        """``self`` if every value is usable, else ConfigError naming the first bad key."""
        step = 2 ** self.depth if isinstance(self.depth, int) else 1
        rules = [
            ("REFINE_DEPTH", isinstance(self.depth, int) and 1 <= self.depth <= 6, "an integer from 1 to 6"),
            ("REFINE_WIDTH", isinstance(self.width, int) and 4 <= self.width <= 256, "an integer from 4 to 256"),
            ("REFINE_CROP_SIZE", isinstance(self.crop_size, int) and 32 <= self.crop_size <= 2048
             and self.crop_size % step == 0, f"an integer from 32 to 2048 divisible by 2**REFINE_DEPTH ({step})"),
            ("REFINE_MARGIN", 0.0 <= self.margin <= 1.0, "a number from 0 to 1 (share of the box side added"
             " on each side)"),
            ("REFINE_EPOCHS", isinstance(self.epochs, int) and self.epochs >= 0, "an integer >= 0"),
            ("REFINE_STEPS_PER_EPOCH", isinstance(self.steps_per_epoch, int) and self.steps_per_epoch >= 0,
             "an integer >= 0 (0 = one pass over the training lesions)"),
            ("REFINE_BATCH_SIZE", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("REFINE_LEARNING_RATE", 0.0 < self.learning_rate < 1.0, "a number in (0, 1)"),
            ("REFINE_TRAIN_SCALE", len(self.train_scale) == 2 and 0.5 <= self.train_scale[0] <= self.train_scale[1]
             <= 3.0, "[low, high] with 0.5 <= low <= high <= 3 (crop side / box side)"),
            ("REFINE_TRAIN_SHIFT", 0.0 <= self.train_shift <= 0.5, "a number from 0 to 0.5 (share of the box side)"),
            ("REFINE_MASK_THRESHOLD", 0.0 < self.threshold < 1.0, "a number in (0, 1)"),
        ]
        for key, ok, expected in rules:
            if not ok:
                raise ConfigError(f"{key} must be {expected}, got {getattr(self, KEYS[key])!r}")
        return self
