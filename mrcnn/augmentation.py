"""Training augmentations by name: albumentations transforms of the image and its instance masks,
and their seeding.

Light to import (albumentations is imported when a transform is built), so the CLI can check the
AUGMENTATION key before TensorFlow loads. :mod:`mrcnn.input_pipeline` applies them.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np

#: The training augmentations by name (the AUGMENTATION key of lesions.LesionConfig).
AUGMENTATIONS = ("default", "flips", "scale", "none")


def seed_transform(transform: Any, seed: int | None) -> Any:
    """Seed an albumentations transform (a Compose and all it holds) from ONE random stream.

    albumentations 2.0's own ``Compose(seed=s)`` / ``set_random_seed(s)`` gives every child
    transform a generator seeded with the same ``s``, so their draws coincide: HorizontalFlip and
    VerticalFlip (both p = 0.5) then flip together or not at all, and the eight flips / rotations
    of the square shrink to the four rotations. Sharing one numpy and one Python generator makes
    the children draw one after another, independently. Returns ``transform``.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


def default_augmentation(seed: int | None = None) -> Any:
    """Flips, 90-degree rotations, mild scale/shift and colour jitter (albumentations Compose).

    Meant for square training images (IMAGE_RESIZE_MODE "square"); lesions have no canonical
    orientation, so all eight flips/rotations are valid.
    """
    import albumentations as A
    import cv2

    return seed_transform(A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=cv2.BORDER_CONSTANT, p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=10, val_shift_limit=5, p=0.3),
    ]), seed)


def flips_augmentation(seed: int | None = None) -> Any:
    """The eight flips / 90-degree rotations of the square, each equally likely, nothing else
    (albumentations Compose): the from-scratch CPU presets' augmentation."""
    import albumentations as A

    return seed_transform(A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0)]), seed)


def scale_augmentation(seed: int | None = None) -> Any:
    """The eight flips / rotations, then (probability 0.7) a zoom by 0.5-2x and a shift by up to 10 %
    of each side (albumentations Compose).

    For images from other cameras: HAM10000's lesions fill a median 21 % of the photo (2 % of
    images under 2 %), while other collections (e.g. ISIC 2017) hold many of 0.5-3 %; the zoom-outs
    teach small lesions, the zoom-ins lesions cut by the frame. Zoom is log-uniform (zooming in and
    out equally likely, ``balanced_scale``); uncovered borders are black, like a dermoscope's
    vignette, and lesions pushed out of the frame drop out of the targets.
    """
    import albumentations as A
    import cv2

    return seed_transform(A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        A.Affine(scale=(0.5, 2.0), balanced_scale=True, translate_percent=(-0.1, 0.1),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.7),
    ]), seed)


def named_augmentation(name: str, seed: int | None = None) -> Any:
    """``"default"`` -> :func:`default_augmentation`, ``"flips"`` -> :func:`flips_augmentation`,
    ``"scale"`` -> :func:`scale_augmentation`, ``"none"`` -> None; seeded by ``seed``."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    builders = {"default": default_augmentation, "flips": flips_augmentation, "scale": scale_augmentation}
    return None if name == "none" else builders[name](seed)
