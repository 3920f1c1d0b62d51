"""Config: Matterport defaults and derived values, display(), validation and overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import make_config

from mrcnn.config import Config, ConfigError, parse_value

#: A 128 px Matterport config (make_config("matterport", **TINY) is validated).
TINY = dict(NAME="tiny", IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128)


def test_matterport_defaults_and_derived_values():
    c = Config()
    assert c.BATCH_SIZE == 2 and c.IMAGES_PER_GPU == 2 and c.GPU_COUNT == 1
    assert c.IMAGE_SHAPE.tolist() == [1024, 1024, 3]
    assert c.IMAGE_META_SIZE == 13  # 12 + NUM_CLASSES (1)
    assert c.BACKBONE == "resnet101" and c.RPN_ANCHOR_SCALES == (32, 64, 128, 256, 512)
    assert c.DETECTION_MIN_CONFIDENCE == 0.7 and c.MASK_SHAPE == [28, 28]
    np.testing.assert_array_equal(c.BBOX_STD_DEV, [0.1, 0.1, 0.2, 0.2])


def test_crop_mode_uses_min_dim_for_image_shape():
    # About subclassing itself (as a Matterport user configures): class attributes feed __init__.
    class Crop(Config):
        NAME = "tiny"
        NUM_CLASSES = 2
        IMAGE_RESIZE_MODE = "crop"
        IMAGE_MIN_DIM = 64
        IMAGE_MAX_DIM = 128

    assert Crop().IMAGE_SHAPE.tolist() == [64, 64, 3]
    assert make_config("matterport", IMAGE_RESIZE_MODE="crop", IMAGE_MIN_DIM=64).IMAGE_SHAPE.tolist() == [64, 64, 3]


def test_a_subclass_needs_two_classes_bare_config_does_not():
    # About subclassing itself: NUM_CLASSES >= 2 binds a user's subclass, not bare Config.
    class OneClass(Config):
        NAME = "one"

    with pytest.raises(ConfigError, match="NUM_CLASSES") as info:
        OneClass().validate()
    assert "\n" not in str(info.value)
    assert make_config("matterport", NUM_CLASSES=1).NUM_CLASSES == 1


def test_display_prints_sorted_attributes_padded_to_30(capsys):
    make_config("matterport", **TINY).display()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip() and ":" not in line[:15]]
    names = [line[:30].strip() for line in lines]
    assert names == sorted(names)
    assert any(line.startswith("NAME" + " " * 26 + " tiny") for line in lines)
    assert "IMAGE_META_SIZE" in names and "display" not in names


def test_validate_accepts_a_sane_config():
    assert make_config("matterport", **TINY).validate().NAME == "tiny"


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("IMAGE_MAX_DIM", 100, "multiple of 64"),
        ("BACKBONE", "resnet152", "BACKBONE"),
        ("BACKBONE_WIDTH", 32, "BACKBONE_WIDTH"),
        ("MASK_HEAD_CONV_LAYERS", 0, "MASK_HEAD_CONV_LAYERS"),
        ("TRAIN_ROIS_PER_IMAGE", 5000, "POST_NMS_ROIS_TRAINING"),
        ("DETECTION_MIN_CONFIDENCE", 1.5, "DETECTION_MIN_CONFIDENCE"),
        ("MASK_SHAPE", [30, 30], "MASK_SHAPE"),
        ("IMAGE_RESIZE_MODE", "stretch", "IMAGE_RESIZE_MODE"),
        ("IMAGE_MIN_DIM", 256, "IMAGE_MIN_DIM"),
        ("IMAGE_MAX_DIM", 0, "IMAGE_MAX_DIM"),
        ("DETECTION_MAX_INSTANCES", 5000, "POST_NMS_ROIS_INFERENCE"),
        ("ROI_POSITIVE_RATIO", 0.0, "(0, 1]"),
        ("ROI_POSITIVE_RATIO", 1.5, "(0, 1]"),
        ("TRAIN_ROIS_PER_IMAGE", 1, "at least one positive ROI"),
        ("BACKBONE_STRIDES", [4, 8, 16, 32, 128], "BACKBONE_STRIDES"),
        ("GRADIENT_CLIP_MODE", "layerwise", "per_variable or global"),
        ("OPTIMIZER", "adam", "OPTIMIZER must be sgd or adamw, got 'adam'"),
        ("LR_SCHEDULE", "linear", "LR_SCHEDULE must be stages or cosine, got 'linear'"),
        ("LR_WARMUP_STEPS", -1, "LR_WARMUP_STEPS must be an integer >= 0, got -1"),
        ("ADAMW_WEIGHT_DECAY", -0.1, "ADAMW_WEIGHT_DECAY must be >= 0, got -0.1"),
        ("RPN_ANCHOR_SCALES", [32, 64], "one scale per pyramid level"),
        ("LEARNING_RATE", float("nan"), "LEARNING_RATE"),
        ("DETECTION_NMS_THRESHOLD", -0.1, "DETECTION_NMS_THRESHOLD"),
        ("DETECTION_MASK_THRESHOLD", 0.0, "DETECTION_MASK_THRESHOLD must be in (0, 1]"),
        ("DETECTION_MASK_THRESHOLD", 1.2, "DETECTION_MASK_THRESHOLD must be in (0, 1]"),
        ("MULTI_WORKER_TIMEOUT", 0, "MULTI_WORKER_TIMEOUT must be a number of seconds > 0"),
        ("CLASS_HEAD_DROPOUT", 1.0, "CLASS_HEAD_DROPOUT must be in [0, 1), got 1.0"),
        ("CLASSIFIER_ROI_MIN_LEVEL", 1, "CLASSIFIER_ROI_MIN_LEVEL must be a pyramid level 2..5, got 1"),
        ("CLASSIFIER_ROI_MIN_LEVEL", 6, "CLASSIFIER_ROI_MIN_LEVEL must be a pyramid level 2..5, got 6"),
        ("CLASS_HEAD_IMAGE_CONTEXT", True, "CLASS_HEAD_IMAGE_CONTEXT needs DIAGNOSIS_HEAD roi and two or more CLASSES"),
        ("WEIGHTS_EMA", 1.0, "WEIGHTS_EMA must be in [0, 1) (0 = off), got 1.0"),
        ("AVERAGE_LAST_EPOCHS", -1, "AVERAGE_LAST_EPOCHS must be an integer >= 0 (0 = off), got -1"),
        ("DIAGNOSIS_ROI_POOLING", "max", "DIAGNOSIS_ROI_POOLING must be mean or top, got 'max'"),
    ],
)
def test_validate_refuses_bad_values_with_one_line(key, value, words):
    c = make_config("matterport", **TINY)
    c.set(key, value)
    with pytest.raises(ConfigError) as info:
        c.validate()
    message = str(info.value)
    assert words in message and "\n" not in message


def test_overrides_parse_types_and_recompute_derived_values():
    c = make_config("matterport", **TINY).apply_overrides(["IMAGE_MAX_DIM=256", "IMAGES_PER_GPU=3",
                                                           "BACKBONE=resnet50", "LEARNING_RATE=0.01",
                                                           "LOSS_WEIGHTS={mrcnn_mask_loss=2.0}"])
    assert c.IMAGE_SHAPE.tolist() == [256, 256, 3] and c.BATCH_SIZE == 3
    assert c.BACKBONE == "resnet50" and c.LEARNING_RATE == 0.01
    assert c.LOSS_WEIGHTS["mrcnn_mask_loss"] == 2.0 and c.LOSS_WEIGHTS["rpn_class_loss"] == 1.0


@pytest.mark.parametrize(
    "override, words",
    [
        ("NOT_A_KEY=1", "unknown config key"),
        ("IMAGE_MAX_DIM=big", "expects an integer"),
        ("IMAGE_MAX_DIM=1.5", "expects an integer"),
        ("USE_MINI_MASK=1", "true or false"),
        ("BATCH_SIZE=4", "derived"),
        ("LOSS_WEIGHTS={foo=1.0}", "no entry"),
        ("IMAGE_MAX_DIM", "KEY=VALUE"),
    ],
)
def test_overrides_refuse_unknown_keys_and_wrong_types(override, words):
    with pytest.raises(ConfigError, match=words):
        make_config("matterport", **TINY).apply_overrides([override])


def test_an_unknown_colour_constancy_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="COLOUR_CONSTANCY must be one of none, shades_of_gray, got 'grey_world'"):
        make_config("matterport", **TINY, COLOUR_CONSTANCY="grey_world")


def test_the_test_factory_refuses_like_a_user_override():
    with pytest.raises(ConfigError, match="unknown config key 'NOT_A_KEY'"):
        make_config(NOT_A_KEY=1)
    with pytest.raises(ConfigError, match="expects an integer"):
        make_config(IMAGE_MAX_DIM="big")
    with pytest.raises(ConfigError, match="multiple of 64"):
        make_config(IMAGE_MIN_DIM=100, IMAGE_MAX_DIM=100)
    assert make_config(IMAGES_PER_GPU=3).BATCH_SIZE == 3


def test_toml_preset_and_errors(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('BACKBONE = "resnet50"\n[rpn]\nRPN_ANCHOR_SCALES = [8, 16, 32, 64, 128]\n')
    c = make_config("matterport", **TINY).load_toml(good)
    assert c.BACKBONE == "resnet50" and c.RPN_ANCHOR_SCALES == (8, 16, 32, 64, 128)
    bad = tmp_path / "bad.toml"
    bad.write_text("NOPE = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'NOPE' \(in .*bad.toml\)"):
        make_config("matterport", **TINY).load_toml(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("= = =")
    with pytest.raises(ConfigError, match="not valid TOML"):
        make_config("matterport", **TINY).load_toml(broken)
    with pytest.raises(ConfigError, match="not found"):
        make_config("matterport", **TINY).load_toml(tmp_path / "missing.toml")


def test_save_writes_json_snapshot(tmp_path):
    path = tmp_path / "config.json"
    make_config("matterport", **TINY).save(path)
    data = json.loads(path.read_text())
    assert data["NAME"] == "tiny" and data["IMAGE_SHAPE"] == [128, 128, 3]
    assert not list(tmp_path.glob("*.tmp"))


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("resnet50") == "resnet50"
    assert parse_value("None") is None


def test_image_min_scale_takes_a_fraction():
    config = make_config(IMAGE_MIN_SCALE=1.5)
    assert config.IMAGE_MIN_SCALE == 1.5
    config.apply_overrides(["IMAGE_MIN_SCALE=2"])  # an integer is a number too
    assert config.IMAGE_MIN_SCALE == 2.0


def test_tensorflow_start_up_notices_are_dropped_and_other_lines_kept():
    from mrcnn.tf_startup import drop_notices

    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1796522945.214091   21197 port.cc:153] oneDNN custom operations are on.\n"
            "I0000 00:00:1796522982.815927   21793 cpu_feature_guard.cc:227] This TensorFlow binary\n"
            "To enable the following instructions: AVX2 AVX512F, in other operations, rebuild\n"
            "E0000 00:00:1796522956.002356   21197 cuda.cc:1] a real error\n"
            "ImportError: something real\n")
    assert drop_notices(text) == "E0000 00:00:1796522956.002356   21197 cuda.cc:1] a real error\nImportError: something real\n"


def test_classes_key_sets_num_classes_and_is_validated():
    from lesions import LesionConfig

    config = LesionConfig()
    assert (config.CLASSES, config.NUM_CLASSES, config.IMAGE_META_SIZE) == (["lesion"], 2, 14)
    seven = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    config.apply_overrides({"CLASSES": seven})
    assert (config.NUM_CLASSES, config.IMAGE_META_SIZE) == (8, 20)
    config.apply_overrides({"NUM_CLASSES": 8})  # a saved config.json repeats it: accepted when consistent
    with pytest.raises(ConfigError, match="NUM_CLASSES follows CLASSES"):
        config.set("NUM_CLASSES", 3)
    with pytest.raises(ConfigError, match="CLASSES.*list of class names"):
        config.set("CLASSES", [1, 2])
    for bad, match in ((["mel", "MEL"], "repeat"), (["BG", "mel"], "background"), ([], "non-empty")):
        config = LesionConfig()
        config.set("CLASSES", bad)
        with pytest.raises(ConfigError, match=match):
            config.validate()
