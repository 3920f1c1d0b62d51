"""mrcnn.preprocess_cache: hits and misses, rebuilds after changes, exact equality, corrupt entries."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from factories import make_config
from helpers import exif_rotated_jpeg
from PIL import Image

import lesions
from lesionkit import dataset_scan
from mrcnn.preprocess_cache import PreprocessCache, ResizedSample, resize_sample


def small_config(**overrides):
    """Matterport's defaults resizing to 64..128 px "square", one image per batch."""
    return make_config("matterport", **(dict(NAME="t", IMAGES_PER_GPU=1, IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=128)
                                        | overrides))


def write_pair(root: Path, image_id: str, size: tuple[int, int] = (150, 100), seed: int = 0,
               lesion: bool = True) -> None:
    """A noisy JPEG (width, height = size) and its mask with an off-centre ellipse."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{image_id}.jpg")
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - h * 0.4) ** 2 / (h * 0.3) ** 2 + (xx - w * 0.6) ** 2 / (w * 0.25) ** 2 <= 1) & lesion
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{image_id}_segmentation.png")


def make_dataset(root: Path) -> lesions.LesionDataset:
    dataset = lesions.LesionDataset()
    dataset.add_pairs(dataset_scan.scan_dataset(root).pairs)
    dataset.prepare()
    return dataset


def assert_same(a: ResizedSample, b: ResizedSample) -> None:
    """Bit-identical arrays (values, dtype, shape) and equal metadata."""
    for name in ("image", "mask", "class_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y)
    assert tuple(a.original_shape) == tuple(b.original_shape)
    assert tuple(a.window) == tuple(b.window) and a.scale == b.scale and type(a.scale) is type(b.scale)
    assert [tuple(p) for p in a.padding] == [tuple(p) for p in b.padding]


def entries(cache_root: Path) -> list[Path]:
    return sorted(cache_root.rglob("*.npz"))


@pytest.fixture
def data(tmp_path):
    write_pair(tmp_path / "ds", "a", (150, 100), seed=1)
    write_pair(tmp_path / "ds", "b", (90, 120), seed=2)
    write_pair(tmp_path / "ds", "c", (80, 60), seed=3, lesion=False)
    return make_dataset(tmp_path / "ds"), PreprocessCache(tmp_path / "ds" / "cache")


@pytest.mark.parametrize("mode, min_dim, max_dim", [("square", 64, 128), ("pad64", 64, 128), ("none", 64, 128),
                                                    ("square", 128, 256)])
def test_cached_result_equals_the_uncached_one_exactly(data, mode, min_dim, max_dim):
    dataset, cache = data
    config = small_config(IMAGE_RESIZE_MODE=mode, IMAGE_MIN_DIM=min_dim, IMAGE_MAX_DIM=max_dim)
    for image_id in dataset.image_ids:
        uncached = resize_sample(dataset, config, image_id)
        assert_same(cache.load(dataset, config, image_id), uncached)  # built
        assert_same(cache.load(dataset, config, image_id), uncached)  # read back
    assert cache.stats["missing"] == 3 and cache.stats["hit"] == 3


def test_second_load_is_a_hit_and_does_not_rewrite(data):
    dataset, cache = data
    config = small_config()
    cache.load(dataset, config, 0)
    (entry,) = entries(cache.root)
    assert entry.parent.name == "square_min64_max128_scale0" and entry.name.startswith("a-")
    before = entry.stat().st_mtime_ns
    for _ in range(3):
        cache.load(dataset, config, 0)
    assert cache.stats == {"missing": 1, "hit": 3}
    assert entry.stat().st_mtime_ns == before


def test_a_resize_setting_change_builds_new_entries_and_the_old_ones_stay_valid(data):
    dataset, cache = data
    small, large = small_config(), small_config(IMAGE_MAX_DIM=256)
    cache.load(dataset, small, 0)
    assert_same(cache.load(dataset, large, 0), resize_sample(dataset, large, 0))
    assert cache.stats["missing"] == 2 and len(entries(cache.root)) == 2
    min_scale = small_config(IMAGE_MIN_SCALE=2)
    assert_same(cache.load(dataset, min_scale, 0), resize_sample(dataset, min_scale, 0))
    assert cache.stats["missing"] == 3
    cache.load(dataset, small, 0)  # switching back reuses the first entry
    assert cache.stats["hit"] == 1


def test_a_changed_source_image_or_mask_is_rebuilt(data, tmp_path):
    dataset, cache = data
    config = small_config()
    old = cache.load(dataset, config, 0)
    write_pair(tmp_path / "ds", "a", (150, 100), seed=99)  # new pixels, same path and size
    image_path = dataset.image_info[0]["path"]
    os.utime(image_path, ns=(os.stat(image_path).st_atime_ns, os.stat(image_path).st_mtime_ns + 10**9))
    new = cache.load(dataset, config, 0)
    assert cache.stats["stale"] == 1
    assert_same(new, resize_sample(dataset, config, 0))
    assert not np.array_equal(new.image, old.image)
    mask_path = Path(dataset.image_info[0]["mask_path"])
    Image.fromarray(np.zeros((100, 150), np.uint8)).save(mask_path)  # the lesion is gone
    os.utime(mask_path, ns=(0, os.stat(mask_path).st_mtime_ns + 2 * 10**9))
    emptied = cache.load(dataset, config, 0)
    assert cache.stats["stale"] == 2 and emptied.mask.shape == (128, 128, 0)
    assert_same(emptied, resize_sample(dataset, config, 0))
    cache.load(dataset, config, 0)
    assert cache.stats["hit"] == 1 and len(entries(cache.root)) == 1  # replaced in place


def test_changed_loader_code_is_rebuilt(data):
    dataset, cache = data

    class OtherLoader(lesions.LesionDataset):
        def load_image(self, image_id):
            return 255 - super().load_image(image_id)

    config = small_config()
    cache.load(dataset, config, 0)
    other = OtherLoader()
    other.image_info, other.class_info = dataset.image_info, dataset.class_info
    other.prepare()
    assert_same(cache.load(other, config, 0), resize_sample(other, config, 0))
    assert cache.stats["stale"] == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip"])
def test_a_corrupt_entry_is_rebuilt(data, damage):
    dataset, cache = data
    config = small_config()
    cache.load(dataset, config, 1)
    (entry,) = entries(cache.root)
    raw = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"not a zip file at all")
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # one flipped byte inside the image array: the zip CRC check fails
        pos = len(raw) // 2
        entry.write_bytes(raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1:])
    assert_same(cache.load(dataset, config, 1), resize_sample(dataset, config, 1))
    assert cache.stats["corrupt"] == 1
    cache.load(dataset, config, 1)
    assert cache.stats["hit"] == 1


def test_an_unwritable_cache_folder_costs_only_the_speed_up(data, tmp_path):
    dataset, _ = data
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cache = PreprocessCache(blocker / "cache")  # mkdir fails whoever runs the test
    config = small_config()
    for _ in range(2):
        assert_same(cache.load(dataset, config, 0), resize_sample(dataset, config, 0))
    assert cache.stats["write_failed"] == 2 and cache.stats["hit"] == 0
    assert "2 not written" in cache.summary()


def test_crop_mode_is_not_cached(data):
    dataset, cache = data
    config = small_config(IMAGE_RESIZE_MODE="crop")
    sample = cache.load(dataset, config, 0)
    assert sample.image.shape == (64, 64, 3) and sample.crop is not None
    assert cache.stats == {"uncached": 1} and not entries(cache.root)


def test_parallel_workers_build_and_read_safely(data):
    dataset, cache = data
    config = small_config()
    expected = [resize_sample(dataset, config, i) for i in dataset.image_ids]
    failures: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for k in range(9):
                i = (k + offset) % 3
                assert_same(cache.load(dataset, config, i), expected[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert len(entries(cache.root)) == 3 and not list(cache.root.rglob(".tmp-*"))
    assert sum(cache.stats.values()) == 54 and cache.stats["corrupt"] == 0


def test_load_image_gt_with_the_cache_equals_without(data):
    from mrcnn.input_pipeline import default_augmentation, load_image_gt

    dataset, cache = data
    config = small_config()
    augmentation = default_augmentation(seed=3)
    for image_id in dataset.image_ids:
        plain = load_image_gt(dataset, config, image_id, augmentation=augmentation, use_mini_mask=True, seed=11)
        dataset.preprocess_cache = cache
        for _ in range(2):  # built, then read back; augmentation runs after the cached resize
            cached = load_image_gt(dataset, config, image_id, augmentation=augmentation, use_mini_mask=True, seed=11)
            for x, y in zip(plain, cached, strict=True):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)
        del dataset.preprocess_cache
    assert cache.stats == {"missing": 3, "hit": 3}


def test_the_cli_uses_dataset_cache_by_default_and_no_cache_turns_it_off(data, tmp_path, capsys):
    root = tmp_path / "ds"
    args = lesions.build_parser().parse_args(["--mode", "train", "--dataset", str(root)])
    assert lesions.preprocess_cache_dir(args.no_cache, args.cache_dir, root) == root / "cache"
    report = dataset_scan.scan_dataset(root)
    train, val = lesions.make_datasets(report, ["a", "b"], ["c"], cache_dir=root / "cache")
    assert train.preprocess_cache is val.preprocess_cache
    assert not hasattr(lesions.make_datasets(report, ["a"])[0], "preprocess_cache")
    assert lesions.preprocess_cache_dir(True, None, root) is None
    assert lesions.preprocess_cache_dir(False, str(tmp_path / "elsewhere"), root) == tmp_path / "elsewhere"
    assert lesions.main(["--mode", "predict", "--image", "x.jpg", "--no-cache"]) == 2
    assert "--no-cache does not apply to --mode predict" in capsys.readouterr().err


def test_the_tf_data_pipeline_gives_the_same_batches_with_the_cache(data):
    from mrcnn.input_pipeline import make_dataset as make_tf_dataset

    dataset, cache = data
    config = small_config(IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128)

    def batches():
        ds = make_tf_dataset(dataset, config, shuffle=True, seed=5, batch_size=1, parallel=4)
        return [{k: v.numpy() for k, v in b.items()} for b in ds.take(6)]

    plain = batches()
    dataset.preprocess_cache = cache
    for _ in range(2):  # parallel workers build the entries, then read them
        for x, y in zip(plain, batches(), strict=True):
            for name in x:
                np.testing.assert_array_equal(x[name], y[name])
    # two workers may build the same entry at once: both write atomically, one file remains
    assert cache.stats["missing"] >= 3 and cache.stats["corrupt"] == 0 and cache.stats["hit"] >= 6
    assert len(entries(cache.root)) == 3 and not list(cache.root.rglob(".tmp-*"))


def test_exif_setting_is_part_of_the_key_and_keeps_both_readings_apart(tmp_path):
    """One EXIF-rotated JPEG: LesionDataset reads it upright (its mask is drawn on the displayed
    image), a Matterport-style Dataset as stored (its mask drawn on the stored pixels); both align
    and the cache keeps one entry for each, with no rebuilding back and forth."""
    from mrcnn.dataset import Dataset

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    exif_rotated_jpeg(root / "images" / "x.jpg", (60, 100))     # displayed: 100 high, white top half
    upright_mask = np.zeros((100, 60), np.uint8)
    upright_mask[:50] = 255
    Image.fromarray(upright_mask).save(root / "masks" / "x_segmentation.png")
    lesion = make_dataset(root)

    class StoredPixels(Dataset):
        def load_mask(self, image_id):
            mask = np.zeros((60, 100, 1), bool)
            mask[:, :50] = True
            return mask, np.ones([1], np.int32)

    stored = StoredPixels()
    stored.add_class("lesion", 1, "lesion")
    stored.add_image("lesion", "x", str(root / "images" / "x.jpg"))    # same source, id and file
    stored.prepare()
    assert lesion.load_image(0).shape == (100, 60, 3) and stored.load_image(0).shape == (60, 100, 3)

    cache, config = PreprocessCache(root / "cache"), small_config()
    for _ in range(2):
        for dataset, shape in ((lesion, (100, 60, 3)), (stored, (60, 100, 3))):
            sample = cache.load(dataset, config, 0)
            assert tuple(sample.original_shape) == shape
            assert_same(sample, resize_sample(dataset, config, 0))
            inside = sample.image[sample.mask[..., 0]]
            assert inside.mean() > 200                              # image and mask line up
    assert cache.stats["missing"] == 2 and cache.stats["hit"] == 2 and cache.stats["stale"] == 0
    assert len(entries(cache.root)) == 2
    assert cache.entry_path(lesion, config, 0) != cache.entry_path(stored, config, 0)
