"""Smoke test of benchmarks/quality.py: a few seconds of training on a tiny synthetic dataset in
the plain ``images/`` + ``masks/`` + ``metadata.csv`` layout, then the JSON line is checked.

Also unit tests of the budget helpers (learning-rate schedule, /proc CPU meter).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_plain_dataset

from benchmarks.budget import CpuMeter, budget_learning_rate

REPO = Path(__file__).resolve().parents[1]
QUALITY = REPO / "benchmarks" / "quality.py"
TINY = REPO / "tests" / "data" / "tiny.toml"
#: A refiner small enough for seconds of training.
REFINER_SETS = ("--set", "REFINE_CROP_SIZE=32", "--set", "REFINE_DEPTH=2", "--set", "REFINE_WIDTH=4",
                "--set", "REFINE_BATCH_SIZE=2")
KEYS = ("budget_min", "train_seconds", "steps", "epochs", "threshold_jaccard", "jaccard", "dice", "sensitivity",
        "specificity", "accuracy", "seconds_per_image", "other_load_share", "own_cpu_share", "n_val", "n_train",
        "fallback_images", "empty_masks", "checkpoint")


def test_quality_benchmark_prints_one_complete_json_line(tmp_path):
    data = tmp_path / "data"
    write_plain_dataset(data)
    record = tmp_path / "results.jsonl"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(QUALITY), "--dataset", str(data), "--config", str(TINY), "--budget-min", "0.2",
         "--set", "STEPS_PER_EPOCH=1000", "--warmup-steps", "2", "--logs", str(tmp_path / "logs"),
         "--record", str(record), "--label", "smoke", "--tta", "--real", "",
         "--set", "AVERAGE_LAST_EPOCHS=2", *REFINER_SETS],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]  # progress goes to stderr
    result = json.loads(lines[0])
    assert json.loads(record.read_text().strip()) == result
    for key in KEYS:
        assert key in result, key
    assert result["label"] == "smoke" and result["budget_min"] == 0.2
    assert result["n_train"] == 6 and result["n_val"] == 2
    assert result["steps"] >= 1 and result["epochs"] == pytest.approx(result["steps"] / 6, abs=1e-3)
    assert result["train_seconds"] > 0 and result["keras_epochs"] == 1  # (one step can outlast 12 s under load)
    for key in ("threshold_jaccard", "jaccard", "dice", "sensitivity", "specificity", "accuracy"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["threshold_jaccard"] <= result["jaccard"] + 1e-9
    assert result["seconds_per_image"] > 0
    assert 0.0 <= result["other_load_share"] <= 1.0 and 0.0 < result["own_cpu_share"] <= 1.0
    assert 0 <= result["empty_masks"] <= 2 and 0 <= result["fallback_images"] <= 2
    assert Path(result["checkpoint"]).is_file()
    evaluation = Path(result["run_dir"]) / "evaluation"
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["jaccard"] == pytest.approx(result["jaccard"], abs=1e-5)  # the --mode evaluate files
    assert len(list((evaluation / "predictions").glob("*_segmentation.png"))) == 2
    assert result["mask_threshold"] == 0.5  # tiny.toml keeps Matterport's default
    tta = result["tta"]  # --tta: the same metrics with test-time augmentation, files in evaluation/tta
    assert tta["n_val"] == 2 and tta["seconds_per_image"] > 0
    assert json.loads((evaluation / "tta" / "summary.json").read_text())["jaccard"] == pytest.approx(tta["jaccard"], abs=1e-5)
    assert len(list((evaluation / "tta" / "predictions").glob("*_segmentation.png"))) == 2
    # the refiner trained in the rest of the budget (--refine-share 0.3), scored next to the detector
    assert result["refine_share"] == 0.3 and result["refiner_steps"] >= 1
    assert Path(result["refiner_checkpoint"]).name.startswith("refiner_")
    table = result["side_by_side"]
    assert set(table) == {"val", "shift"} and set(table["val"]) == set(table["shift"]) == {"detector", "refined"}
    assert table["val"]["detector"]["threshold_jaccard"] == result["threshold_jaccard"]
    assert table["val"]["refined"]["threshold_jaccard"] == result["refined"]["threshold_jaccard"]
    assert result["shift"]["n_val"] == 2 and set(result["shift"]["by_shift"]) >= {"larger", "smaller", "below_065"}
    assert result["refined_shift"]["tta"]["n_val"] == 2
    assert len(list((Path(result["run_dir"]) / "shift_set" / "images").glob("*.jpg"))) == 2
    # AVERAGE_LAST_EPOCHS = 2 with one epoch written: nothing to average, the checkpoint is scored
    assert "last_epoch" not in result and not list(Path(result["run_dir"]).glob("*_average*.h5"))


def test_a_diagnosing_model_is_scored_on_its_diagnoses_under_shift_too(tmp_path):
    """The shift set keeps each val image's dx label: the shift block has the diagnosis metrics
    and the accuracy per shift kind (issue 14's proxy for unseen cameras)."""
    data = tmp_path / "data"
    write_plain_dataset(data, n_train=4, n_val=7, labels=("mel", "nv"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(QUALITY), "--dataset", str(data), "--config", str(TINY), "--budget-min", "0.05",
         "--max-steps", "2", "--set", 'CLASSES=["mel", "nv"]', "--warmup-steps", "1", "--refine-share", "0",
         "--logs", str(tmp_path / "logs"), "--real", ""],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["diagnosis"]["n_diagnosed"] == 7 and "bar" in result
    shift = result["shift"]
    assert shift["diagnosis"]["n_diagnosed"] == 7
    assert 0.0 <= shift["diagnosis"]["balanced_accuracy"] <= 1.0
    by_kind = shift["by_shift_diagnosis_accuracy"]  # one image of each kind: each accuracy is 0 or 1
    assert set(by_kind) == {"larger", "smaller", "crop", "colour", "illumination", "vignette", "ruler_hairs"}
    assert set(by_kind.values()) <= {0.0, 1.0}
    assert sum(by_kind.values()) == round(shift["diagnosis"]["accuracy"] * 7)


def test_learning_rate_schedules():
    assert budget_learning_rate(0.01, 0.5, 1000, "constant") == 0.01
    assert budget_learning_rate(0.01, 0.0, 1000, "cosine") == pytest.approx(0.01)
    assert budget_learning_rate(0.01, 1.0, 1000, "cosine") == pytest.approx(0.0005)
    assert budget_learning_rate(0.01, 0.5, 1000, "cosine") == pytest.approx(0.01 * (0.05 + 0.95 * 0.5))
    assert budget_learning_rate(0.01, 0.79, 1000, "step") == 0.01
    assert budget_learning_rate(0.01, 0.81, 1000, "step") == pytest.approx(0.001)
    assert budget_learning_rate(0.01, 0.0, 0, "constant", warmup_steps=10) == pytest.approx(0.001)
    assert budget_learning_rate(0.01, 0.0, 9, "constant", warmup_steps=10) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        budget_learning_rate(0.01, 0.5, 0, "linear")


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc")
def test_cpu_meter_sees_own_work():
    meter = CpuMeter().start()
    x = 0.0
    for i in range(3_000_000):
        x += math.sqrt(i)
    result = meter.stop()
    assert result["cpus"] >= 1 and result["seconds"] > 0
    assert 0.0 < result["own_cpu_share"] <= 1.0
    assert 0.0 <= result["other_load_share"] <= 1.0


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc")
def test_time_budget_schedule_follows_steps_or_cpu_seconds():
    from benchmarks.time_budget import TimeBudget

    budget = TimeBudget(1e6, max_steps=10)
    budget.start, budget.steps = time.time(), 5
    assert budget.fraction() == pytest.approx(0.5, abs=1e-3)  # the step cap drives the schedule
    budget.steps = 10
    assert budget.should_stop(budget.start)
    spent = TimeBudget(1e6, cpu_seconds=0.01)
    spent.start = time.time()
    x = 0.0
    for i in range(3_000_000):
        x += math.sqrt(i)
    assert spent.cpu_used() > 0.01 and spent.fraction() > 1.0
    spent.first_step_end, spent.first_step_ticks, spent.steps = spent.start, spent.start_ticks, 1
    assert spent.should_stop(spent.start)  # CPU budget spent: stop even though the wall budget is not


def test_diagnosis_fields_against_the_bar():
    """The JSON's diagnosis object comes from evaluate's summary; the bar compares it with issue 14's numbers."""
    from benchmarks import quality
    from lesionkit.diagnosis_metrics import diagnosis_metrics

    summary = diagnosis_metrics(["mel", "nv", "nv", "bcc"], [[0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.1, 0.5, 0.4],
                                                            [0.9, 0.05, 0.05]], ["bcc", "mel", "nv"])
    scores = {"threshold_jaccard": 0.83, "diagnosis": quality.diagnosis_scores(summary)}
    assert scores["diagnosis"] == {"balanced_accuracy": 0.83333, "accuracy": 0.75, "macro_auc": 1.0,
                                   "mel_sensitivity": 1.0, "mel_specificity": 0.66667,
                                   "recall": {"bcc": 1.0, "mel": 1.0, "nv": 0.5}, "n_diagnosed": 4}
    bar = quality.against_bar(scores)
    assert bar["baseline_balanced_accuracy"] == 0.612 and bar["threshold_jaccard_floor"] == 0.82
    assert bar["beats_baseline"] and bar["keeps_jaccard"] and bar["passes"]
    scores["threshold_jaccard"] = 0.81
    assert not quality.against_bar(scores)["passes"]
    assert quality.BASELINE_CLASSIFIER == {"balanced_accuracy": 0.612, "accuracy": 0.677, "macro_auc": 0.922,
                                           "mel_sensitivity": 0.636, "mel_specificity": 0.861}
