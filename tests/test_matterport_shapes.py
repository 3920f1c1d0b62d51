"""A Matterport user's shapes tutorial (train_shapes), re-created in our own words, on our mrcnn.

The calls are the tutorial's: a ``Config`` subclass and a ``utils.Dataset`` subclass that draws
squares, circles and triangles; ``MaskRCNN(mode="training")``, ``train(..., layers="heads")`` then
``train(..., layers="all")`` at a tenth of the learning rate; an inference config subclass,
``find_last()``, ``load_weights(by_name=True)``, ``modellib.load_image_gt``, ``detect`` and
``utils.compute_ap``. Sizes are cut down (64 px, a light backbone, a few steps) so it runs in a
minute; the assertions are on the API's behaviour, not on how well a 4-step model detects.
"""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
import pytest
from helpers import SmallSampleModel

import mrcnn.model as modellib
from mrcnn import utils, visualize
from mrcnn.config import Config


class ShapesConfig(SmallSampleModel, Config):
    """The tutorial's config (subclassing is what this test is about), shrunk for the CPU
    (SmallSampleModel: 64 px, a light backbone, 2 steps per epoch)."""

    NAME = "shapes"
    GPU_COUNT = 1
    IMAGES_PER_GPU = 2
    NUM_CLASSES = 1 + 3


class InferenceConfig(ShapesConfig):
    GPU_COUNT = 1
    IMAGES_PER_GPU = 1


class ShapesDataset(utils.Dataset):
    """Squares, circles and triangles on a plain background, drawn on the fly from their specs."""

    def load_shapes(self, count: int, height: int, width: int, rng: random.Random) -> None:
        for class_id, name in enumerate(("square", "circle", "triangle"), start=1):
            self.add_class("shapes", class_id, name)
        for i in range(count):
            background = [rng.randint(0, 255) for _ in range(3)]
            specs = [self.random_shape(height, width, rng) for _ in range(rng.randint(1, 3))]
            boxes = np.array([[y - s, x - s, y + s, x + s] for _, _, (x, y, s) in specs])
            keep = utils.non_max_suppression(boxes, np.arange(len(specs), dtype=np.float32), 0.3)
            self.add_image("shapes", image_id=i, path=None, width=width, height=height,
                           bg_color=background, shapes=[specs[k] for k in sorted(keep)])

    @staticmethod
    def random_shape(height: int, width: int, rng: random.Random) -> tuple:
        margin = 10
        return (rng.choice(["square", "circle", "triangle"]), tuple(rng.randint(0, 255) for _ in range(3)),
                (rng.randint(margin, width - margin - 1), rng.randint(margin, height - margin - 1),
                 rng.randint(margin // 2, height // 5)))

    def load_image(self, image_id: int) -> np.ndarray:
        info = self.image_info[image_id]
        image = np.ones((info["height"], info["width"], 3), np.uint8) * np.array(info["bg_color"], np.uint8)
        for shape, colour, dims in info["shapes"]:
            image = self.draw_shape(image, shape, dims, colour)
        return image

    def load_mask(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        info = self.image_info[image_id]
        masks = np.zeros((info["height"], info["width"], len(info["shapes"])), np.uint8)
        for i, (shape, _, dims) in enumerate(info["shapes"]):
            masks[:, :, i] = self.draw_shape(masks[:, :, i].copy(), shape, dims, 1)
        visible = np.logical_not(masks[:, :, -1])  # later shapes cover earlier ones
        for i in range(masks.shape[-1] - 2, -1, -1):
            masks[:, :, i] *= visible
            visible &= np.logical_not(masks[:, :, i])
        class_ids = np.array([self.class_names.index(s[0]) for s in info["shapes"]], np.int32)
        return masks.astype(bool), class_ids

    @staticmethod
    def draw_shape(image: np.ndarray, shape: str, dims: tuple, colour) -> np.ndarray:
        x, y, s = dims
        if shape == "square":
            return cv2.rectangle(image, (x - s, y - s), (x + s, y + s), colour, -1)
        if shape == "circle":
            return cv2.circle(image, (x, y), s, colour, -1)
        half = s / math.sin(math.radians(60))
        points = np.array([[(x, y - s), (x - half, y + s), (x + half, y + s)]], np.int32)
        return cv2.fillPoly(image, points, colour)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("shapes_logs")
    rng = random.Random(3)
    train_set, val_set = ShapesDataset(), ShapesDataset()
    train_set.load_shapes(20, 64, 64, rng)
    val_set.load_shapes(4, 64, 64, rng)
    train_set.prepare()
    val_set.prepare()
    config = ShapesConfig()
    model = modellib.MaskRCNN(mode="training", config=config, model_dir=str(model_dir))
    model.train(train_set, val_set, learning_rate=config.LEARNING_RATE, epochs=1, layers="heads")
    model.train(train_set, val_set, learning_rate=config.LEARNING_RATE / 10, epochs=2, layers="all")
    return model_dir, val_set


def test_heads_then_all_layers_write_two_checkpoints(trained):
    model_dir, _ = trained
    (run,) = [d for d in model_dir.iterdir() if d.is_dir()]
    assert run.name.startswith("shapes")
    assert sorted(p.name for p in run.glob("*.h5")) == ["mask_rcnn_shapes_0001.h5", "mask_rcnn_shapes_0002.h5",
                                                        "optimizer_shapes_0002.h5"]  # the newest epoch's state


def test_inference_loads_the_last_checkpoint_and_detects(trained, tmp_path):
    model_dir, val_set = trained
    model = modellib.MaskRCNN(mode="inference", config=InferenceConfig(), model_dir=str(model_dir))
    model_path = model.find_last()
    assert model_path.endswith("mask_rcnn_shapes_0002.h5")
    model.load_weights(model_path, by_name=True)
    image_id = int(val_set.image_ids[0])
    image, image_meta, gt_class_id, gt_bbox, gt_mask = modellib.load_image_gt(
        val_set, InferenceConfig(), image_id, use_mini_mask=False)
    assert image.shape == (64, 64, 3) and gt_mask.shape[:2] == (64, 64)
    assert gt_mask.shape[-1] == len(gt_class_id) == len(gt_bbox) >= 1
    (r,) = model.detect([image], verbose=1)
    n = len(r["scores"])
    assert r["rois"].shape == (n, 4) and r["class_ids"].shape == (n,) and r["masks"].shape == (64, 64, n)
    assert set(r["class_ids"].tolist()) <= {1, 2, 3}
    ap, precisions, recalls, overlaps = utils.compute_ap(gt_bbox, gt_class_id, gt_mask, r["rois"],
                                                         r["class_ids"], r["scores"], r["masks"])
    assert 0.0 <= ap <= 1.0 and len(precisions) == len(recalls)
    visualize.display_instances(image, r["rois"], r["masks"], r["class_ids"], val_set.class_names, r["scores"],
                                save_path=str(tmp_path / "shapes.png"))
    assert (tmp_path / "shapes.png").stat().st_size > 0
