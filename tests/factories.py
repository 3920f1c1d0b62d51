"""The one way tests build a config (not a test module): ``make_config(preset, **overrides)``.

A preset is a small named set of values on top of :class:`mrcnn.config.Config`'s defaults; the
keyword overrides then go through :meth:`Config.set`, so an unknown key or a value of the wrong
type is refused exactly as a user's ``--set`` is, derived values (BATCH_SIZE, IMAGE_SHAPE, ...)
are recomputed, and the result is :meth:`Config.validate`-d.

Presets:

* ``"tiny"``: ``tests/data/tiny.toml`` (the tests-only CLI preset: ResNet-50 at 64 px, small
  RPN and heads), its Matterport keys; NAME "tiny", 2 classes.
* ``"small"``: 64 px with a five-conv stand-in backbone (:func:`helpers.tiny_backbone`) and the
  real FPN/RPN/heads: one training step takes seconds on CPU, also under mixed precision.
* ``"coco"``: the reference README's COCO inference config (81 classes, ResNet-101, 256 px).
* ``"matterport"``: Matterport's defaults (ResNet-101, 1024 px, full-size heads); NAME "test",
  2 classes.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from helpers import tiny_backbone, tiny_backbone_shapes

from mrcnn.config import Config

TINY_TOML = Path(__file__).resolve().parent / "data" / "tiny.toml"

#: Keys of tiny.toml that only lesions.LesionConfig has (the training schedule, the demo data).
LESION_ONLY_KEYS = ("HEADS_EPOCHS", "ALL_EPOCHS", "DEMO_IMAGES", "DEMO_IMAGE_SIZE", "VALIDATION_FRACTION")


def _tiny() -> dict[str, Any]:
    values = tomllib.loads(TINY_TOML.read_text(encoding="utf-8"))
    return {"NAME": "tiny", "NUM_CLASSES": 2,
            **{k: v for k, v in values.items() if k not in LESION_ONLY_KEYS}}


PRESETS: dict[str, Any] = {
    "tiny": _tiny,
    "small": lambda: {
        "NAME": "small", "NUM_CLASSES": 2, "IMAGES_PER_GPU": 1,
        "BACKBONE": tiny_backbone, "COMPUTE_BACKBONE_SHAPE": tiny_backbone_shapes,
        "TOP_DOWN_PYRAMID_SIZE": 32, "IMAGE_MIN_DIM": 64, "IMAGE_MAX_DIM": 64,
        "RPN_ANCHOR_SCALES": [8, 16, 32, 64, 128], "PRE_NMS_LIMIT": 256, "POST_NMS_ROIS_TRAINING": 64,
        "POST_NMS_ROIS_INFERENCE": 32, "TRAIN_ROIS_PER_IMAGE": 64, "DETECTION_MAX_INSTANCES": 8,
        "DETECTION_MIN_CONFIDENCE": 0.0, "MAX_GT_INSTANCES": 2, "FPN_CLASSIF_FC_LAYERS_SIZE": 64, "SEED": 5,
    },
    "coco": lambda: {"NAME": "coco", "NUM_CLASSES": 81, "IMAGES_PER_GPU": 1, "IMAGE_MIN_DIM": 256,
                     "IMAGE_MAX_DIM": 256},
    "matterport": lambda: {"NAME": "test", "NUM_CLASSES": 2},
}


def make_config(preset: str = "tiny", **overrides: Any) -> Config:
    """A validated :class:`Config`: the named preset, then ``overrides`` through ``Config.set``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown test config preset {preset!r}; known: {', '.join(PRESETS)}")
    config = Config()
    config.apply_overrides(PRESETS[preset](), source=f"preset {preset}")
    config.apply_overrides(overrides, source="make_config")
    return config.validate()


def make_lesion_config(**overrides: Any) -> Config:
    """A validated ``lesions.LesionConfig`` (the CLI's config, with the training-schedule keys)
    with ``overrides`` through ``Config.set``."""
    import lesions

    return lesions.LesionConfig().apply_overrides(overrides, source="make_lesion_config").validate()
