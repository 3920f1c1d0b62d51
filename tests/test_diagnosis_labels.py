"""Diagnosis labels: Task 3 CSVs and metadata.csv dx (lesionkit.diagnosis_labels), the dataset scan's
label counting, LesionDataset's classes, and the config keys of a diagnosing model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from factories import make_config
from PIL import Image

import lesions
from lesionkit import dataset_scan
from lesionkit import diagnosis_labels as dl
from mrcnn.config import ConfigError, derived_num_classes, diagnoses

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
HEADER = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------
# Task 3 CSV


def test_read_task3_csv_reorders_columns_and_strips_extensions(tmp_path):
    # columns shuffled, an extra column, a BOM, an id with .jpg and a blank line
    text = ("\ufeffVASC,image,NV,note,MEL,BCC,AKIEC,BKL,DF\n"
            "0,ISIC_1,0,x,1,0,0,0,0\n\n"
            "0.05,ISIC_2.jpg,0.5,y,0.1,0.1,0.1,0.1,0.05\n")
    table = dl.read_task3_csv(_write(tmp_path / "gt.csv", text))
    assert sorted(table) == ["ISIC_1", "ISIC_2"]
    np.testing.assert_allclose(table["ISIC_1"], [1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(table["ISIC_2"], [0.1, 0.5, 0.1, 0.1, 0.1, 0.05, 0.05])
    assert table["ISIC_2"].dtype == np.float32
    assert dl.labels_from_task3(table) == {"ISIC_1": "mel", "ISIC_2": "nv"}
    assert dl.labels_from_task3({"z": np.zeros(7)}) == {"z": None}


@pytest.mark.parametrize("text, expected", [
    ("", "is empty"),
    ("image,MEL,NV\nISIC_1,1,0\n", "line 1: header lacks BCC, AKIEC, BKL, DF, VASC"),
    (HEADER + "ISIC_1,1,0,0,0,0,0,0\nISIC_2,1,0,zero,0,0,0,0\n", "line 3: BCC value 'zero' is not a number"),
    (HEADER + "ISIC_1,1.5,0,0,0,0,0,0\n", "line 2: MEL value '1.5' is not in [0, 1]"),
    (HEADER + "ISIC_1,nan,0,0,0,0,0,0\n", "line 2: MEL value 'nan' is not in [0, 1]"),
    (HEADER + "ISIC_1,1,0,0,0,0,0,0\nISIC_1,1,0,0,0,0,0,0\n", "line 3: image ISIC_1 is listed twice"),
    (HEADER + "ISIC_1,1,0,0\n", "line 2: 4 values, the header has 8"),
    (HEADER + ",1,0,0,0,0,0,0\n", "line 2: empty image id"),
])
def test_read_task3_csv_bad_files_name_file_and_line(tmp_path, text, expected):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(dl.LabelFileError) as info:
        dl.read_task3_csv(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_read_task3_csv_missing_and_binary_files(tmp_path):
    with pytest.raises(dl.LabelFileError, match="does not exist"):
        dl.read_task3_csv(tmp_path / "none.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(dl.LabelFileError, match="cannot be read"):
        dl.read_task3_csv(tmp_path / "bin.csv")


def test_write_task3_csv_round_trip_and_format(tmp_path):
    probs = dl.to_task3_order([0.01, 0.02, 0.03, 0.04, 0.6, 0.25, 0.05], HAM)  # HAM order in, Task 3 order out
    np.testing.assert_allclose(probs, [0.6, 0.25, 0.02, 0.01, 0.03, 0.04, 0.05], rtol=1e-6)
    path = dl.write_task3_csv(tmp_path / "out" / "diagnosis.csv", [("ISIC_9", probs), ("ISIC_8", np.eye(7)[1])])
    lines = path.read_text().splitlines()
    assert lines[0] == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
    assert lines[1] == "ISIC_9,0.6,0.25,0.02,0.01,0.03,0.04,0.05"
    assert lines[2] == "ISIC_8,0.0,1.0,0.0,0.0,0.0,0.0,0.0"
    back = dl.read_task3_csv(path)
    np.testing.assert_array_equal(back["ISIC_9"], probs)  # exact float32 round trip


def test_write_task3_csv_keeps_tiny_probabilities_apart(tmp_path):
    """A rare class's probabilities far below 1e-6 keep their order (a fixed 6 decimals made them ties)."""
    rows = [("a", [1.0, 0, 0, 0, 0, 0, 3e-8]), ("b", [1.0, 0, 0, 0, 0, 0, 2e-9])]
    path = dl.write_task3_csv(tmp_path / "d.csv", rows)
    assert path.read_text().splitlines()[1:] == ["a,1.0,0.0,0.0,0.0,0.0,0.0,3e-08", "b,1.0,0.0,0.0,0.0,0.0,0.0,2e-09"]
    back = dl.read_task3_csv(path)
    assert back["a"][6] > back["b"][6] > 0
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_name_mapping_and_to_task3_order_refuses_unknown_class():
    assert dl.column_for("mel") == "MEL" and dl.column_for(" Akiec ") == "AKIEC" and dl.dx_for("VASC") == "vasc"
    assert [dl.column_for(c) for c in dl.HAM10000_CLASSES] == ["AKIEC", "BCC", "BKL", "DF", "MEL", "NV", "VASC"]
    with pytest.raises(dl.LabelFileError, match="'lesion' is not an ISIC 2018 Task 3 class"):
        dl.to_task3_order([0.5, 0.5], ["lesion", "mel"])
    # a subset of the classes: the others get 0
    np.testing.assert_allclose(dl.to_task3_order([0.3, 0.7], ["nv", "mel"]), [0.7, 0.3, 0, 0, 0, 0, 0])


def test_read_dx_labels(tmp_path):
    path = _write(tmp_path / "metadata.csv", "image_id,lesion_id,dx,split\n a ,L1, MEL ,train\nb,L2,,val\nc,L3,nv,train\n")
    assert dl.read_dx_labels(path) == {"a": "mel", "b": None, "c": "nv"}
    assert dl.read_dx_labels(_write(tmp_path / "m2.csv", "image_id,split\na,train\n")) == {}
    with pytest.raises(dl.LabelFileError, match="does not exist"):
        dl.read_dx_labels(tmp_path / "none.csv")


# -------------------------------------------------------------------------------------------
# Dataset scan


def _pair(root: Path, image_id: str, images="images", masks="masks") -> None:
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / masks).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), 100).save(root / images / f"{image_id}.png")
    mask = np.zeros((24, 32), np.uint8)
    mask[4:18, 6:20] = 255
    Image.fromarray(mask).save(root / masks / f"{image_id}_segmentation.png")


def test_scan_counts_missing_and_unknown_labels(tmp_path, capsys):
    for image_id in ("a", "b", "c", "d"):
        _pair(tmp_path, image_id)
    _write(tmp_path / "metadata.csv", "image_id,dx,split\na,mel,train\nb,lesion,train\nc,,val\n")  # d: no row
    report, train, val = dataset_scan.scan_and_split(tmp_path, 0.2, 1, classes=HAM)
    assert [(p.image_id, p.diagnosis) for p in report.pairs] == [("a", "mel")]
    assert report.label_unknown == ["b (lesion)"] and report.label_missing == ["c", "d"]
    lines = report.problem_lines()
    assert "2 image(s) without a diagnosis label (skipped): c, d" in lines
    assert "1 image(s) with a diagnosis not in CLASSES (skipped): b (lesion)" in lines
    assert report.to_dict()["diagnoses"] == {"mel": 1}
    out = capsys.readouterr().out
    assert "diagnosis labels from" in out and "mel 1" in out
    # without classes (a one-class model) nothing about labels is read or reported
    plain = dataset_scan.scan_dataset(tmp_path)
    assert len(plain.pairs) == 4 and plain.label_missing == [] and plain.pairs[0].diagnosis is None


def test_scan_for_evaluation_keeps_unlabelled_images(tmp_path):
    for image_id in ("a", "b", "c"):
        _pair(tmp_path, image_id)
    _write(tmp_path / "metadata.csv", "image_id,dx\na,nv\nb,lesion\n")
    report = dataset_scan.scan_dataset(tmp_path, classes=HAM, labels_required=False)
    assert [(p.image_id, p.diagnosis) for p in report.pairs] == [("a", "nv"), ("b", None), ("c", None)]
    assert "1 image(s) without a diagnosis label (segmentation scored, no diagnosis): c" in report.problem_lines()
    assert report.to_dict()["diagnoses"] == {"nv": 1}
    (tmp_path / "metadata.csv").unlink()  # no label at all: still no error, the masks are scored
    assert len(dataset_scan.scan_dataset(tmp_path, classes=HAM, labels_required=False).pairs) == 3


def test_scan_reads_task3_ground_truth_and_counts_a_bad_label_file(tmp_path):
    images, masks = "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"
    for image_id in ("ISIC_1", "ISIC_2"):
        _pair(tmp_path, image_id, images, masks)
    folder = tmp_path / "ISIC2018_Task3_Training_GroundTruth"
    _write(folder / dl.TASK3_GT_NAME, HEADER + "ISIC_1,0,0,1,0,0,0,0\nISIC_2,0,0,0,0,0,0,1\n")
    report = dataset_scan.scan_dataset(tmp_path, classes=HAM)
    assert [(p.image_id, p.diagnosis) for p in report.pairs] == [("ISIC_1", "bcc"), ("ISIC_2", "vasc")]
    # a second, broken ground truth next to the folders: counted and named, the good one still used
    _write(tmp_path / dl.TASK3_GT_NAME, HEADER + "ISIC_1,yes,0,0,0,0,0,0\n")
    report = dataset_scan.scan_dataset(tmp_path, classes=HAM)
    assert len(report.pairs) == 2 and len(report.label_files_bad) == 1
    assert "line 2: MEL value 'yes' is not a number" in report.label_files_bad[0]
    assert any(line.startswith("1 label file(s) that do not parse") for line in report.problem_lines())


def test_scan_without_usable_label_is_one_line_error(tmp_path):
    _pair(tmp_path, "a")
    _pair(tmp_path, "b")
    with pytest.raises(dataset_scan.DatasetLayoutError) as info:
        dataset_scan.scan_dataset(tmp_path, classes=HAM)  # no metadata.csv, no Task 3 file
    message = str(info.value)
    assert "no image with a usable diagnosis label" in message and "metadata.csv" in message and "\n" not in message
    _write(tmp_path / "metadata.csv", "image_id,dx\na,melanoma\nb,foo\n")
    with pytest.raises(dataset_scan.DatasetLayoutError, match=r"2 image\(s\) with a diagnosis not in CLASSES"):
        dataset_scan.scan_dataset(tmp_path, classes=HAM)


def test_lesion_dataset_classes_follow_the_diagnosis_head(tmp_path):
    for image_id in ("a", "b"):
        _pair(tmp_path, image_id)
    _write(tmp_path / "metadata.csv", "image_id,dx\na,mel\nb,nv\n")
    roi = lesions.build_config(None, [f"CLASSES={HAM}".replace("'", '"')])
    image = lesions.build_config(None, [f"CLASSES={HAM}".replace("'", '"'), 'DIAGNOSIS_HEAD="image"'])
    assert (roi.NUM_CLASSES, image.NUM_CLASSES) == (8, 2)
    report = dataset_scan.scan_dataset(tmp_path, classes=lesions.diagnosis_classes(roi))
    roi_set, = lesions.make_datasets(report, ["a", "b"], config=roi)
    assert roi_set.class_names == ["BG", *HAM]
    assert [roi_set.image_info[i]["diagnosis"] for i in (0, 1)] == ["mel", "nv"]
    assert [int(roi_set.load_mask(i)[1][0]) for i in (0, 1)] == [5, 6]   # 1 + index in CLASSES
    image_set, = lesions.make_datasets(report, ["a", "b"], config=image)
    assert image_set.class_names == ["BG", "lesion"]
    assert [int(image_set.load_mask(i)[1][0]) for i in (0, 1)] == [1, 1]
    assert image_set.image_info[1]["diagnosis"] == "nv"
    one, = lesions.make_datasets(dataset_scan.scan_dataset(tmp_path), ["a"])  # default: one class
    assert one.class_names == ["BG", "lesion"] and "diagnosis" not in one.image_info[0]


# -------------------------------------------------------------------------------------------
# Config keys


def test_num_classes_rule_and_predicate():
    one = lesions.LesionConfig()
    assert (one.NUM_CLASSES, diagnoses(one)) == (2, False)
    roi = make_config("tiny", CLASSES=HAM)
    image = make_config("tiny", CLASSES=HAM, DIAGNOSIS_HEAD="image")
    assert (roi.NUM_CLASSES, derived_num_classes(roi), diagnoses(roi)) == (8, 8, True)
    assert (image.NUM_CLASSES, image.IMAGE_META_SIZE, diagnoses(image)) == (2, 14, True)
    with pytest.raises(ConfigError, match="NUM_CLASSES .* follows CLASSES and DIAGNOSIS_HEAD .*got 8"):
        make_config("tiny", CLASSES=HAM, DIAGNOSIS_HEAD="image", NUM_CLASSES=8)


@pytest.mark.parametrize("overrides, expected", [
    ({"DIAGNOSIS_HEAD": "pixel"}, "DIAGNOSIS_HEAD must be roi or image"),
    ({"CLASSES": ["lesion"], "DIAGNOSIS_HEAD": "image"}, "DIAGNOSIS_HEAD image needs two or more CLASSES"),
    ({"CLASSES": HAM, "CLASS_LOSS_WEIGHTS": "inverse"}, "CLASS_LOSS_WEIGHTS must be none, balanced"),
    ({"CLASSES": HAM, "CLASS_LOSS_WEIGHTS": [1, 2]}, "lists 2 weight(s) but CLASSES has 7"),
    ({"CLASSES": HAM, "CLASS_LOSS_WEIGHTS": [1, 1, 1, 0, 1, 1, 1]}, "positive numbers"),
    ({"CLASSES": HAM, "FOCAL_LOSS_GAMMA": -1.0}, "FOCAL_LOSS_GAMMA must be in [0, 10]"),
    ({"CLASSES": HAM, "DIAGNOSIS_LABEL_SMOOTHING": 0.6}, "DIAGNOSIS_LABEL_SMOOTHING must be in [0, 0.5], got 0.6"),
    ({"CLASSES": HAM, "DIAGNOSIS_DROPOUT": 1.0}, "DIAGNOSIS_DROPOUT must be in [0, 1)"),
    ({"CLASSES": HAM, "DIAGNOSIS_LOSS_WEIGHT": -0.5}, "DIAGNOSIS_LOSS_WEIGHT must be >= 0"),
    ({"CLASSES": HAM, "CLASS_BALANCED_SAMPLING": 1.5}, "CLASS_BALANCED_SAMPLING must be in [0, 1]"),
    ({"CLASSES": HAM, "DIAGNOSIS_OPTIMIZER": "adam"}, "DIAGNOSIS_OPTIMIZER must be shared or adamw, got 'adam'"),
    ({"CLASSES": HAM, "DIAGNOSIS_LEARNING_RATE": 0.0}, "DIAGNOSIS_LEARNING_RATE must be > 0, got 0.0"),
    ({"CLASSES": HAM, "DIAGNOSIS_LEARNING_RATE": float("nan")}, "DIAGNOSIS_LEARNING_RATE must be > 0"),
    ({"CLASSES": HAM, "DIAGNOSIS_WEIGHT_DECAY": -0.01}, "DIAGNOSIS_WEIGHT_DECAY must be >= 0, got -0.01"),
    ({"CLASSES": HAM, "DIAGNOSIS_BACKBONE_GRADIENT": -1}, "DIAGNOSIS_BACKBONE_GRADIENT must be >= 0"),
    ({"CLASSES": HAM, "DIAGNOSIS_BACKBONE_GRADIENT": float("inf")}, "DIAGNOSIS_BACKBONE_GRADIENT must be >= 0"),
])
def test_bad_diagnosis_keys_are_refused(overrides, expected):
    with pytest.raises(ConfigError) as info:
        make_config("tiny", **overrides)
    assert expected in str(info.value)


def test_cli_set_class_loss_weights_types():
    config = lesions.build_config("ham10000_dx", ["CLASS_LOSS_WEIGHTS=[1, 2, 3, 4, 5, 6, 7]"])
    assert config.CLASS_LOSS_WEIGHTS == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    # "none" parses as TOML-ish null on the command line: it still means no weights
    assert lesions.build_config("ham10000_dx", ["CLASS_LOSS_WEIGHTS=none"]).CLASS_LOSS_WEIGHTS == "none"
    with pytest.raises(ConfigError, match="CLASS_LOSS_WEIGHTS .* expects none, balanced or a list of numbers"):
        lesions.build_config("ham10000_dx", ["CLASS_LOSS_WEIGHTS=true"])
    preset = lesions.build_config("ham10000_dx", [])
    assert preset.CLASSES == HAM and preset.DIAGNOSIS_HEAD == "roi" and preset.CLASS_LOSS_WEIGHTS == "balanced"
    assert preset.NUM_CLASSES == 1 + len(HAM)


def test_cli_set_diagnosis_optimizer_keys():
    config = lesions.build_config("ham10000_dx", ["DIAGNOSIS_OPTIMIZER=adamw", "DIAGNOSIS_LEARNING_RATE=0.002",
                                                  "DIAGNOSIS_BACKBONE_GRADIENT=0"])
    assert (config.DIAGNOSIS_OPTIMIZER, config.DIAGNOSIS_LEARNING_RATE) == ("adamw", 0.002)
    assert config.DIAGNOSIS_BACKBONE_GRADIENT == 0.0 and isinstance(config.DIAGNOSIS_BACKBONE_GRADIENT, float)
    with pytest.raises(ConfigError, match="DIAGNOSIS_LEARNING_RATE .* expects a number"):
        lesions.build_config("ham10000_dx", ["DIAGNOSIS_LEARNING_RATE=fast"])


# -------------------------------------------------------------------------------------------
# Through the command line


def _labelled_dataset(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    rows = ["image_id,dx,split"]
    for i in range(n):
        image = rng.normal(190, 10, (64, 80, 3)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((64, 80), np.uint8)
        mask[16 + i:48, 20:60 - i] = 255
        image[mask > 0] = 80
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}_segmentation.png")
        rows.append(f"im{i},{['mel', 'nv', 'bcc'][i % 3]},{'val' if i == 5 else 'train'}")
    _write(root / "metadata.csv", "\n".join(rows) + "\n")
    return root


def test_cli_trains_a_diagnosing_model_with_balanced_weights(tmp_path):
    from cli_helpers import TINY, assert_user_error, run_cli

    data = _labelled_dataset(tmp_path / "data")
    classes = '["mel", "nv", "bcc"]'
    proc = run_cli("--mode", "train", "--dataset", str(data), "--config", str(TINY), "--weights", "none",
                   "--set", f"CLASSES={classes}", "--set", "DIAGNOSIS_HEAD=image", "--set", "CLASS_LOSS_WEIGHTS=balanced",
                   "--set", "HEADS_EPOCHS=0", "--set", "ALL_EPOCHS=1", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "diagnosis labels from" in proc.stdout and "bcc 2, mel 2, nv 2" in proc.stdout
    assert "CLASS_LOSS_WEIGHTS balanced (inverse frequency of the training split): mel 2 -> 0.833" in proc.stdout
    run, = (tmp_path / "logs").glob("lesion*")
    import json

    saved = json.loads((run / "config.json").read_text())
    # 5 training images: mel 2, nv 2, bcc 1 -> 5 / (3 n_c)
    assert saved["CLASS_LOSS_WEIGHTS"] == pytest.approx([5 / 6, 5 / 6, 5 / 3], rel=1e-5)
    assert (saved["NUM_CLASSES"], saved["DIAGNOSIS_HEAD"]) == (2, "image")
    assert "mrcnn_diagnosis_loss" in (run / "training.csv").read_text().splitlines()[0]
    # labels that are all unknown: one line, exit 2
    _write(data / "metadata.csv", "image_id,dx\n" + "".join(f"im{i},melanoma\n" for i in range(6)))
    proc = run_cli("--mode", "train", "--dataset", str(data), "--config", str(TINY), "--weights", "none",
                   "--set", f"CLASSES={classes}", cwd=tmp_path, timeout=300)
    assert_user_error(proc, "no image with a usable diagnosis label", "6 image(s) with a diagnosis not in CLASSES")
