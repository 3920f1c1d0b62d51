"""lesions.py through the real command line: every bad input is one line, exit 2, no output left.

These cases are all answered before TensorFlow is imported, so each takes well under 2 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import REPO, TINY, assert_user_error, run_cli, snapshot


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """An empty folder to run in, with a text file, an empty folder and a wrong-layout folder."""
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.jpg").write_text("a text file named .jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "wrong" / "pictures").mkdir(parents=True)
    (tmp_path / "half" / "ISIC2018_Task1-2_Training_Input").mkdir(parents=True)
    (tmp_path / "bad_key.toml").write_text("LEARNING_RATEE = 0.1\n")
    (tmp_path / "bad_value.toml").write_text('IMAGE_MAX_DIM = "big"\n')
    (tmp_path / "bad_range.toml").write_text("IMAGE_MAX_DIM = 100\nIMAGE_MIN_DIM = 100\n")
    (tmp_path / "bad_toml.toml").write_text("IMAGE_MAX_DIM = = 1\n")
    return tmp_path


BAD_INPUTS = {
    "unknown mode": (["--mode", "fly"], ["invalid choice", "fly"]),
    "no mode": ([], ["--mode"]),
    "unknown option": (["--mode", "train", "--epochs", "3"], ["--epochs"]),
    "no dataset folder": (["--mode", "train", "--dataset", "missing"], ["missing", "does not exist"]),
    "empty dataset folder": (["--mode", "train", "--dataset", "empty"], ["empty", "ISIC2018_Task1-2_Training_Input/"]),
    "wrong layout": (["--mode", "train", "--dataset", "wrong"], ["no known layout", "images/ + masks/"]),
    "images without masks folder": (["--mode", "train", "--dataset", "half"], ["ISIC2018_Task1_Training_GroundTruth/"]),
    "dataset is a file": (["--mode", "train", "--dataset", "notes.txt"], ["not a folder"]),
    "train weights missing": (["--mode", "train", "--dataset", "empty", "--weights", "nope.h5"], ["nope.h5"]),
    "train weights last without logs": (["--mode", "train", "--weights", "last"], ["no trained checkpoint"]),
    "coco weights missing": (["--mode", "train", "--weights", "coco"], ["mask_rcnn_coco.h5"]),
    "imagenet weights offline": (["--mode", "train", "--weights", "imagenet"],
                                 ["could not download https://", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                                  "put it at weights/"]),
    "config preset unknown": (["--mode", "train", "--config", "nosuch"], ["nosuch", "demo"]),
    "config unknown key": (["--mode", "train", "--config", "bad_key.toml"], ["LEARNING_RATEE", "bad_key.toml"]),
    "config bad value": (["--mode", "train", "--config", "bad_value.toml"], ["IMAGE_MAX_DIM", "integer"]),
    "config out of range": (["--mode", "train", "--config", "bad_range.toml"], ["multiple of 64"]),
    "config not TOML": (["--mode", "train", "--config", "bad_toml.toml"], ["not valid TOML"]),
    "set unknown key": (["--mode", "train", "--set", "FOO=1"], ["FOO"]),
    "set wrong type": (["--mode", "train", "--set", "LEARNING_RATE=fast"], ["LEARNING_RATE", "number"]),
    "set without =": (["--mode", "train", "--set", "LEARNING_RATE"], ["KEY=VALUE"]),
    "set derived key": (["--mode", "train", "--set", "BATCH_SIZE=4"], ["derived"]),
    "set bad schedule": (["--mode", "train", "--set", "ALL_EPOCHS=5", "--set", "HEADS_EPOCHS=10"], ["ALL_EPOCHS"]),
    "option of another mode": (["--mode", "train", "--top1"], ["--top1", "train"]),
    "predict without image": (["--mode", "predict"], ["--image"]),
    "predict image missing": (["--mode", "predict", "--image", "missing.jpg"], ["missing.jpg", "does not exist"]),
    "predict not an image": (["--mode", "predict", "--image", "notes.txt"], ["notes.txt", "not an image"]),
    "predict unreadable image": (["--mode", "predict", "--image", "fake.jpg"], ["fake.jpg"]),
    "predict folder without images": (["--mode", "predict", "--image", "empty"], ["no image files"]),
    "predict glob matching nothing": (["--mode", "predict", "--image", "nothing*.jpg"], ["no image files"]),
    "predict weights missing": (["--mode", "predict", "--image", "notes.txt", "--weights", "w.h5"], ["notes.txt"]),
    "predict no checkpoint": (["--mode", "predict", "--image", "empty/../fake.jpg"], ["fake.jpg"]),
    "predict coco is not a lesion model": (["--mode", "predict", "--image", "wrong", "--weights", "coco"],
                                           ["no image files"]),
    "output is a file": (["--mode", "predict", "--image", "missing.jpg", "--output", "notes.txt"],
                         ["--output notes.txt", "not a folder"]),
    "negative grid": (["--mode", "evaluate", "--pred", "empty", "--masks", "empty", "--grid", "-1"], ["--grid"]),
    "fold without folds": (["--mode", "train", "--fold", "1"], ["--fold needs --folds"]),
    "one fold": (["--mode", "train", "--folds", "1"], ["K >= 2"]),
    "fold out of range": (["--mode", "train", "--folds", "2", "--fold", "2"], ["from 0 to 1"]),
    "folds in predict": (["--mode", "predict", "--folds", "2"], ["--folds", "predict"]),
    "evaluate pred without masks": (["--mode", "evaluate", "--pred", "empty"], ["--masks"]),
    "evaluate pred missing": (["--mode", "evaluate", "--pred", "missing", "--masks", "empty"], ["missing"]),
    "evaluate images without masks": (["--mode", "evaluate", "--images", "empty"], ["--masks"]),
    "evaluate no dataset": (["--mode", "evaluate", "--dataset", "missing"], ["missing"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(workdir, case):
    args, words = BAD_INPUTS[case]
    before = snapshot(workdir)
    proc = run_cli(*args, cwd=workdir)
    assert_user_error(proc, *words)
    assert snapshot(workdir) == before, f"{case}: files were left behind"


def test_weights_path_missing_for_predict_with_real_image(workdir):
    from PIL import Image

    Image.new("RGB", (32, 32), 90).save(workdir / "ok.jpg")
    assert_user_error(run_cli("--mode", "predict", "--image", "ok.jpg", "--weights", "w.h5", cwd=workdir),
                      "w.h5", "does not exist")
    assert_user_error(run_cli("--mode", "predict", "--image", "ok.jpg", cwd=workdir), "no trained checkpoint")
    assert_user_error(run_cli("--mode", "predict", "--image", "ok.jpg", "--weights", "coco", cwd=workdir),
                      "not a lesion model")


def test_argument_errors_answer_fast(workdir):
    started = time.monotonic()
    assert_user_error(run_cli("--mode", "train", "--dataset", "missing", cwd=workdir))
    assert time.monotonic() - started < 2.0 + 3.0  # < 2 s on an idle machine; CI machines are shared


def test_lesions_does_not_import_tensorflow_for_argument_errors(workdir):
    code = ("import sys, lesions; rc = lesions.main(['--mode', 'train', '--dataset', 'missing']);"
            "print('TF' if 'tensorflow' in sys.modules else 'noTF', rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.strip().endswith("noTF 2"), proc.stdout + proc.stderr


def test_effective_config_is_printed_with_overrides(workdir):
    proc = run_cli("--mode", "train", "--dataset", "missing", "--config", str(TINY), "--set",
                   "LEARNING_RATE=0.0123", cwd=workdir)
    assert proc.returncode == 2
    assert "tiny.toml + --set LEARNING_RATE=0.0123" in proc.stdout
    assert any(line.split() == ["LEARNING_RATE", "0.0123"] for line in proc.stdout.splitlines())
    assert any(line.split() == ["BACKBONE", "resnet50"] for line in proc.stdout.splitlines())


def test_config_presets_are_valid():
    sys.path.insert(0, str(REPO))
    import lesions

    names = sorted(p.stem for p in (REPO / "configs").glob("*.toml"))
    assert {"demo", "isic2018"} <= set(names)
    for name in names:
        config = lesions.LesionConfig()
        config.load_toml(lesions.resolve_config_path(name))
        config.validate()
    config = lesions.LesionConfig()
    config.load_toml(TINY)
    config.validate()


def test_lesion_config_defaults_follow_the_tutorial():
    import lesions

    config = lesions.LesionConfig().validate()
    assert (config.NAME, config.NUM_CLASSES, config.BACKBONE, config.IMAGES_PER_GPU) == ("lesion", 2, "resnet101", 1)
    assert (config.HEADS_EPOCHS, config.ALL_EPOCHS, config.VALIDATION_FRACTION) == (20, 40, 0.2)
    from lesionkit.training_run import Stage, complete_steps, training_stages

    assert training_stages(config, 0) == [Stage("heads", 20, 0.001), Stage("all", 40, 0.0001)]
    assert training_stages(config, 25) == [Stage("all", 40, 0.0001)]
    assert training_stages(config, 40) == []
    complete = complete_steps(config.freeze(), 101, 10)
    assert (complete.STEPS_PER_EPOCH, complete.VALIDATION_STEPS) == (101, 10)
    assert (config.STEPS_PER_EPOCH, config.VALIDATION_STEPS) == (0, 0)  # a copy; the frozen config is unchanged


def test_help_lists_every_option(workdir):
    proc = run_cli("--help", cwd=workdir)
    assert proc.returncode == 0
    for option in ("--mode", "--config", "--set", "--dataset", "--weights", "--logs", "--image", "--output",
                   "--top1", "--crop", "--tta", "--images", "--masks", "--pred", "--grid"):
        assert option in proc.stdout


def test_resume_hint_replaces_weights():
    import lesions

    assert lesions.resume_hint(["--mode", "train", "--weights", "coco", "--dataset", "demo"]) == (
        "python lesions.py --mode train --dataset demo --weights last")
