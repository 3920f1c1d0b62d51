"""mrcnn.dataset.Dataset: Matterport registration/prepare semantics, lazy loading, reference maps."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from helpers import exif_rotated_jpeg
from PIL import Image

from mrcnn import boxes as B
from mrcnn import imaging as I
from mrcnn.dataset import Dataset


def _toy() -> Dataset:
    ds = Dataset(class_map={"ignored": 1})
    ds.add_class("coco", 1, "person, human")
    ds.add_class("coco", 1, "duplicate is ignored")
    ds.add_class("coco", 3, "car")
    ds.add_class("isic", 1, "lesion")
    ds.add_image("coco", 42, "/nowhere/a.jpg", width=30, height=20)
    ds.add_image("isic", "ISIC_0000000", "/nowhere/b.jpg")
    ds.prepare()
    return ds


def test_construction_state():
    ds = Dataset()
    assert ds.image_info == [] and ds.source_class_ids == {}
    assert ds.class_info == [{"source": "", "id": 0, "name": "BG"}]
    with pytest.raises(AssertionError):
        ds.add_class("bad.source", 1, "x")


def test_prepare_maps():
    ds = _toy()
    assert ds.num_classes == 4 and ds.num_images == 2
    np.testing.assert_array_equal(ds.class_ids, [0, 1, 2, 3])
    assert ds.class_names == ["BG", "person", "car", "lesion"]
    np.testing.assert_array_equal(ds.image_ids, [0, 1])
    assert ds.class_from_source_map == {".0": 0, "coco.1": 1, "coco.3": 2, "isic.1": 3}
    assert ds.image_from_source_map == {"coco.42": 0, "isic.ISIC_0000000": 1}
    assert sorted(ds.sources) == ["", "coco", "isic"]
    assert ds.source_class_ids == {"": [0], "coco": [0, 1, 2], "isic": [0, 3]}
    assert ds.map_source_class_id("coco.3") == 2
    assert ds.get_source_class_id(3, "isic") == 1
    with pytest.raises(AssertionError):
        ds.get_source_class_id(3, "coco")
    assert ds.image_info[0] == {"id": 42, "source": "coco", "path": "/nowhere/a.jpg", "width": 30, "height": 20}
    assert ds.source_image_link(1) == "/nowhere/b.jpg"
    assert ds.image_reference(0) == ""


def test_lazy_and_default_load_mask(tmp_path, caplog):
    ds = _toy()  # paths do not exist: construction and prepare must not touch them
    with pytest.raises(I.ImageReadError):
        ds.load_image(0)
    with caplog.at_level(logging.WARNING):
        masks, ids = ds.load_mask(0)
    assert masks.shape == (0, 0, 0) and ids.shape == (0,) and ids.dtype == np.int32
    assert "load_mask" in caplog.text


def test_load_image_gray_to_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "g.png")
    ds = Dataset()
    ds.add_image("x", 0, str(tmp_path / "g.png"))
    ds.prepare()
    img = ds.load_image(0)
    assert img.shape == (3, 4, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 2], gray)


class _RefDataset(Dataset):
    """The reference's toy ISIC-style dataset: one image file, two lesion instances."""

    def __init__(self, image_path, masks):
        super().__init__()
        self._masks = masks
        self.add_class("isic", 1, "lesion")
        self.add_image("isic", "ref", image_path)

    def load_mask(self, image_id):
        return self._masks, np.ones(self._masks.shape[-1], np.int32)


def test_reference_dataset_and_load_chain(reference_dir, tmp_path):
    ref = np.load(reference_dir / "matterport_utils_reference.npz")
    ds = _RefDataset(str(reference_dir / "matterport_reference_input.png"), ref["gt_masks_original"])
    ds.prepare()
    assert ds.class_info == json.loads(str(ref["dataset_class_info_json"]))
    assert ds.source_class_ids == json.loads(str(ref["dataset_source_class_ids_json"]))
    # image -> resize_image/resize_mask -> bboxes -> mini masks -> meta, as load_image_gt does
    image = ds.load_image(0)
    masks, class_ids = ds.load_mask(0)
    image, window, scale, padding, crop = I.resize_image(image, 256, 256, 0, "square")
    masks = I.resize_mask(masks, scale, padding, crop)
    bbox = B.extract_bboxes(masks)
    active = np.zeros(ds.num_classes, np.int32)
    active[ds.source_class_ids["isic"]] = 1
    meta = I.compose_image_meta(0, (200, 300, 3), image.shape, window, scale, active)
    np.testing.assert_array_equal(image, ref["load_image_gt_image"])
    np.testing.assert_array_equal(class_ids, ref["load_image_gt_class_ids"])
    np.testing.assert_array_equal(bbox, ref["load_image_gt_bbox"])
    np.testing.assert_array_equal(I.minimize_mask(bbox, masks, (56, 56)), ref["load_image_gt_mini_mask"])
    np.testing.assert_array_equal(meta, ref["load_image_gt_meta"])


class _StoredPolygonDataset(Dataset):
    """Matterport's balloon sample in small: the mask is drawn from coordinates of the stored pixels."""

    def load_mask(self, image_id):
        info = self.image_info[image_id]
        mask = np.zeros((info["height"], info["width"], 1), bool)
        mask[:, : info["width"] // 2] = True  # the annotation tool saw the stored (unrotated) grid
        return mask, np.ones([1], np.int32)


def test_exif_orientation_is_not_applied_by_default_as_in_matterport(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "photo.jpg", (60, 100))
    ds = _StoredPolygonDataset()
    ds.add_class("balloon", 1, "balloon")
    ds.add_image("balloon", "photo.jpg", str(path), height=60, width=100)
    ds.prepare()
    assert Dataset.APPLY_EXIF_ORIENTATION is False
    image, (mask, _) = ds.load_image(0), ds.load_mask(0)
    assert image.shape == (60, 100, 3) and mask.shape[:2] == image.shape[:2]   # pixels as stored
    assert image[mask[..., 0]].mean() > 240 and image[~mask[..., 0]].mean() < 15  # the polygon lines up

    class Upright(_StoredPolygonDataset):
        APPLY_EXIF_ORIENTATION = True

    upright = Upright()
    upright.image_info, upright.class_info = ds.image_info, ds.class_info
    upright.prepare()
    turned = upright.load_image(0)
    assert turned.shape == (100, 60, 3) and turned[:45].mean() > 240 and turned[55:].mean() < 15
    ds.APPLY_EXIF_ORIENTATION = True  # an instance may choose too
    assert ds.load_image(0).shape == (100, 60, 3)
