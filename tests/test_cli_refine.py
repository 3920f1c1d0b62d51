"""The refinement stage through the command line: train detector then refiner in one run folder,
continue only the refiner with --weights last, predict/evaluate with and without it (--no-refine,
--tta), and say in summary.json which masks were refined."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import TINY, assert_user_error, run_cli

IMAGES = "demo_data/ISIC2018_Task1-2_Training_Input"
REFINE = ["--set", "REFINE=true", "--set", "REFINE_CROP_SIZE=32", "--set", "REFINE_DEPTH=2",
          "--set", "REFINE_WIDTH=4", "--set", "REFINE_EPOCHS=1", "--set", "REFINE_STEPS_PER_EPOCH=2",
          "--set", "REFINE_BATCH_SIZE=2"]
#: Every image gets a detection (the 2-step detector is untrained) and a threshold so low that every
#: refined crop has lesion pixels (so is the 1-epoch U-Net).
LOW = ["--set", "DETECTION_FOREGROUND_FALLBACK=true", "--set", "REFINE_MASK_THRESHOLD=0.001"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli_refine")
    proc = run_cli("--mode", "train", "--dataset", "demo", "--config", str(TINY), *REFINE, cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted((work / "logs").glob("lesion*"))
    assert len(runs) == 1
    return work, runs[0], proc


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_train_runs_the_detector_then_the_refiner_in_one_folder(trained):
    _, run, proc = trained
    assert proc.stdout.index("Stage 'all'") < proc.stdout.index("Stage 'refiner': epochs 1..1")
    assert (run / "mask_rcnn_lesion_0002.h5").is_file() and (run / "refiner_0001.weights.h5").is_file()
    assert (run / "refiner_training.csv").read_text().splitlines()[1].startswith("1,")
    assert "refiner:     " in proc.stdout
    assert json.loads((run / "config.json").read_text())["REFINE"] is True


def test_predict_uses_the_refiner_and_no_refine_switches_it_off(trained):
    work, run, _ = trained
    proc = run_cli("--mode", "predict", "--image", IMAGES, "--output", "with", *LOW, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "" and "Refiner: " in proc.stdout
    found = summary(work / "with")
    assert found["refiner"].endswith("refiner_0001.weights.h5")
    assert all(r["refined"] == bool(r["instances"]) for r in found["images"]) and found["n_with_lesion"] > 0
    proc = run_cli("--mode", "predict", "--image", IMAGES, "--output", "without", "--no-refine", *LOW, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Refiner: off (--no-refine" in proc.stdout
    plain = summary(work / "without")
    assert plain["refiner"] is None and not any(r["refined"] for r in plain["images"])


def test_evaluate_with_tta_refines_every_variant(trained):
    work, _, _ = trained
    proc = run_cli("--mode", "evaluate", "--dataset", "demo", "--tta", "--output", "ev", *LOW, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder in ("ev/predictions", "ev/tta/predictions"):
        records = summary(work / folder)["images"]
        assert records and all(r["refined"] == bool(r["instances"]) for r in records), folder
    assert "threshold_jaccard" in json.loads((work / "ev" / "summary.json").read_text())


def test_refiner_settings_that_do_not_fit_its_checkpoint_are_one_line(trained):
    work, _, _ = trained
    proc = run_cli("--mode", "predict", "--image", IMAGES, "--set", "REFINE_WIDTH=8", cwd=work)
    assert_user_error(proc, "refiner checkpoint", "refiner_0001.weights.h5", "REFINE_")


def test_no_refine_belongs_to_predict_and_evaluate(trained):
    work, _, _ = trained
    proc = run_cli("--mode", "train", "--no-refine", cwd=work)
    assert proc.returncode == 2 and "--no-refine does not apply to --mode train" in proc.stderr


def test_weights_last_on_a_finished_detector_trains_only_the_refiner(trained):
    work, run, _ = trained
    proc = run_cli("--mode", "train", "--dataset", "demo", "--config", str(TINY), *REFINE,
                   "--set", "REFINE_EPOCHS=2", "--weights", "last", cwd=work, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Nothing to do: the checkpoint is at epoch 2" in proc.stdout and "Stage 'all'" not in proc.stdout
    assert "Refiner: continuing from" in proc.stdout and "Stage 'refiner': epochs 2..2" in proc.stdout
    assert sorted(p.name for p in run.glob("refiner_*.weights.h5")) == ["refiner_0001.weights.h5",
                                                                         "refiner_0002.weights.h5"]
    assert len(list(run.glob("mask_rcnn_lesion_*.h5"))) == 2
