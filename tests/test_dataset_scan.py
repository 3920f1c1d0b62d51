"""lesionkit.dataset_scan: layouts, pairing, problem reports and the deterministic split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionkit import dataset_scan as ld


def _image(path: Path, size=(40, 30), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)


def _mask(path: Path, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[5:20, 5:25] = 255
    Image.fromarray(arr).save(path)


def make_isic(root: Path, ids=("ISIC_0000001", "ISIC_0000002", "ISIC_0000003")) -> Path:
    for i in ids:
        _image(root / "ISIC2018_Task1-2_Training_Input" / f"{i}.jpg")
        _mask(root / "ISIC2018_Task1_Training_GroundTruth" / f"{i}_segmentation.png")
    return root


def test_isic_layout_pairs_every_image(tmp_path):
    report = ld.scan_dataset(make_isic(tmp_path))
    assert report.layout == "isic2018"
    assert [p.image_id for p in report.pairs] == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
    assert report.problem_lines() == []


def test_plain_layout_with_metadata_split(tmp_path):
    for i in ("a", "b", "c"):
        _image(tmp_path / "images" / f"{i}.jpg")
        _mask(tmp_path / "masks" / f"{i}_segmentation.png")
    (tmp_path / "metadata.csv").write_text("image_id,split\na,train\nb,val\nc,train\n")
    report = ld.scan_dataset(tmp_path)
    assert report.layout == "plain"
    train, val = ld.split_ids([p.image_id for p in report.pairs], 0.5, 1, report.splits)
    assert (train, val) == (["a", "c"], ["b"])


def test_problems_are_counted_and_named(tmp_path):
    root = make_isic(tmp_path)
    images, masks = root / "ISIC2018_Task1-2_Training_Input", root / "ISIC2018_Task1_Training_GroundTruth"
    _image(images / "lonely.jpg")                         # no mask
    _mask(masks / "orphan_segmentation.png")              # no image
    (images / "broken.jpg").write_bytes(b"not a jpeg")    # unreadable
    _mask(masks / "broken_segmentation.png")
    (images / "empty.jpg").write_bytes(b"")               # zero bytes
    _mask(masks / "empty_segmentation.png")
    _image(images / "big.jpg", size=(80, 60))             # size mismatch
    _mask(masks / "big_segmentation.png")
    _image(images / "ISIC_0000001.png")                   # duplicate id
    (images / "notes.txt").write_text("hello")            # not an image
    report = ld.scan_dataset(root)
    assert len(report.pairs) == 3
    assert report.images_without_mask == ["lonely.jpg"]
    assert report.masks_without_image == ["orphan"]
    assert sorted(report.unreadable) == ["broken.jpg", "empty.jpg"]
    assert report.size_mismatch[0].startswith("big ")
    assert report.duplicate_ids == ["ISIC_0000001.png"]
    assert report.not_images == ["notes.txt"]
    lines = report.problem_lines()
    assert len(lines) == 6 and all("\n" not in line for line in lines)
    assert json.dumps(report.to_dict())


@pytest.mark.parametrize("setup, expected", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "is empty"),
    (lambda p: (p / "stuff").mkdir(parents=True), "ISIC2018_Task1-2_Training_Input/"),
    (lambda p: (p / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True), "ISIC2018_Task1_Training_GroundTruth/"),
])
def test_layout_errors_name_the_expected_folders(tmp_path, setup, expected):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(ld.DatasetLayoutError, match=expected.replace("/", "/")) as info:
        ld.scan_dataset(root)
    assert "\n" not in str(info.value)


def test_no_usable_pair_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _image(tmp_path / "images" / "x.jpg")
    with pytest.raises(ld.DatasetLayoutError, match="no usable image/mask pair.*without a mask"):
        ld.scan_dataset(tmp_path)


def test_split_is_deterministic_disjoint_and_complete():
    ids = [f"id{i:03d}" for i in range(50)]
    a = ld.split_ids(ids, 0.2, 3)
    assert a == ld.split_ids(list(reversed(ids)), 0.2, 3)
    assert a != ld.split_ids(ids, 0.2, 4)
    train, val = a
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == ids


def test_split_keeps_one_image_on_each_side():
    assert ld.split_ids(["a", "b"], 0.01, 0)[1] != []
    assert ld.split_ids(["a", "b"], 0.99, 0)[0] != []
    assert ld.split_ids(["a", "b", "c"], 0.0, 0) == (["a", "b", "c"], [])


def test_write_split_is_json(tmp_path):
    path = ld.write_split(tmp_path / "run" / "split.json", ["a"], ["b"], {"dataset": "x"})
    data = json.loads(path.read_text())
    assert data["train"] == ["a"] and data["val"] == ["b"] and data["dataset"] == "x"
    assert not list(path.parent.glob(".tmp-*"))


def test_exif_rotation_swaps_the_size(tmp_path):
    path = tmp_path / "r.jpg"
    img = Image.new("RGB", (40, 30), 100)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif)
    assert ld.image_size(path) == (40, 30)


def test_real_samples_scan(shared_data_dir):
    report = ld.scan_dataset(shared_data_dir / "real_samples")
    assert len(report.pairs) == 6 and report.layout == "plain"
