"""Diagnosis outputs of predict and evaluate, with a fake diagnosing model (no TensorFlow graph):
summary.json fields, the overlay label, diagnosis.csv (ISIC 2018 Task 3 format), the evaluation's
metrics, scores.csv columns and confusion matrix, k-fold mean ± std, ``--pred`` with a Task 3 CSV;
and that a one-class model writes none of it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_user_error, run_cli
from factories import make_config
from PIL import Image

from lesionkit import diagnosis_labels, evaluation_run, prediction_files
from lesionkit.dataset_scan import Pair
from lesionkit.prediction_run import PredictOptions, predict_images

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
SIZE = 32
#: image i: (true dx, the class the fake model favours, its probability)
IMAGES = [("mel", "mel", 0.6), ("nv", "nv", 0.7), ("nv", "mel", 0.5), ("bcc", "bcc", 0.9)]


def probs_for(favoured: str, p: float) -> np.ndarray:
    """[7] over CLASSES: ``p`` on ``favoured``, the rest shared evenly."""
    out = np.full(len(CLASSES), (1.0 - p) / (len(CLASSES) - 1), dtype=np.float32)
    out[CLASSES.index(favoured)] = p
    return out


class FakeModel:
    """``detect`` as MaskRCNN's: a square lesion; ``class_probs`` from the image's index (its grey
    level / 20) when the config diagnoses. ``with_probs`` forces them on or off."""

    def __init__(self, config, with_probs: bool | None = None) -> None:
        self.config = config
        self.with_probs = len(config.CLASSES) > 1 if with_probs is None else with_probs

    def detect(self, images, verbose=0):
        image = images[0]
        index = int(image[0, 0, 0]) // 20
        masks = np.zeros(image.shape[:2] + (1,), bool)
        masks[8:24, 8:24, 0] = True
        result = {"rois": np.array([[8, 8, 24, 24]], np.int32), "class_ids": np.array([1], np.int32),
                  "scores": np.array([0.95], np.float32), "masks": masks}
        if self.with_probs:
            result["class_probs"] = probs_for(*IMAGES[index][1:])
        return [result]


@pytest.fixture(scope="module")
def dx_config():
    return make_config("tiny", CLASSES=CLASSES)


@pytest.fixture(scope="module")
def one_class_config():
    return make_config("tiny")


@pytest.fixture
def data(tmp_path) -> list[Pair]:
    """Four images (grey level 20 * i) with their square masks and true diagnoses; the dataset root
    ``tmp_path/data`` holds images/, masks/ and metadata.csv (dx)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pairs = []
    for i, (dx, _, _) in enumerate(IMAGES):
        image_id = f"ISIC_000000{i}"
        image = np.full((SIZE, SIZE, 3), 20 * i, np.uint8)
        Image.fromarray(image).save(root / "images" / f"{image_id}.png")
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8:24, 8:24] = 255
        Image.fromarray(mask).save(root / "masks" / f"{image_id}_segmentation.png")
        pairs.append(Pair(image_id, root / "images" / f"{image_id}.png",
                          root / "masks" / f"{image_id}_segmentation.png", dx))
    lines = ["image_id,dx"] + [f"{p.image_id},{p.diagnosis}" for p in pairs]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return pairs


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -------------------------------------------------------------------------------------------
# Predict


def test_predict_writes_diagnosis_fields_label_and_task3_csv(tmp_path, data, dx_config, one_class_config):
    out = tmp_path / "pred"
    out.mkdir()
    records, _ = predict_images(FakeModel(dx_config), [p.image_path for p in data], out, PredictOptions(0.5))
    prediction_files.write_summary(out, records, {}, CLASSES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == CLASSES and summary["diagnosis_csv"] == "diagnosis.csv"
    assert summary["n_by_diagnosis"] == {"bcc": 1, "mel": 2, "nv": 1}
    first = summary["images"][0]
    assert first["diagnosis"] == "mel" and first["diagnosis_probability"] == pytest.approx(0.6)
    assert list(first["class_probs"]) == CLASSES
    assert first["class_probs"]["nv"] == pytest.approx(0.4 / 6, abs=1e-6)
    # diagnosis.csv: Task 3 header and column order, ids without extension, probabilities moved to their columns
    lines = (out / "diagnosis.csv").read_text().splitlines()
    assert lines[0] == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
    table = diagnosis_labels.read_task3_csv(out / "diagnosis.csv")
    assert list(table) == [p.image_id for p in data]
    np.testing.assert_allclose(table["ISIC_0000003"][2], 0.9, atol=1e-6)  # BCC column
    np.testing.assert_allclose(table["ISIC_0000001"][1], 0.7, atol=1e-6)  # NV column
    np.testing.assert_allclose(table["ISIC_0000001"].sum(), 1.0, atol=1e-5)
    # the overlay carries the label: it differs from the one-class overlay only in the bottom-left corner
    plain = tmp_path / "plain"
    plain.mkdir()
    predict_images(FakeModel(one_class_config, with_probs=True), [data[0].image_path], plain, PredictOptions(0.5))
    labelled = np.asarray(Image.open(out / "ISIC_0000000_overlay.png"))
    unlabelled = np.asarray(Image.open(plain / "ISIC_0000000_overlay.png"))
    changed = np.argwhere((labelled != unlabelled).any(axis=-1))
    assert changed.size and changed[:, 0].min() >= SIZE // 2 and changed[:, 1].min() < 4


def test_one_class_model_writes_no_diagnosis(tmp_path, data, one_class_config):
    # even a result carrying class_probs: a one-class config means no diagnosis outputs
    records, _ = predict_images(FakeModel(one_class_config, with_probs=True), [p.image_path for p in data],
                                tmp_path, PredictOptions(0.5))
    prediction_files.write_summary(tmp_path, records, {}, None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not {"classes", "diagnosis_csv", "n_by_diagnosis"} & set(summary)
    assert not {"diagnosis", "diagnosis_probability", "class_probs"} & set(summary["images"][0])
    assert not (tmp_path / "diagnosis.csv").exists()


def test_diagnosis_csv_is_replaced_whole(tmp_path, data, dx_config):
    """Written once at the end through a temporary file: an old file is replaced, never mixed."""
    (tmp_path / "diagnosis.csv").write_text("stale\n")
    records, _ = predict_images(FakeModel(dx_config), [data[0].image_path], tmp_path, PredictOptions(0.5))
    assert (tmp_path / "diagnosis.csv").read_text() == "stale\n"  # not touched while predicting
    prediction_files.write_summary(tmp_path, records, {}, CLASSES)
    assert list(diagnosis_labels.read_task3_csv(tmp_path / "diagnosis.csv")) == ["ISIC_0000000"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "tmp"))) == []


# -------------------------------------------------------------------------------------------
# Evaluate


def test_evaluate_model_scores_diagnoses(tmp_path, data, dx_config, capsys):
    columns = evaluation_run.evaluate_with_model(FakeModel(dx_config), data, tmp_path, PredictOptions(0.5))
    dx = columns["plain"]["diagnosis"]
    # truth mel nv nv bcc, diagnosed mel nv mel bcc: recalls mel 1, nv 1/2, bcc 1
    assert dx["balanced_accuracy"] == pytest.approx(2.5 / 3)
    assert dx["accuracy"] == pytest.approx(0.75)
    assert dx["mel_sensitivity"] == 1.0 and dx["mel_specificity"] == pytest.approx(2 / 3)
    assert dx["per_class"]["mel"]["precision"] == pytest.approx(0.5)
    assert dx["auc_skipped"] == ["akiec", "bkl", "df", "vasc"]
    # nv column: positives 0.7 and 0.5/6 (image 2, favouring mel at 0.5), negatives 0.4/6 and 0.1/6: 4 of 4
    # pairs ranked right although image 2 is diagnosed wrong
    assert dx["per_class"]["nv"]["auc"] == pytest.approx(1.0)
    assert dx["macro_auc"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["diagnosis"]["balanced_accuracy"] == pytest.approx(2.5 / 3)
    assert saved["jaccard"] == pytest.approx(1.0)  # Task 1 metrics are still there
    rows = read_csv(tmp_path / "scores.csv")
    assert list(rows[0])[:9] == ["image_id", "threshold_jaccard", "jaccard", "dice", "sensitivity",
                                 "specificity", "accuracy", "true_dx", "pred_dx"]
    assert [(r["true_dx"], r["pred_dx"]) for r in rows] == [("mel", "mel"), ("nv", "nv"), ("nv", "mel"),
                                                           ("bcc", "bcc")]
    assert float(rows[3]["p_bcc"]) == pytest.approx(0.9)
    assert (tmp_path / "confusion_matrix.png").is_file()
    assert (tmp_path / "predictions" / "diagnosis.csv").is_file()
    printed = capsys.readouterr().out
    assert "dx_balanced_accuracy" in printed and "0.8333" in printed and "dx_recall_nv" in printed


def test_evaluate_one_class_model_has_no_diagnosis(tmp_path, data, one_class_config):
    columns = evaluation_run.evaluate_with_model(FakeModel(one_class_config, with_probs=True), data, tmp_path,
                                                 PredictOptions(0.5))
    assert "diagnosis" not in columns["plain"]
    assert list(read_csv(tmp_path / "scores.csv")[0]) == ["image_id", "threshold_jaccard", "jaccard", "dice",
                                                          "sensitivity", "specificity", "accuracy"]
    assert not (tmp_path / "confusion_matrix.png").exists()
    assert not (tmp_path / "predictions" / "diagnosis.csv").exists()
    assert not any("dx_" in line for line in evaluation_run.summary_lines(columns))


def test_unknown_true_label_is_a_problem_not_a_crash(tmp_path, data, dx_config):
    from dataclasses import replace

    pairs = [replace(data[0], diagnosis="lesion"), *data[1:]]
    summary = evaluation_run.evaluate_model(FakeModel(dx_config), pairs, tmp_path, PredictOptions(0.5))
    assert summary["diagnosis"]["n_diagnosed"] == 3 and summary["diagnosis"]["n_unlabelled"] == 1
    assert any("ISIC_0000000: true diagnosis 'lesion'" in line for line in summary["problems"])


def test_kfold_mean_and_std_of_diagnosis_metrics(tmp_path, capsys):
    from lesionkit.kfold import write_kfold_summary

    folds = [{"jaccard": 0.8, "diagnosis": {"balanced_accuracy": 0.5, "accuracy": 0.6,
                                            "per_class": {"mel": {"recall": 0.2}}}},
             {"jaccard": 0.9, "diagnosis": {"balanced_accuracy": 0.7, "accuracy": 0.8,
                                            "per_class": {"mel": {"recall": 0.4}}}}]
    data = json.loads(write_kfold_summary(tmp_path, "dx", folds).read_text())
    assert data["mean_std"]["dx_balanced_accuracy"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1)}
    assert data["mean_std"]["dx_recall_mel"]["mean"] == pytest.approx(0.3)
    assert data["mean_std"]["jaccard"]["mean"] == pytest.approx(0.85)
    assert "dx_balanced_accuracy    0.6000 ± 0.1000" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------
# --pred with a Task 3 CSV (the command line)


def write_submission(path: Path, rows: dict[str, list]) -> Path:
    lines = ["image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"] + [f"{k}.jpg," + ",".join(map(str, v)) for k, v in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def task3_rows() -> dict[str, list[float]]:
    """Diagnoses mel, nv, mel, bcc for the four images (Task 3 column order)."""
    return {"ISIC_0000000": [0.8, 0.1, 0.1, 0, 0, 0, 0], "ISIC_0000001": [0.2, 0.7, 0.1, 0, 0, 0, 0],
            "ISIC_0000002": [0.6, 0.3, 0.1, 0, 0, 0, 0], "ISIC_0000003": [0.05, 0.05, 0.9, 0, 0, 0, 0]}


def test_pred_task3_csv_is_scored(tmp_path, data):
    submission = write_submission(tmp_path / "sub.csv", task3_rows())
    proc = run_cli("--mode", "evaluate", "--pred", str(submission), "--labels", str(tmp_path / "data" / "metadata.csv"),
                   "--output", "ev", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_images"] == 4
    assert summary["diagnosis"]["balanced_accuracy"] == pytest.approx(2.5 / 3)
    # nv column: positives 0.7, 0.3; negatives 0.1 (mel), 0.05 (bcc): all four pairs right
    assert summary["diagnosis"]["per_class"]["nv"]["auc"] == pytest.approx(1.0)
    rows = read_csv(tmp_path / "ev" / "scores.csv")
    assert list(rows[0])[:3] == ["image_id", "true_dx", "pred_dx"] and rows[2]["pred_dx"] == "mel"
    assert (tmp_path / "ev" / "confusion_matrix.png").is_file()
    assert "dx_balanced_accuracy" in proc.stdout


def test_pred_folder_with_masks_and_diagnosis_csv_scores_both(tmp_path, data):
    pred = tmp_path / "pred"
    pred.mkdir()
    for p in data:
        (pred / p.mask_path.name).write_bytes(p.mask_path.read_bytes())
    write_submission(pred / "diagnosis.csv", task3_rows())
    # labels found next to --masks: data/metadata.csv
    proc = run_cli("--mode", "evaluate", "--pred", "pred", "--masks", "data/masks", "--output", "ev", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["jaccard"] == pytest.approx(1.0)
    assert summary["diagnosis"]["accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("case", ["missing image", "not a number", "no labels", "bad header"])
def test_pred_broken_task3_csv_is_refused(tmp_path, data, case):
    rows = task3_rows()
    labels = ["--labels", str(tmp_path / "data" / "metadata.csv")]
    if case == "missing image":
        del rows["ISIC_0000002"]
    elif case == "not a number":
        rows["ISIC_0000001"][1] = "high"
    elif case == "no labels":
        labels = []
    submission = write_submission(tmp_path / "sub.csv", rows)
    if case == "bad header":
        submission.write_text(submission.read_text().replace("MEL,", "MELANOMA,", 1))
    proc = run_cli("--mode", "evaluate", "--pred", str(submission), *labels, "--output", "ev", cwd=tmp_path)
    expected = {"missing image": ["sub.csv", "1 of 4 labelled images have no row", "ISIC_0000002"],
                "not a number": ["sub.csv", "line 3", "'high' is not a number"],
                "no labels": ["sub.csv", "--labels"],
                "bad header": ["sub.csv", "header lacks MEL"]}[case]
    assert_user_error(proc, *expected)
    assert not (tmp_path / "ev").exists()


def test_where_evaluate_finds_the_true_diagnoses(tmp_path, data):
    import lesions

    root = tmp_path / "data"
    found = lesions.diagnosis_truth(None, str(root / "masks"))  # metadata.csv in the folder above
    assert found == {p.image_id: p.diagnosis for p in data}
    gt = tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv"
    gt.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_0000000,0,0,0,0,0,0,1.0\n")
    assert lesions.diagnosis_truth(str(gt), str(root / "masks")) == {"ISIC_0000000": "vasc"}
    assert lesions.diagnosis_truth(None, str(tmp_path / "elsewhere" / "masks")) is None
    gt.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n")
    with pytest.raises(lesions.CliError, match="holds no diagnosis labels"):
        lesions.diagnosis_truth(str(gt), None)
    gt.write_text("image_id,age\nISIC_0000000,50\n")
    with pytest.raises(diagnosis_labels.LabelFileError, match="header lacks image, MEL"):
        lesions.diagnosis_truth(str(gt), None)
    labelled = lesions.with_labels([p.__class__(p.image_id, p.image_path, p.mask_path) for p in data], found)
    assert [p.diagnosis for p in labelled] == ["mel", "nv", "nv", "bcc"]


def test_tta_averages_the_class_probabilities():
    from lesionkit.tta import TRANSFORMS, detect_tta

    class Alternating:
        """The first variant says class 0 for sure, the others class 1 (detect_tta makes one
        detect call over all variants)."""

        def detect(self, images, verbose=0):
            results = []
            for k, image in enumerate(images):
                masks = np.ones(image.shape[:2] + (1,), bool)
                results.append({"rois": np.array([[0, 0, 8, 8]]), "class_ids": np.array([1]),
                                "scores": np.array([0.9]), "masks": masks,
                                "class_probs": np.array([1.0, 0.0] if k == 0 else [0.0, 1.0])})
            return results

    merged = detect_tta(Alternating(), np.zeros((8, 8, 3), np.uint8))
    n = len(TRANSFORMS)
    np.testing.assert_allclose(merged["class_probs"], [1 / n, (n - 1) / n])
