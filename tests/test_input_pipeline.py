"""load_image_gt (vs Matterport), albumentations augmentation, and the tf.data pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from factories import make_config
from helpers import ArrayDataset

from mrcnn.input_pipeline import (
    augment,
    check_augmentation,
    data_generator,
    default_augmentation,
    load_image_gt,
    make_dataset,
    sample_specs,
)


def reference_image_and_masks() -> tuple[np.ndarray, np.ndarray]:
    """The reference synthetic image (200x300) with the ellipse and disk instances."""
    yy, xx = np.mgrid[0:200, 0:300]
    image = np.stack([(xx * 255) // 299, (yy * 255) // 199, (7 * xx + 13 * yy) % 256], axis=-1)
    ellipse = (yy - 100) ** 2 * 70**2 + (xx - 160) ** 2 * 45**2 <= 45**2 * 70**2
    image[ellipse] = (np.array([90, 50, 40])[None, :] + ((xx + yy) % 16)[ellipse][:, None])
    disk = (yy - 40) ** 2 + (xx - 50) ** 2 <= 20**2
    return image.astype(np.uint8), np.stack([ellipse, disk], axis=-1)


def square_config(**overrides):
    """Matterport's defaults at 256 px "square", one image per batch, at most 3 instances."""
    return make_config("matterport", **(dict(NAME="t", IMAGES_PER_GPU=1, IMAGE_MIN_DIM=256, IMAGE_MAX_DIM=256,
                                             MAX_GT_INSTANCES=3, SEED=7) | overrides))


def test_load_image_gt_matches_matterport(reference_dir):
    ref = np.load(reference_dir / "matterport_utils_reference.npz")
    image, masks = reference_image_and_masks()
    np.testing.assert_array_equal(masks, ref["gt_masks_original"])
    dataset = ArrayDataset([(image, masks)])
    got_image, meta, class_ids, bbox, mini = load_image_gt(dataset, square_config(), 0, use_mini_mask=True)
    assert np.abs(got_image.astype(int) - ref["load_image_gt_image"]).max() <= 1
    np.testing.assert_allclose(meta, ref["load_image_gt_meta"], rtol=1e-6)
    np.testing.assert_array_equal(class_ids, ref["load_image_gt_class_ids"])
    np.testing.assert_array_equal(bbox, ref["load_image_gt_bbox"])
    assert mini.shape == (56, 56, 2) and mini.dtype == bool
    assert (mini != ref["load_image_gt_mini_mask"]).mean() < 0.002


def test_load_image_gt_full_masks_and_active_classes():
    image, masks = reference_image_and_masks()
    _, meta, _, bbox, full = load_image_gt(ArrayDataset([(image, masks)]), square_config(), 0)
    assert full.shape == (256, 256, 2)
    assert meta[-2:].tolist() == [1, 1]
    y1, x1, y2, x2 = bbox[1]
    assert full[y1:y2, x1:x2, 1].any() and not full[:y1, :, 1].any() and not full[:, x2:, 1].any()


def test_augmentation_moves_image_and_masks_together():
    import albumentations as A
    image = np.zeros((64, 64, 3), np.uint8)
    image[5:15, 40:60] = 255
    masks = np.zeros((64, 64, 1), bool)
    masks[5:15, 40:60] = True
    out_image, out_masks = augment(A.Compose([A.HorizontalFlip(p=1), A.RandomRotate90(p=1)]), image, masks, seed=3)
    assert out_masks.dtype == bool and out_masks.shape == masks.shape
    np.testing.assert_array_equal(out_image[..., 0] > 0, out_masks[..., 0])
    assert not np.array_equal(out_masks, masks)


def _blank_large_masks(mask, **kwargs):
    return mask * 0 if mask.sum() > 2000 else mask


def test_augmentation_is_reproducible_with_seed_and_drops_emptied_instances():
    import albumentations as A
    image, masks = reference_image_and_masks()
    dataset = ArrayDataset([(image, masks)])
    aug = default_augmentation()
    a = load_image_gt(dataset, square_config(), 0, augmentation=aug, seed=11)
    b = load_image_gt(dataset, square_config(), 0, augmentation=aug, seed=11)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # a transform that blanks the big (ellipse) instance: it must be dropped, the disk kept
    crop_away = A.Compose([A.Lambda(mask=_blank_large_masks)])
    _, _, class_ids, bbox, mask = load_image_gt(dataset, square_config(), 0, augmentation=crop_away)
    assert len(class_ids) == 1 and mask.shape[-1] == 1 and bbox.shape == (1, 4)


def test_other_augmentation_objects_get_one_line_error():
    class FakeImgaug:  # looks like imgaug (to_deterministic) but is not an imgaug augmenter
        def to_deterministic(self):
            return self
    for wrong in (FakeImgaug(), lambda image: image, "fliplr", 0.5):
        with pytest.raises(TypeError, match="albumentations transform .* or an imgaug augmenter, got ") as info:
            check_augmentation(wrong)
        assert "\n" not in str(info.value) and type(wrong).__qualname__ in str(info.value)
    with pytest.raises(TypeError, match="imgaug augmenter"):
        augment(FakeImgaug(), np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 0), bool))


# ---- imgaug (a NumPy-2 fork, e.g. sindre-imgaug; requirements-matterport.txt) -------------------

@pytest.fixture(scope="module")
def iaa():
    """imgaug.augmenters, or a skip: not installed, or imgaug 0.4 failing to import on NumPy 2."""
    try:
        import imgaug.augmenters as augmenters
    except Exception as exc:  # noqa: BLE001 - imgaug 0.4 raises AttributeError (np.sctypes) on NumPy 2
        pytest.skip(f"no working imgaug ({type(exc).__name__}: {exc})")
    return augmenters


def test_imgaug_moves_masks_with_the_image_and_only_geometrically(iaa):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 50, (48, 64, 3), dtype=np.uint8)
    masks = np.zeros((48, 64, 20), bool)      # 20 instances: more than one chunk of IMGAUG_MASK_CHUNK
    for i in range(20):
        masks[i:i + 9, 2 * i:2 * i + 12, i] = True
    image[masks[:, :, 3]] = 255
    flips = iaa.Sequential([iaa.Fliplr(1.0), iaa.Flipud(1.0), iaa.Multiply(1.2), iaa.GaussianBlur(sigma=0.5)])
    check_augmentation(flips)
    out_image, out_masks = augment(flips, image, masks, seed=5)
    assert out_image.shape == image.shape and out_masks.dtype == bool and out_masks.shape == masks.shape
    np.testing.assert_array_equal(out_masks, masks[::-1, ::-1])        # geometry only: blur/multiply skip masks
    assert not np.array_equal(out_image, image[::-1, ::-1])           # ... but changed the image
    bright = out_image[..., 0] > 200
    assert (bright & out_masks[..., 3]).sum() >= 0.8 * out_masks[..., 3].sum()


def test_imgaug_matterport_pipeline_trains_reproducibly(iaa):
    """Matterport's nucleus augmentation through load_image_gt and the tf.data pipeline."""
    image, masks = reference_image_and_masks()
    dataset = ArrayDataset([(image, masks)])
    nucleus = iaa.SomeOf((0, 2), [
        iaa.Fliplr(0.5), iaa.Flipud(0.5),
        iaa.OneOf([iaa.Affine(rotate=90), iaa.Affine(rotate=180), iaa.Affine(rotate=270)]),
        iaa.Multiply((0.8, 1.5)), iaa.GaussianBlur(sigma=(0.0, 5.0))])
    config = square_config()
    first = [load_image_gt(dataset, config, 0, augmentation=nucleus, seed=s) for s in range(6)]
    again = [load_image_gt(dataset, config, 0, augmentation=nucleus, seed=s) for s in range(6)]
    for a, b in zip(first, again, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert len({out[0].tobytes() for out in first}) > 1                 # the seeds draw different results
    for out_image, _, class_ids, _, out_masks in first:                 # the ellipse's colour stays on its mask
        ellipse = out_masks[:, :, 0]
        assert len(class_ids) == 2 and (out_image[ellipse][:, 2] < 150).mean() > 0.9
    batches = [next(make_dataset(dataset, config, augmentation=nucleus).as_numpy_iterator()) for _ in range(2)]
    for name in batches[0]:
        np.testing.assert_array_equal(batches[0][name], batches[1][name])


def test_imgaug_pipeline_that_fails_on_numpy2_is_one_line_before_training(iaa):
    crop = iaa.Sequential([iaa.Fliplr(0.5), iaa.Crop(px=(1, 4))])
    try:
        check_augmentation(crop)
    except ValueError as exc:   # the forks' Crop raises TypeError on NumPy 2.4
        assert "\n" not in str(exc) and "imgaug pipeline fails" in str(exc) and "albumentations" in str(exc)
    else:                       # a fork that fixed Crop: it must then work like any other augmenter
        image, masks = reference_image_and_masks()
        assert augment(crop, image, masks, seed=1)[1].shape == masks.shape
    with pytest.raises(ValueError, match="changed the image shape"):
        check_augmentation(iaa.Resize(0.5))


def test_make_dataset_shapes_padding_and_determinism():
    rng = np.random.default_rng(0)
    pairs = []
    for n in (1, 0, 4):     # one, none, more than MAX_GT_INSTANCES
        image = rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)
        masks = np.zeros((100, 120, n), bool)
        for i in range(n):
            masks[10 + 10 * i:30 + 10 * i, 10 + 20 * i:40 + 20 * i, i] = True
        pairs.append((image, masks))
    dataset = ArrayDataset(pairs)
    config = square_config(IMAGES_PER_GPU=2)
    specs = sample_specs(config)
    batches = list(make_dataset(dataset, config, augmentation=default_augmentation()).take(3).as_numpy_iterator())
    again = list(make_dataset(dataset, config, augmentation=default_augmentation()).take(3).as_numpy_iterator())
    for batch, other in zip(batches, again, strict=True):
        for name, spec in specs.items():
            assert batch[name].shape == (2, *spec.shape), name
            assert batch[name].dtype == spec.dtype.as_numpy_dtype, name
            np.testing.assert_array_equal(batch[name], other[name])
    counts = sorted(int((b > 0).sum()) for batch in batches for b in batch["input_gt_class_ids"])
    assert counts[0] == 0 and counts[-1] == 3          # empty image kept; 4 instances capped at 3
    # each pass over the 3 images shows every image once
    first_pass = [int(m[0]) for batch in batches for m in batch["input_image_meta"]][:3]
    assert sorted(first_pass) == [0, 1, 2]
    inputs, outputs = next(data_generator(dataset, config, batch_size=2))
    assert len(inputs) == 7 and outputs == [] and inputs[0].shape == (2, 256, 256, 3)
