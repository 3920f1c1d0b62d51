"""A Matterport user's balloon sample, re-created in our own words, on our mrcnn.

The sample's calls: a ``Config`` subclass; a ``utils.Dataset`` subclass that reads a VGG Image
Annotator ``via_region_data.json`` per subset, reads each image with ``skimage.io.imread`` for its
size and draws the polygons with ``skimage.draw.polygon`` (in the stored pixel grid: see
``Dataset.APPLY_EXIF_ORIENTATION``); ``MaskRCNN(mode="training")``, ``train(..., layers="heads")``;
an inference config, ``find_last``, ``load_weights(by_name=True)``; ``detect`` on an image read
with ``skimage.io.imread``, the colour splash with ``skimage.color`` and ``skimage.io.imsave``.
The data are a few generated balloon-like images; sizes are cut down so it runs in well under a
minute. Requires scikit-image (requirements-matterport.txt): skipped without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage")
import skimage.color  # noqa: E402
import skimage.draw  # noqa: E402
import skimage.io  # noqa: E402
from helpers import SmallSampleModel, write_via_subset  # noqa: E402

import mrcnn.model as modellib  # noqa: E402
from mrcnn import utils  # noqa: E402
from mrcnn.config import Config  # noqa: E402


class BalloonConfig(SmallSampleModel, Config):
    """The sample's config (subclassing is what this test is about), shrunk for the CPU
    (SmallSampleModel: 64 px, a light backbone, 2 steps per epoch)."""

    NAME = "balloon"
    IMAGES_PER_GPU = 2
    NUM_CLASSES = 1 + 1
    DETECTION_MIN_CONFIDENCE = 0.9


class BalloonDataset(utils.Dataset):
    """Images of one subset folder with their VIA polygon annotations."""

    def load_balloon(self, dataset_dir: Path, subset: str) -> None:
        self.add_class("balloon", 1, "balloon")
        folder = Path(dataset_dir) / subset
        annotations = json.loads((folder / "via_region_data.json").read_text()).values()
        for entry in (a for a in annotations if a["regions"]):
            regions = entry["regions"].values() if isinstance(entry["regions"], dict) else entry["regions"]
            path = folder / entry["filename"]
            height, width = skimage.io.imread(path).shape[:2]
            self.add_image("balloon", image_id=entry["filename"], path=str(path), width=width, height=height,
                           polygons=[r["shape_attributes"] for r in regions])

    def load_mask(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        info = self.image_info[image_id]
        if info["source"] != "balloon":
            return super().load_mask(image_id)
        masks = np.zeros((info["height"], info["width"], len(info["polygons"])), np.uint8)
        for i, polygon in enumerate(info["polygons"]):
            rows, cols = skimage.draw.polygon(polygon["all_points_y"], polygon["all_points_x"], masks.shape[:2])
            masks[rows, cols, i] = 1
        return masks.astype(bool), np.ones(masks.shape[-1], np.int32)

    def image_reference(self, image_id: int) -> str:
        info = self.image_info[image_id]
        return info["path"] if info["source"] == "balloon" else super().image_reference(image_id)


def color_splash(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Grey image with the colour kept where any instance mask is set (the sample's splash)."""
    grey = skimage.color.gray2rgb(skimage.color.rgb2gray(image)) * 255
    if masks.shape[-1] == 0:
        return grey.astype(np.uint8)
    return np.where(np.sum(masks, -1, keepdims=True) >= 1, image, grey).astype(np.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("balloon")
    rng = np.random.default_rng(7)
    write_via_subset(root / "dataset" / "train", 8, rng)
    write_via_subset(root / "dataset" / "val", 2, rng)
    datasets = {}
    for subset in ("train", "val"):
        datasets[subset] = BalloonDataset()
        datasets[subset].load_balloon(root / "dataset", subset)
        datasets[subset].prepare()
    config = BalloonConfig()
    model = modellib.MaskRCNN(mode="training", config=config, model_dir=str(root / "logs"))
    model.train(datasets["train"], datasets["val"], learning_rate=config.LEARNING_RATE, epochs=2, layers="heads")
    return root, datasets


def test_the_via_polygons_become_aligned_masks(trained):
    _, datasets = trained
    train = datasets["train"]
    assert train.num_images == 8 and train.class_names == ["BG", "balloon"]
    masks, class_ids = train.load_mask(0)
    image = train.load_image(0)
    assert masks.shape[:2] == image.shape[:2] == (64, 80) and masks.dtype == bool and class_ids.tolist() == [1] * masks.shape[-1]
    inside = image[masks[..., 0]]
    assert inside[:, 0].mean() > 180 and inside[:, 2].mean() < 90  # the red balloon, not the sky


def test_heads_training_checkpoints_and_splash(trained, monkeypatch):
    root, datasets = trained

    class InferenceConfig(BalloonConfig):
        GPU_COUNT = 1
        IMAGES_PER_GPU = 1

    model = modellib.MaskRCNN(mode="inference", config=InferenceConfig(), model_dir=str(root / "logs"))
    weights = model.find_last()
    assert weights.endswith("mask_rcnn_balloon_0002.h5")
    model.load_weights(weights, by_name=True)
    image = skimage.io.imread(datasets["val"].image_reference(0))
    (r,) = model.detect([image], verbose=1)
    assert r["masks"].shape[:2] == image.shape[:2] and len(r["scores"]) == r["masks"].shape[-1]
    assert all(score >= 0.9 for score in r["scores"])  # DETECTION_MIN_CONFIDENCE
    splash = color_splash(image, r["masks"])
    monkeypatch.chdir(root)
    skimage.io.imsave("splash.png", splash, check_contrast=False)
    saved = skimage.io.imread(root / "splash.png")
    assert saved.shape == image.shape and saved.dtype == np.uint8
    forced = color_splash(image, np.ones(image.shape[:2] + (1,), bool))  # a mask everywhere keeps the colours
    assert np.array_equal(forced, image)
