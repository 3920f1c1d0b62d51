"""Matterport's own sample code, unchanged, on our mrcnn (issue 18, point 6).

Runs only when ``MATTERPORT_REPO`` names a copy of Matterport's repository (github.com/matterport/
Mask_RCNN, e.g. master 3deaec5); skipped otherwise (the repository cannot be fetched at test time
here). Each sample file is imported as a module, with our ``mrcnn`` already imported, so its own
``sys.path.append(ROOT_DIR)`` cannot pick up Matterport's package. Only configuration values are
shrunk (image size, a light backbone, steps), by setting class attributes of the sample's Config
subclass: the sample's functions run as written.

* ``samples/balloon/balloon.py``: ``BalloonDataset.load_balloon`` on generated VIA data, the
  sample's ``train(model)`` (its fixed ``epochs=30``: the model resumes a checkpoint of epoch 29,
  so one epoch runs), then ``detect_and_color_splash`` writes its ``splash_*.png``.
* ``samples/shapes/shapes.py``: ``ShapesConfig`` / ``ShapesDataset`` through the tutorial's
  heads-then-all training and ``detect``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(os.environ.get("MATTERPORT_REPO", "")) if os.environ.get("MATTERPORT_REPO") else None
pytestmark = pytest.mark.skipif(REPO is None or not (REPO / "samples").is_dir(),
                                reason="set MATTERPORT_REPO to a copy of matterport/Mask_RCNN to run its samples")

from helpers import small_sample_values  # noqa: E402

import mrcnn.model as modellib  # noqa: E402  (ours, imported before any sample)

#: Values set on a sample's Config subclass so it trains in seconds on a CPU.
SMALL = small_sample_values() | {"IMAGES_PER_GPU": 2}


def load_sample(relative: str, monkeypatch: pytest.MonkeyPatch, cwd: Path) -> ModuleType:
    """Import ``REPO/relative`` as a module (from ``cwd``: samples resolve ROOT_DIR from it)."""
    monkeypatch.chdir(cwd)
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import mrcnn

    assert Path(mrcnn.__file__).resolve().parents[1] != REPO.resolve(), "imported Matterport's mrcnn, not ours"
    return module


def shrink(config_class: type, monkeypatch: pytest.MonkeyPatch, **keep: object) -> None:
    for key, value in (SMALL | keep).items():
        monkeypatch.setattr(config_class, key, value)


def test_balloon_sample_trains_and_splashes(tmp_path, monkeypatch):
    from helpers import write_via_subset

    rng = np.random.default_rng(11)
    write_via_subset(tmp_path / "balloon" / "train", 6, rng)
    write_via_subset(tmp_path / "balloon" / "val", 2, rng)
    balloon = load_sample("samples/balloon/balloon.py", monkeypatch, tmp_path)
    shrink(balloon.BalloonConfig, monkeypatch)
    image = tmp_path / "balloon" / "val" / "balloon_00.jpg"
    balloon.args = argparse.Namespace(dataset=str(tmp_path / "balloon"), image=str(image), video=None)
    balloon.config = balloon.BalloonConfig()
    logs = tmp_path / "logs"
    model = modellib.MaskRCNN(mode="training", config=balloon.config, model_dir=str(logs))
    start = logs / "balloon20260101T0000" / "mask_rcnn_balloon_0029.h5"  # train() runs to epoch 30
    start.parent.mkdir(parents=True)
    model.save_weights(str(start))
    model.load_weights(model.find_last(), by_name=True)
    balloon.train(model)
    assert (start.parent / "mask_rcnn_balloon_0030.h5").is_file()

    class InferenceConfig(balloon.BalloonConfig):
        GPU_COUNT = 1
        IMAGES_PER_GPU = 1

    model = modellib.MaskRCNN(mode="inference", config=InferenceConfig(), model_dir=str(logs))
    model.load_weights(model.find_last(), by_name=True)
    balloon.detect_and_color_splash(model, image_path=str(image))
    (splash,) = tmp_path.glob("splash_*.png")
    import skimage.io

    assert skimage.io.imread(splash).shape == (64, 80, 3)


def test_shapes_sample_trains_heads_then_all_and_detects(tmp_path, monkeypatch):
    shapes = load_sample("samples/shapes/shapes.py", monkeypatch, tmp_path)
    # the sample draws shapes of 20 px and more: its own 128 px images and anchors stay
    shrink(shapes.ShapesConfig, monkeypatch, IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128,
           RPN_ANCHOR_SCALES=(8, 16, 32, 64, 128))
    datasets = []
    for count in (8, 2):
        dataset = shapes.ShapesDataset()
        dataset.load_shapes(count, 128, 128)
        dataset.prepare()
        datasets.append(dataset)
    config = shapes.ShapesConfig()
    model = modellib.MaskRCNN(mode="training", config=config, model_dir=str(tmp_path / "logs"))
    model.train(datasets[0], datasets[1], learning_rate=config.LEARNING_RATE, epochs=1, layers="heads")
    model.train(datasets[0], datasets[1], learning_rate=config.LEARNING_RATE / 10, epochs=2, layers="all")

    class InferenceConfig(shapes.ShapesConfig):
        GPU_COUNT = 1
        IMAGES_PER_GPU = 1

    model = modellib.MaskRCNN(mode="inference", config=InferenceConfig(), model_dir=str(tmp_path / "logs"))
    model.load_weights(model.find_last(), by_name=True)
    image = datasets[1].load_image(0)
    (r,) = model.detect([image], verbose=1)
    assert r["masks"].shape[:2] == (128, 128) and set(r["class_ids"].tolist()) <= {1, 2, 3}
