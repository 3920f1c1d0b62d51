"""lesions.py as a module: LesionDataset on the Matterport Dataset API, config helpers."""

from __future__ import annotations

import numpy as np
from PIL import Image

import lesions
from lesionkit import dataset_scan


def _pair(root, image_id, lesion=True):
    (root / "images").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    Image.new("RGB", (40, 30), 120).save(root / "images" / f"{image_id}.jpg")
    mask = np.zeros((30, 40), np.uint8)
    if lesion:
        mask[5:15, 10:30] = 255
    Image.fromarray(mask).save(root / "masks" / f"{image_id}_segmentation.png")


def test_lesion_dataset_follows_the_matterport_api(tmp_path):
    from mrcnn import utils

    _pair(tmp_path, "a")
    _pair(tmp_path, "b", lesion=False)
    dataset = lesions.LesionDataset()
    dataset.load_lesions(tmp_path, "all", lesions.LesionConfig())
    dataset.prepare()
    assert isinstance(dataset, utils.Dataset)
    assert dataset.class_names == ["BG", "lesion"] and dataset.num_images == 2
    masks, class_ids = dataset.load_mask(0)
    assert masks.shape == (30, 40, 1) and masks.dtype == bool and masks.sum() == 200
    assert class_ids.tolist() == [1]
    masks, class_ids = dataset.load_mask(1)  # empty mask: an image without lesion
    assert masks.shape == (30, 40, 0) and class_ids.shape == (0,)
    assert dataset.load_image(0).shape == (30, 40, 3)
    assert dataset.image_reference(0).endswith("a.jpg")


def test_load_lesions_subsets_are_the_split(tmp_path):
    for i in range(10):
        _pair(tmp_path, f"id{i}")
    config = lesions.LesionConfig()
    parts = {}
    for subset in ("train", "val"):
        dataset = lesions.LesionDataset()
        dataset.load_lesions(tmp_path, subset, config)
        parts[subset] = {info["id"] for info in dataset.image_info}
    assert len(parts["val"]) == 2 and len(parts["train"]) == 8 and not parts["train"] & parts["val"]


def test_saved_run_config_is_the_base_for_predict(tmp_path):
    config = lesions.LesionConfig()
    config.set("BACKBONE", "resnet50")
    config.set("IMAGES_PER_GPU", 4)
    config.set("STEPS_PER_EPOCH", 7)
    target = lesions.LesionConfig()
    lesions.apply_saved_config(target, config.to_dict() | {"OLD_KEY": 1})
    assert target.BACKBONE == "resnet50" and target.STEPS_PER_EPOCH == 7
    assert target.IMAGES_PER_GPU == 1  # batch size is not taken over for inference


def test_demo_data_is_cached_and_regenerated(tmp_path):
    root = tmp_path / "demo"
    dataset_scan.ensure_demo_data(root, 3, 1, (64, 64))
    first = (root / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg").read_bytes()
    stamp = (root / "demo.json").stat().st_mtime_ns
    dataset_scan.ensure_demo_data(root, 3, 1, (64, 64))
    assert (root / "demo.json").stat().st_mtime_ns == stamp  # reused
    dataset_scan.ensure_demo_data(root, 2, 1, (64, 64))
    assert len(list((root / "ISIC2018_Task1-2_Training_Input").iterdir())) == 2  # regenerated
    assert (root / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg").read_bytes() == first
    assert not list(tmp_path.glob("demo.tmp-*"))
