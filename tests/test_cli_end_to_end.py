"""lesions.py end to end through the real command line: train once, then predict and evaluate.

The module-scoped ``trained`` fixture trains the tests-only config (tests/data/tiny.toml: 64 px,
ResNet-50, 1 epoch heads + 1 epoch all layers, 2 steps each) on 6 synthetic demo images, with
AVERAGE_LAST_EPOCHS = 2 (so predict and evaluate load the average of both epochs); the other tests
reuse its logs folder. Everything runs in a temporary folder (the CLI's default
paths are relative to the folder it runs in).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_helpers import LESIONS, TINY, assert_user_error, run_cli

IMAGES = "demo_data/ISIC2018_Task1-2_Training_Input"
MASKS = "demo_data/ISIC2018_Task1_Training_GroundTruth"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(work folder, run folder, train process) after one tiny training run with --dataset demo."""
    work = tmp_path_factory.mktemp("cli")
    proc = run_cli("--mode", "train", "--dataset", "demo", "--config", str(TINY), "--set", "AVERAGE_LAST_EPOCHS=2",
                   cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted((work / "logs").glob("lesion*"))
    assert len(runs) == 1
    return work, runs[0], proc


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def test_train_writes_checkpoints_logs_plot_and_split(trained):
    work, run, proc = trained
    assert [p.name for p in sorted(run.glob("mask_rcnn_lesion_*.h5"))] == [
        "mask_rcnn_lesion_0001.h5", "mask_rcnn_lesion_0002.h5", "mask_rcnn_lesion_0002_average2.h5"]
    assert "into mask_rcnn_lesion_0002_average2.h5: predict and evaluate use it" in proc.stdout
    assert "Stage 'heads': epochs 1..1" in proc.stdout and "Stage 'all': epochs 2..2" in proc.stdout
    # the optimiser state of the newest epoch only; the stage 'all' starts its optimiser afresh, saying so
    assert [p.name for p in run.glob("optimizer_*.h5")] == ["optimizer_lesion_0002.h5"]
    assert ("Optimizer: starts fresh (optimizer_lesion_0001.h5 holds the state of a stage that trained other"
            " weights (layers='heads', ") in proc.stdout
    assert "Configuration (LesionConfig + " in proc.stdout and "tiny.toml" in proc.stdout
    for word in ("checkpoints:", "logs:", "plots:", str(run.name)):
        assert word in proc.stdout
    with open(run / "training.csv", newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    with Image.open(run / "training_curves.png") as im:
        assert im.format == "PNG"
    split = json.loads((run / "split.json").read_text())
    assert split["n_train"] == 5 and split["n_val"] == 1 and not set(split["train"]) & set(split["val"])
    assert json.loads((run / "config.json").read_text())["BACKBONE"] == "resnet50"
    assert json.loads((work / "demo_data" / "demo.json").read_text())["n_images"] == 6


def test_predict_one_file_into_a_new_default_folder(trained):
    work, run, _ = trained
    image = f"{IMAGES}/ISIC_0000004.jpg"
    proc = run_cli("--mode", "predict", "--image", image, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # no TensorFlow start-up lines (mrcnn.tf_startup), no warnings
    assert "Re-starting from epoch" not in proc.stdout  # predict only loads weights
    outs = list((work / "predictions").iterdir())
    assert len(outs) == 1
    out = outs[0]
    seg = read_png(out / "ISIC_0000004_segmentation.png")
    assert seg.shape == (64, 80) and set(np.unique(seg)) <= {0, 255}
    with Image.open(out / "ISIC_0000004_overlay.png") as im:
        assert im.size == (80, 64) and im.mode == "RGB"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"].endswith("mask_rcnn_lesion_0002_average2.h5")  # the run's average by default
    (record,) = summary["images"]
    assert record["id"] == "ISIC_0000004" and isinstance(record["instances"], list)
    for inst in record["instances"]:
        assert set(inst) == {"score", "box", "area_px", "area_pct"}
    assert not list(out.glob(".tmp-*"))


def test_predict_glob_with_options_skips_and_counts(trained):
    work, run, _ = trained
    folder = work / "mixed input ü"  # a space and a non-ASCII letter in the path on purpose
    folder.mkdir()
    for name in ("ISIC_0000000.jpg", "ISIC_0000001.jpg"):
        shutil.copy(work / IMAGES / name, folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    proc = run_cli("--mode", "predict", "--image", f"{folder}/*", "--output", "out", "--top1", "--crop",
                   "--tta", "--weights", str(run / "mask_rcnn_lesion_0001.h5"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    assert summary["skipped_non_images"] == ["notes.txt"] and summary["unreadable"] == ["broken.jpg"]
    assert summary["top1"] and summary["crop"] and summary["tta"]
    assert [r["id"] for r in summary["images"]] == ["ISIC_0000000", "ISIC_0000001"]
    for record in summary["images"]:
        assert len(record["instances"]) <= 1
        assert "crop_box" in record
        assert (work / "out" / f"{record['id']}_crop.png").exists() == (record["crop_box"] is not None)
    assert "Skipped 1 non-image and 1 unreadable" in proc.stdout


def test_evaluate_validation_split_with_tta_and_grid(trained):
    work, run, _ = trained
    proc = run_cli("--mode", "evaluate", "--dataset", "demo", "--tta", "--grid", "1", "--worst-first",
                   "--output", "ev", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = work / "ev"
    summary = json.loads((ev / "summary.json").read_text())
    for key in ("threshold_jaccard", "jaccard", "dice", "sensitivity", "specificity", "accuracy", "n_images",
                "map50", "map"):
        assert key in summary and key in summary["tta"]
    assert summary["n_images"] == 1  # exactly the run's validation split
    with open(ev / "scores.csv", newline="") as handle:
        assert [row["image_id"] for row in csv.DictReader(handle)] == json.loads(
            (run / "split.json").read_text())["val"]
    assert (ev / "predictions" / "ISIC_0000004_segmentation.png").is_file()
    assert (ev / "tta" / "summary.json").is_file()
    with Image.open(ev / "evaluation_grid.png") as im:
        assert im.format == "PNG"
    assert "threshold_jaccard" in proc.stdout and "tta" in proc.stdout and "ev/summary.json" in proc.stdout


def test_evaluate_images_and_masks_folders(trained):
    work, _, _ = trained
    proc = run_cli("--mode", "evaluate", "--images", IMAGES, "--masks", MASKS, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = list((work / "evaluations").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 6 and 0.0 <= summary["jaccard"] <= 1.0


def test_evaluate_pred_without_a_model(trained, tmp_path):
    work, _, _ = trained
    pred = tmp_path / "pred"
    shutil.copytree(work / MASKS, pred)  # perfect predictions
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(pred / "ISIC_0000000_segmentation.png")  # one empty
    proc = run_cli("--mode", "evaluate", "--pred", str(pred), "--masks", str(work / MASKS), "--output",
                   str(tmp_path / "ev"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_images"] == 6
    assert summary["jaccard"] == pytest.approx(5 / 6) and summary["threshold_jaccard"] == pytest.approx(5 / 6)


def test_resume_with_weights_last_finds_the_right_epoch(trained):
    work, run, _ = trained
    # no --config: resuming takes the run's saved config.json (ALL_EPOCHS 2, 6 demo images)
    proc = run_cli("--mode", "train", "--dataset", "demo", "--weights", "last", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "config.json" in proc.stdout.strip().splitlines()[0]
    assert "mask_rcnn_lesion_0002.h5" in proc.stdout
    assert "Nothing to do: the checkpoint is at epoch 2" in proc.stdout
    assert len(list((work / "logs").iterdir())) == 1


def test_predict_with_a_corrupt_weights_file_is_one_line(trained, tmp_path):
    work, _, _ = trained
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    proc = run_cli("--mode", "predict", "--image", str(work / IMAGES / "ISIC_0000000.jpg"), "--weights", str(bad),
                   "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(proc, "bad.h5")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_exits_130_with_resume_hint(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(LESIONS), "--mode", "train", "--dataset", "demo", "--config",
                             str(TINY), "--weights", "none"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Building the model"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Resume with: python lesions.py --mode train --dataset demo" in err and "--weights last" in err
    assert "Traceback" not in err


def test_list_images_file_folder_glob(tmp_path):
    from lesionkit.prediction_files import list_images

    for name in ("b.jpg", "a.PNG", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert list_images(str(tmp_path / "b.jpg")) == ([tmp_path / "b.jpg"], [], True)
    paths, skipped, single = list_images(str(tmp_path))
    assert [p.name for p in paths] == ["a.PNG", "b.jpg"] and skipped == ["c.txt"] and not single
    paths, skipped, _ = list_images(str(tmp_path / "*.jpg"))
    assert [p.name for p in paths] == ["b.jpg"] and skipped == []


def test_newest_checkpoint_skips_runs_without_checkpoints(tmp_path):
    import lesions
    from mrcnn.checkpoints import newest_checkpoint

    old, new = tmp_path / "lesion20260101T0000", tmp_path / "lesion20260202T0000"
    old.mkdir()
    new.mkdir()
    for epoch in (1, 2, 10):
        (old / f"mask_rcnn_lesion_{epoch:04d}.h5").write_bytes(b"")
    (old / ".mask_rcnn_lesion_0011.h5.tmp").write_bytes(b"")  # an interrupted write is ignored
    assert newest_checkpoint(tmp_path, "lesion").name == "mask_rcnn_lesion_0010.h5"
    (new / "mask_rcnn_lesion_0003.h5").write_bytes(b"")
    assert newest_checkpoint(tmp_path, "lesion") == new / "mask_rcnn_lesion_0003.h5"
    # another config NAME trained later: predict (name None) takes it, training resumes its own
    other = tmp_path / "isic_b20260303T0000"
    other.mkdir()
    (other / "mask_rcnn_isic_b_0001.h5").write_bytes(b"")
    assert newest_checkpoint(tmp_path, None) == other / "mask_rcnn_isic_b_0001.h5"
    assert newest_checkpoint(tmp_path, "lesion") == new / "mask_rcnn_lesion_0003.h5"
    assert lesions.resolve_model_weights(None, tmp_path) == other / "mask_rcnn_isic_b_0001.h5"
    (tmp_path / "lesion_fold120260404T0000").mkdir()  # a k-fold run is not the 'lesion' run
    (tmp_path / "lesion_fold120260404T0000" / "mask_rcnn_lesion_fold1_0001.h5").write_bytes(b"")
    assert newest_checkpoint(tmp_path, "lesion") == new / "mask_rcnn_lesion_0003.h5"
    assert newest_checkpoint(tmp_path / "missing", None) is None


def test_weights_last_resumes_the_run_named_by_the_preset(tmp_path):
    """The preset's (or --set's) NAME picks the run to resume, not LesionConfig's default NAME."""
    run = tmp_path / "logs" / "isic_b20260303T0000"
    run.mkdir(parents=True)
    (run / "mask_rcnn_isic_b_0001.h5").write_bytes(b"")
    (run / "config.json").write_text('{"NAME": "isic_b", "HEADS_EPOCHS": 1, "ALL_EPOCHS": 3}')
    preset = tmp_path / "isic_b.toml"
    preset.write_text('NAME = "isic_b"\n')
    for how in (["--config", str(preset)], ["--set", 'NAME="isic_b"']):
        proc = run_cli("--mode", "train", *how, "--weights", "last", "--logs", str(tmp_path / "logs"),
                       "--dataset", str(tmp_path / "no_such_dataset"), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "no trained checkpoint" not in proc.stderr
        assert "no_such_dataset" in proc.stderr  # got past the weights to the dataset check
        assert str(run / "config.json") in proc.stdout  # the resumed run's config is the base
