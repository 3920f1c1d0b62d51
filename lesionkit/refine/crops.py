"""Training and validation crops for the refinement U-Net, from true lesion boxes.

Every sample is one image of an ``mrcnn`` Dataset (``load_image``, ``load_mask``): the box of its
lesion pixels (union of the instances), a window around it, and the image and mask in that
window resized to ``crop_size``. Training windows are random (:func:`geometry.random_window`:
each side ``REFINE_TRAIN_SCALE`` x the box side, the centre shifted by up to
``REFINE_TRAIN_SHIFT`` x the side), so the U-Net learns to correct a detector's imperfect box;
then flips, 90-degree rotations and mild colour jitter (albumentations). Validation windows are
the inference window (``REFINE_MARGIN``), unaugmented. With ``REFINE_MASK_CHANNEL`` the fourth
input channel is a simulated coarse mask (:func:`coarse_mask`: the true mask through a 28x28
round trip, thresholded too low or too high, grown or shrunk by a few pixels), standing in for
the Mask R-CNN mask the stage gets at inference. Images without lesion pixels are skipped.
"""

from __future__ import annotations

from typing import Any

import cv2
import keras
import numpy as np

from lesionkit.prediction_files import mask_box
from lesionkit.refine import geometry
from lesionkit.refine.settings import RefineSettings
from mrcnn.errors import UserError


class RefineDataError(UserError):
    """The refiner has no usable training crop (one-line message)."""


#: Side of Mask R-CNN's mask head output (Matterport's MASK_SHAPE), simulated for the coarse channel.
COARSE_SIDE = 28


def colour_augmentation(seed: int | None) -> Any:
    """Flips, 90-degree rotations, mild brightness/contrast and hue/saturation (albumentations)."""
    import albumentations as A

    from mrcnn.augmentation import seed_transform

    return seed_transform(A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=15, val_shift_limit=10, p=0.3),
    ]), seed)


def coarse_mask(target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 [S, S] 0/1: ``target`` [S, S] through a 28x28 round trip, thresholded at 0.3-0.7 and
    dilated or eroded by 0-3 % of S: what an imperfect Mask R-CNN mask looks like."""
    size = target.shape[0]
    small = cv2.resize(target.astype(np.float32), (COARSE_SIDE, COARSE_SIDE), interpolation=cv2.INTER_AREA)
    back = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)
    mask = (back >= rng.uniform(0.3, 0.7)).astype(np.uint8)
    radius = int(round(rng.uniform(0.0, 0.03) * size))
    if radius:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.dilate(mask, kernel) if rng.random() < 0.5 else cv2.erode(mask, kernel)
    return mask.astype(np.float32)


def model_input(image_crop: np.ndarray, coarse: np.ndarray | None) -> np.ndarray:
    """float32 [S, S, 3 or 4]: the RGB crop (0..255) and, if given, the coarse mask x 255."""
    rgb = image_crop.astype(np.float32)
    if coarse is None:
        return rgb
    return np.concatenate([rgb, coarse.astype(np.float32)[..., None] * 255.0], axis=-1)


class RefineCrops(keras.utils.PyDataset):
    """Batches (x [B, S, S, C] float32, y [B, S, S, 1] float32) of lesion crops from ``dataset``.

    ``train``: random windows and augmentation, a new order each epoch (seeded by SEED, epoch and
    batch, so a resumed run draws the same crops); else the inference window, fixed order.
    ``steps``: batches per epoch (0 = one pass over the images).
    """

    def __init__(self, dataset: Any, settings: RefineSettings, train: bool = True, steps: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset
        self.settings = settings
        self.train = train
        self.image_ids = [int(i) for i in dataset.image_ids]
        if not self.image_ids:
            raise RefineDataError("the refiner needs at least one training image")
        self.steps = int(steps) or max(1, -(-len(self.image_ids) // settings.batch_size))
        self.epoch = 0
        self.augment = colour_augmentation(settings.seed) if train else None

    def __len__(self) -> int:
        return self.steps

    def on_epoch_end(self) -> None:  # called by Keras fit after each epoch
        self.epoch += 1

    def set_epoch(self, epoch: int) -> None:
        """Start drawing as epoch ``epoch`` (0-based) does: a resumed run continues the sequence."""
        self.epoch = int(epoch)

    def _order(self) -> np.ndarray:
        n = len(self.image_ids)
        if not self.train:
            return np.arange(n)
        rng = np.random.default_rng([self.settings.seed, self.epoch])
        passes = -(-self.steps * self.settings.batch_size // n) + 1
        return np.concatenate([rng.permutation(n) for _ in range(passes)])

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        order = self._order()
        rng = np.random.default_rng([self.settings.seed, self.epoch, int(index), 1])
        xs, ys = [], []
        position = int(index) * self.settings.batch_size
        tried = 0
        while len(xs) < self.settings.batch_size and tried < len(order) + len(self.image_ids):
            sample = self.sample(self.image_ids[order[position % len(order)]], rng)
            position += 1
            tried += 1
            if sample is not None:
                xs.append(sample[0])
                ys.append(sample[1])
        if not xs:
            raise RefineDataError("no training image for the refiner has lesion pixels (all masks are empty);"
                                  " set REFINE = false")
        return np.stack(xs), np.stack(ys)[..., None]

    def sample(self, image_id: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """(x [S, S, C], y [S, S]) for one image, or None when its mask is empty."""
        masks, _ = self.dataset.load_mask(image_id)
        truth = np.asarray(masks, dtype=bool).any(axis=-1) if masks.ndim == 3 else np.asarray(masks, bool)
        box = mask_box(truth)
        if box is None:
            return None
        image = self.dataset.load_image(image_id)
        s = self.settings
        if self.train:
            window = geometry.random_window(box, rng, s.train_scale, s.train_shift)
        else:
            window = geometry.crop_window(box, s.margin)
        crop = geometry.crop_resize(image, window, s.crop_size)
        target = geometry.crop_resize(truth, window, s.crop_size)
        target = (target >= 0.5).astype(np.float32)
        if self.augment is not None:
            out = self.augment(image=np.clip(crop, 0, 255).astype(np.uint8), mask=target)
            crop, target = out["image"], out["mask"].astype(np.float32)
        coarse = coarse_mask(target, rng) if s.mask_channel else None
        return model_input(crop, coarse), target
