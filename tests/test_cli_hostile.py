"""Issue 13: what a hostile new user tried through the command line, one test per case.

Each case below answered wrongly before (a silent wrong score, a traceback, files written where
they should not be); each test failed on the code before the fix. Everything runs ``lesions.py``
in a subprocess in a temporary folder. The module-scoped ``trained`` fixture trains the tiny
tests-only model (tests/data/tiny.toml, ResNet-50, 2 epochs of 2 steps on 6 demo images) once;
bad inputs are made in each test's own temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import LESIONS, TINY, assert_user_error, run_cli, snapshot

IMAGES = "demo_data/ISIC2018_Task1-2_Training_Input"
MASKS = "demo_data/ISIC2018_Task1_Training_GroundTruth"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(work folder, run folder) after one tiny training run with --dataset demo."""
    work = tmp_path_factory.mktemp("hostile")
    proc = run_cli("--mode", "train", "--dataset", "demo", "--config", str(TINY), cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = sorted((work / "logs").glob("lesion*"))
    return work, run


def demo_images(work: Path, folder: Path, names: tuple[str, ...] = ("ISIC_0000000", "ISIC_0000001")) -> Path:
    """``folder`` with copies of some demo images (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(work / IMAGES / f"{name}.jpg", folder / f"{name}.jpg")
    return folder


def grey(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


# --- 1. colour ground-truth masks -----------------------------------------------------------


def test_evaluate_with_colour_truth_masks_scores_them_and_lists_them(trained, tmp_path):
    """A red lesion (255, 0, 0) on black read as an empty truth: every metric was 1.0000."""
    work, _ = trained
    colour = tmp_path / "colour_masks"
    colour.mkdir()
    for path in sorted((work / MASKS).glob("*.png")):
        truth = grey(path) > 128
        rgb = np.zeros(truth.shape + (3,), np.uint8)
        rgb[truth] = (255, 0, 0)
        Image.fromarray(rgb, "RGB").save(colour / path.name)
    runs = {}
    for which, masks in (("colour", colour), ("grey", work / MASKS)):
        proc = run_cli("--mode", "evaluate", "--images", str(work / IMAGES), "--masks", str(masks), "--output",
                       str(tmp_path / which), cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[which] = json.loads((tmp_path / which / "summary.json").read_text())
    summary = runs["colour"]
    assert summary["n_images"] == 6
    for key in ("jaccard", "dice", "sensitivity", "specificity", "accuracy", "threshold_jaccard"):
        assert summary[key] == pytest.approx(runs["grey"][key]), key
    # by hand: the predictions written against the grey truth
    scores = []
    for path in sorted((work / MASKS).glob("*.png")):
        truth = grey(path) > 128
        pred = grey(tmp_path / "colour" / "predictions" / path.name) > 128
        union = (truth | pred).sum()
        scores.append((truth & pred).sum() / union if union else 1.0)
    assert summary["jaccard"] == pytest.approx(np.mean(scores)) and summary["jaccard"] < 1.0
    colour_lines = [line for line in summary["problems"] if "colour" in line]
    assert len(colour_lines) == 6 and colour_lines[0].startswith("ISIC_0000000: truth mask")
    assert not [line for line in runs["grey"]["problems"] if "colour" in line]


def test_evaluate_pred_against_colour_truth_masks(tmp_path):
    """The same without a model: perfect grey predictions of red-on-black truth masks score 1.0
    (before: the truth read as empty, so every lesion predicted counted as wrong)."""
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    for i in range(3):
        mask = np.zeros((30, 40), bool)
        mask[5 + i:20, 10:30 - i] = True
        rgb = np.zeros((30, 40, 3), np.uint8)
        rgb[mask] = (255, 0, 0)
        Image.fromarray(rgb, "RGB").save(truth_dir / f"img{i}_segmentation.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(pred_dir / f"img{i}_segmentation.png")
    proc = run_cli("--mode", "evaluate", "--pred", "pred", "--masks", "truth", "--output", "ev", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["jaccard"] == 1.0 and summary["sensitivity"] == 1.0
    assert [line.split(":")[0] for line in summary["problems"] if "colour" in line] == ["img0", "img1", "img2"]
    assert "colour" in proc.stdout


# --- 2. --pred with predictions missing or of the wrong size ---------------------------------


def incomplete_submission(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(truth folder of 6 masks, predictions: 4 good, 1 missing, 1 of another size, empty work folder)."""
    truth_dir, pred_dir, work = tmp_path / "truth", tmp_path / "pred", tmp_path / "work"
    for folder in (truth_dir, pred_dir, work):
        folder.mkdir()
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 10:30] = 255
    for i in range(6):
        Image.fromarray(mask).save(truth_dir / f"img{i}_segmentation.png")
        if i < 4:
            Image.fromarray(mask).save(pred_dir / f"img{i}_segmentation.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(pred_dir / "img5_segmentation.png")  # wrong size
    return truth_dir, pred_dir, work  # img4: no prediction at all


def test_evaluate_pred_refuses_an_incomplete_submission(tmp_path):
    """Before: scored the 4 usable predictions of 6 (exit 0), as if the others did not exist."""
    truth_dir, pred_dir, work = incomplete_submission(tmp_path)
    proc = run_cli("--mode", "evaluate", "--pred", str(pred_dir), "--masks", str(truth_dir), cwd=work)
    assert_user_error(proc, "2 of 6 ground-truth masks")
    assert not list((work / "evaluations").glob("*"))  # no evaluations/<stamp>/ left behind
    proc = run_cli("--mode", "evaluate", "--pred", str(pred_dir), "--masks", str(truth_dir), "--output",
                   str(tmp_path / "ev"), cwd=work)
    assert_user_error(proc, "2 of 6 ground-truth masks")
    assert not (tmp_path / "ev").exists()


def test_evaluate_pred_incomplete_leaves_no_evaluations_folder(tmp_path):
    truth_dir, pred_dir, work = incomplete_submission(tmp_path)
    proc = run_cli("--mode", "evaluate", "--pred", str(pred_dir), "--masks", str(truth_dir), cwd=work)
    assert proc.returncode == 2
    assert snapshot(work) == set()


# --- 3. a checkpoint of another backbone ----------------------------------------------------


def test_predict_with_a_checkpoint_of_another_backbone_is_refused(trained, tmp_path):
    """Before: the ResNet-50 checkpoint was loaded by name into a ResNet-101 model, silently."""
    work, run = trained
    checkpoint = run / "mask_rcnn_lesion_0002.h5"
    proc = run_cli("--mode", "predict", "--image", str(work / IMAGES / "ISIC_0000000.jpg"), "--weights",
                   str(checkpoint), "--set", 'BACKBONE="resnet101"', "--output", str(tmp_path / "out"), cwd=tmp_path)
    line = assert_user_error(proc, str(checkpoint), "does not match the config")
    assert "BACKBONE" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "predictions").exists()


# --- 4. NAME that is a path -----------------------------------------------------------------


def test_train_refuses_a_name_that_is_a_path_before_any_work(tmp_path):
    """Before: accepted; the demo data was written and the run folder landed outside --logs."""
    proc = run_cli("--mode", "train", "--dataset", "demo", "--config", str(TINY), "--logs", "a/b/logs",
                   "--set", 'NAME="../../etc"', cwd=tmp_path, timeout=900)
    assert_user_error(proc, "NAME", "../../etc")
    assert snapshot(tmp_path) == set()  # no demo_data/, no logs, no etc*/


# --- 5. over-long image names ---------------------------------------------------------------

OK_STEM = "ok_" + "x" * 227  # 230 characters: its outputs (<= 247 bytes) fit
LONG_STEM = "long_" + "y" * 240  # 245 characters: <id>_segmentation.png would be 262 bytes


def test_predict_folder_with_over_long_names(trained, tmp_path):
    """Before: 'File name too long' from the atomic write's temporary name stopped the batch
    (no summary.json); now a 230-character name works and a 245-character one is skipped."""
    work, _ = trained
    folder = demo_images(work, tmp_path / "in", ("ISIC_0000000",))
    shutil.copy(work / IMAGES / "ISIC_0000001.jpg", folder / f"{OK_STEM}.jpg")
    shutil.copy(work / IMAGES / "ISIC_0000002.jpg", folder / f"{LONG_STEM}.jpg")
    proc = run_cli("--mode", "predict", "--image", str(folder), "--output", str(tmp_path / "out"), "--logs",
                   str(work / "logs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["id"] for r in summary["images"]] == ["ISIC_0000000", OK_STEM]
    assert summary["names_too_long"] == [f"{LONG_STEM}.jpg"]
    assert (tmp_path / "out" / f"{OK_STEM}_segmentation.png").is_file()
    assert (tmp_path / "out" / f"{OK_STEM}_overlay.png").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(("long_", ".tmp"))]


def test_predict_single_over_long_name_is_one_line(trained, tmp_path):
    """Before: the same 'File name too long' traceback; now refused before the model is built."""
    work, _ = trained
    image = tmp_path / f"{LONG_STEM}.jpg"
    shutil.copy(work / IMAGES / "ISIC_0000000.jpg", image)
    proc = run_cli("--mode", "predict", "--image", str(image), "--output", str(tmp_path / "out"), "--logs",
                   str(work / "logs"), cwd=tmp_path)
    assert_user_error(proc, "too long", LONG_STEM[:40])
    assert not (tmp_path / "out").exists()


# --- 6. a truncated checkpoint --------------------------------------------------------------


def test_predict_with_a_truncated_checkpoint_is_one_line(trained, tmp_path):
    """Before: an h5py traceback (the file starts like HDF5, so it looked readable)."""
    work, run = trained
    torn = tmp_path / "torn.h5"
    torn.write_bytes((run / "mask_rcnn_lesion_0001.h5").read_bytes()[:2000])
    proc = run_cli("--mode", "predict", "--image", str(work / IMAGES / "ISIC_0000000.jpg"), "--weights", str(torn),
                   "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(proc, "torn.h5")
    assert not (tmp_path / "out").exists()


# --- 7. --output where the OS refuses to write ----------------------------------------------

REFUSED = "/sys/lesions_hostile_out"  # /sys refuses mkdir even to root (EPERM)


def test_evaluate_pred_output_the_os_refuses_is_one_line(tmp_path):
    """Before: a PermissionError traceback."""
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 10:30] = 255
    for folder in ("truth", "pred"):
        (tmp_path / folder).mkdir()
        Image.fromarray(mask).save(tmp_path / folder / "a_segmentation.png")
    proc = run_cli("--mode", "evaluate", "--pred", "pred", "--masks", "truth", "--output", REFUSED, cwd=tmp_path)
    assert_user_error(proc, REFUSED)
    assert not os.path.exists(REFUSED)


def test_predict_output_the_os_refuses_is_one_line(trained, tmp_path):
    work, _ = trained
    proc = run_cli("--mode", "predict", "--image", str(work / IMAGES / "ISIC_0000000.jpg"), "--output",
                   f"{REFUSED}/sub", "--logs", str(work / "logs"), cwd=tmp_path)
    assert_user_error(proc, REFUSED)
    assert not os.path.exists(REFUSED)


# --- 8. predicting into the image folder, twice ---------------------------------------------


def test_predict_into_the_image_folder_twice_skips_its_own_outputs(trained, tmp_path):
    """Before: the second run predicted on x_segmentation.png and x_overlay.png too."""
    work, _ = trained
    folder = demo_images(work, tmp_path / "photos")
    ids = []
    for _ in range(2):
        proc = run_cli("--mode", "predict", "--image", str(folder), "--output", str(folder), "--logs",
                       str(work / "logs"), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ids.append([r["id"] for r in json.loads((folder / "summary.json").read_text())["images"]])
        if len(ids) == 1:
            files = sorted(p.name for p in folder.iterdir())
    assert ids[0] == ids[1] == ["ISIC_0000000", "ISIC_0000001"]
    assert sorted(p.name for p in folder.iterdir()) == files
    assert not list(folder.glob("*_segmentation_*")) and not list(folder.glob("*_overlay_*"))


# --- 9. an option given twice ---------------------------------------------------------------


@pytest.mark.parametrize("option", ["--image", "--weights"])
def test_a_single_value_option_given_twice_is_refused(tmp_path, option):
    """Before: argparse kept the last value silently (the answer was about b.jpg / two.h5)."""
    Image.new("RGB", (40, 30), 120).save(tmp_path / "a.jpg")
    args = {"--image": ["--image", "a.jpg", "--image", "b.jpg"],
            "--weights": ["--image", "a.jpg", "--weights", "one.h5", "--weights", "two.h5"]}[option]
    proc = run_cli("--mode", "predict", *args, cwd=tmp_path)
    assert_user_error(proc, option, "twice")
    assert snapshot(tmp_path) == {"a.jpg"}


# --- 10. every training mask empty ----------------------------------------------------------


def test_train_warns_when_every_mask_is_empty(tmp_path):
    """Before: no warning; the model trained on nothing to learn. The warning comes right after the
    dataset scan, so the run is stopped when it starts building the model (no training needed)."""
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for i in range(5):  # VALIDATION_FRACTION 0.2: 4 train, 1 validation
        Image.new("RGB", (40, 30), (150, 90, 70)).save(data / "images" / f"img{i}.jpg")
        Image.fromarray(np.zeros((30, 40), np.uint8)).save(data / "masks" / f"img{i}_segmentation.png")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, str(LESIONS), "--mode", "train", "--dataset", str(data), "--config",
                             str(TINY), "--weights", "none", "--no-cache", "--logs", str(tmp_path / "logs")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Building the model"):
                break
    finally:
        proc.kill()
        proc.communicate(timeout=120)
    out = "".join(lines)
    assert "warning: all 4 training masks checked are empty" in out, out
