"""The training augmentations by name (mrcnn.augmentation) and the AUGMENTATION key that picks
one for `lesions.py --mode train` and benchmarks/quality.py alike."""
import argparse

import numpy as np
import pytest

import lesions
from mrcnn.augmentation import AUGMENTATIONS, named_augmentation
from mrcnn.config import ConfigError
from mrcnn.input_pipeline import augment
from tests.factories import make_lesion_config


def dihedral_images(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / 90-degree rotations of a square image [H, W, C]."""
    rotations = [np.rot90(image, k) for k in range(4)]
    return rotations + [np.fliplr(r) for r in rotations]


def asymmetric_image_and_mask(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [size, size, 3] with distinct pixels and a bool [size, size, 1] mask off the centre."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size, 1), bool)
    mask[2:6, 3:11] = True
    return image, mask


def which_dihedral(image: np.ndarray, out: np.ndarray) -> int | None:
    """Index of ``out`` among the 8 flips / rotations of ``image``, None if it is none of them."""
    for i, candidate in enumerate(dihedral_images(image)):
        if np.array_equal(candidate, out):
            return i
    return None


def test_flips_are_exactly_the_eight_symmetries_of_the_square_with_the_mask_alike():
    image, mask = asymmetric_image_and_mask()
    transform = named_augmentation("flips", seed=0)
    seen = set()
    for seed in range(80):
        out_image, out_mask = augment(transform, image, mask, seed=seed)
        index = which_dihedral(image, out_image)
        assert index is not None, f"seed {seed}: not a flip / rotation of the image"
        assert np.array_equal(out_mask, dihedral_images(mask)[index])
        seen.add(index)
    assert seen == set(range(8))


def test_a_seeded_transform_called_in_a_stream_draws_its_flips_independently():
    image, mask = asymmetric_image_and_mask()
    for transform in (named_augmentation("flips", seed=0), named_augmentation("default", seed=0)):
        masks = [transform(image=image, mask=mask[..., 0].astype(np.uint8))["mask"] for _ in range(80)]
        seen = {which_dihedral(mask[..., 0].astype(np.uint8), m) for m in masks}
        # default's scale / shift (p = 0.3) leaves some masks none of the eight (None)
        assert set(range(8)) <= seen, seen


def test_the_refiners_augmentation_reaches_all_eight_symmetries_too():
    from lesionkit.refine.crops import colour_augmentation

    image, mask = asymmetric_image_and_mask()
    target = mask[..., 0].astype(np.float32)
    transform = colour_augmentation(3)
    seen = {which_dihedral(target, transform(image=image, mask=target)["mask"]) for _ in range(80)}
    assert seen == set(range(8))


def test_default_also_changes_colour_and_scale_and_none_is_no_transform():
    image, mask = asymmetric_image_and_mask()
    transform = named_augmentation("default", seed=0)
    outs = [augment(transform, image, mask, seed=seed)[0] for seed in range(40)]
    assert sum(which_dihedral(image, out) is None for out in outs) >= 10
    assert named_augmentation("none") is None


def test_unknown_name_is_refused_by_the_builder_and_the_config_with_one_line():
    with pytest.raises(ValueError, match="augmentation must be one of default, flips, scale, none, got 'colour'"):
        named_augmentation("colour")
    with pytest.raises(ConfigError) as info:
        make_lesion_config(AUGMENTATION="colour")
    assert str(info.value) == "AUGMENTATION must be one of default, flips, scale, none, got 'colour'"
    assert AUGMENTATIONS == ("default", "flips", "scale", "none")


def test_scale_zooms_in_and_out_with_the_mask_following_the_image():
    size = 64
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size, 1), bool)
    mask[24:40, 20:44] = True  # a 16 x 24 lesion: 9.4 % of the image
    image[mask[..., 0]] = 200
    transform = named_augmentation("scale", seed=0)
    fractions = []
    for seed in range(200):
        out_image, out_mask = augment(transform, image, mask, seed=seed)
        # linear image interpolation vs nearest mask: they may differ on the lesion's rim only
        assert np.mean((out_image[..., 0] > 100) != out_mask[..., 0]) < 0.02, seed
        fractions.append(out_mask.mean())
    fractions = np.array(fractions)
    untouched = np.isclose(fractions, mask.mean())  # the 8 symmetries keep the area (p = 0.3 no zoom)
    assert 0.15 < untouched.mean() < 0.5
    # zoom 0.5-2x in area terms 0.25-4x: both directions occur, about equally often
    assert fractions.min() < 0.4 * mask.mean() and fractions.max() > 2.5 * mask.mean()
    zoomed_out = np.mean(fractions[~untouched] < mask.mean())
    assert 0.3 < zoomed_out < 0.7, zoomed_out


def test_set_none_on_a_string_key_means_the_word_none():
    config = lesions.build_config("demo", ["AUGMENTATION=none", "IMAGE_RESIZE_MODE=none"])
    assert config.AUGMENTATION == "none" and config.IMAGE_RESIZE_MODE == "none"
    assert lesions.training_augmentation(config) is None


def test_the_cpu_presets_train_with_the_augmentation_their_numbers_were_measured_with():
    flips = ["HorizontalFlip", "VerticalFlip", "RandomRotate90"]
    for preset, names in (("ham10000_cpu", flips), ("ham10000_dx", [*flips, "Affine"])):
        config = lesions.build_config(preset, [])
        assert [type(t).__name__ for t in lesions.training_augmentation(config).transforms] == names, preset
    assert lesions.build_config("demo", []).AUGMENTATION == "default"


def test_quality_bench_augment_flag_overrides_the_preset_after_set():
    from benchmarks.quality import config_overrides

    given = argparse.Namespace(set=["SEED=1", "AUGMENTATION=none"], augment="default")
    config = lesions.build_config("ham10000_dx", config_overrides(given))
    assert config.AUGMENTATION == "default" and config.SEED == 1
    unset = argparse.Namespace(set=["SEED=1"], augment=None)
    assert lesions.build_config("ham10000_dx", config_overrides(unset)).AUGMENTATION == "scale"
