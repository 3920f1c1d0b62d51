"""Smoke and unit tests of benchmarks/dx_classifier.py (issue 14's separate classifier as a peer):
three steps on a tiny synthetic dataset with seven diagnoses, then the JSON line is checked; the
model's layout against a hand count of its parameters; the input, the class weights, the decay
rule and the one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_plain_dataset

from benchmarks import dx_classifier
from lesionkit.diagnosis_labels import HAM10000_CLASSES

HEADLINE = ("balanced_accuracy", "accuracy", "macro_auc", "mel_sensitivity", "mel_specificity")
RUN_KEYS = ("label", "steps", "epochs", "train_seconds", "train_cpu_seconds", "images_per_cpu_second",
            "other_load_share", "own_cpu_share", "n_train", "n_val", "diagnosis", "machine", "git_commit",
            "params", "baseline_classifier")


def write_dx_dataset(root: Path, n_train: int = 24, n_val: int = 16,
                     columns: tuple[str, ...] = ("image_id", "dx", "split")) -> None:
    """Synthetic lesions in the plain layout; dx cycles through the seven HAM10000 classes."""
    write_plain_dataset(root, n_train, n_val, (48, 64), labels=HAM10000_CLASSES, seed=5, columns=columns)


def test_dx_classifier_prints_one_complete_json_line(tmp_path, capsys):
    data = tmp_path / "data"
    write_dx_dataset(data)
    record = tmp_path / "peer.jsonl"
    rc = dx_classifier.main(["--dataset", str(data), "--max-steps", "3", "--max-val", "16", "--batch-size", "8", "--size", "64",
                             "--record", str(record), "--label", "smoke", "--log-every", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert len(lines) == 1, out[-2000:]  # progress goes to stderr
    result = json.loads(lines[0])
    assert json.loads(record.read_text().strip()) == result
    for key in RUN_KEYS:
        assert key in result, key
    assert "step 3 loss" in err
    assert result["label"] == "smoke" and result["steps"] == 3 and result["epochs"] == pytest.approx(1.0)
    assert result["n_train"] == 24 and result["n_val"] == 16 and result["params"] == 2_805_479
    assert result["train_cpu_seconds"] > 0 and result["images_per_cpu_second"] > 0
    assert 0.0 <= result["other_load_share"] <= 1.0
    diagnosis = result["diagnosis"]
    assert diagnosis["n_diagnosed"] == 16
    for key in HEADLINE:
        assert 0.0 <= diagnosis[key] <= 1.0, (key, diagnosis[key])
    for table in ("recall", "precision", "auc"):
        assert set(diagnosis[table]) == set(HAM10000_CLASSES)
        assert all(v is None or 0.0 <= v <= 1.0 for v in diagnosis[table].values()), table
    assert sum(map(sum, diagnosis["confusion_matrix"])) == 16
    assert set(result["machine"]) >= {"cpu", "avx512f", "native_bfloat16"}
    assert result["baseline_classifier"]["balanced_accuracy"] == 0.612
    shift = result["shift"]  # the val images under quality.py's shift check, scored the same way
    assert shift["diagnosis"]["n_diagnosed"] == 16 and result["shift_seed"] == 0
    by_kind = shift["by_shift_diagnosis_accuracy"]
    assert set(by_kind) == {"larger", "smaller", "crop", "colour", "illumination", "vignette", "ruler_hairs"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in by_kind.values())


@pytest.mark.parametrize("columns, message", [(("image_id", "split"), "has no dx column"),
                                              (("image_id", "dx"), "has no split column")])
def test_metadata_without_dx_or_split_is_one_line(tmp_path, capsys, columns, message):
    write_dx_dataset(tmp_path / "data", n_train=2, n_val=1, columns=columns)
    assert dx_classifier.main(["--dataset", str(tmp_path / "data"), "--max-steps", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("dx_classifier: error: ")


def test_missing_dataset_folder_is_one_line(tmp_path, capsys):
    assert dx_classifier.main(["--dataset", str(tmp_path / "nowhere"), "--max-steps", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"dx_classifier: error: dataset folder {tmp_path / 'nowhere'} does not exist"


def resnet_parameters(widths, blocks=(2, 2, 2, 2), classes=7, channels=3):
    """(all, trainable) parameters of ResNet-18's layout counted by hand: bias-free convolutions
    k*k*c_in*c_out, BatchNorm 4 per channel (gamma, beta trainable; moving mean, variance not), a
    1x1 conv + BN shortcut where a block changes the width, dense 256*K + K."""
    total = trainable = 0

    def conv(k, c_in, c_out):
        nonlocal total, trainable
        total += k * k * c_in * c_out
        trainable += k * k * c_in * c_out

    def bn(c):
        nonlocal total, trainable
        total += 4 * c
        trainable += 2 * c

    conv(7, channels, widths[0])
    bn(widths[0])
    c_in = widths[0]
    for width, count in zip(widths, blocks, strict=True):
        for _ in range(count):
            conv(3, c_in, width), bn(width), conv(3, width, width), bn(width)
            if c_in != width:
                conv(1, c_in, width), bn(width)
            c_in = width
    total += c_in * classes + classes
    trainable += c_in * classes + classes
    return total, trainable


def test_half_width_resnet18_has_the_hand_counted_parameters():
    # half width: stem 4,704 + 128; stages 37,376 / 132,352 / 526,848 / 2,102,272; dense 1,799
    assert resnet_parameters((32, 64, 128, 256)) == (2_805_479, 2_800_679)
    model = dx_classifier.resnet18(7, 128)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert (model.count_params(), trainable) == (2_805_479, 2_800_679)
    assert model.get_layer("stem_pool").output.shape[1:] == (32, 32, 32)  # 128 -> 64 -> 32, as torchvision
    assert model.get_layer("stage4_block2_add").output.shape[1:] == (4, 4, 256)
    assert model.output_shape == (None, 7)
    # the same code at full width and 1000 classes is ResNet-18: torchvision's 11,689,512 parameters
    full = dx_classifier.resnet18(1000, 64, widths=(64, 128, 256, 512))
    assert sum(int(np.prod(v.shape)) for v in full.trainable_weights) == 11_689_512
    assert resnet_parameters((64, 128, 256, 512), classes=1000)[1] == 11_689_512


def test_input_is_square_padded_and_mean_subtracted(tmp_path):
    from PIL import Image

    path = tmp_path / "flat.png"
    Image.fromarray(np.full((150, 200, 3), 200, np.uint8)).save(path)  # 200 wide, 150 high
    mean = [123.7, 116.8, 103.9]
    image = np.asarray(dx_classifier.load_image(str(path), 128, mean))
    assert image.shape == (128, 128, 3)
    assert np.allclose(image[:16], -np.array(mean)) and np.allclose(image[112:], -np.array(mean))  # 16 rows each
    assert np.allclose(image[16:112], 200 - np.array(mean), atol=1e-3)  # 200x150 -> 128x96


def test_balanced_class_weights_are_sklearns():
    from sklearn.utils.class_weight import compute_class_weight

    labels = [0] * 6 + [1] * 3 + [2]
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(labels))
    weights = dx_classifier.train_class_weights({"classes": ["a", "b", "c"], "train_labels": labels})
    assert np.allclose(weights, expected)


def test_adamw_decays_kernels_not_batchnorm():
    import keras

    model = dx_classifier.resnet18(7, 32)
    dx_classifier.compile_model(model, lr=0.1, weight_decay=0.5, jit=False)
    before = {v.path: np.array(v) for v in model.trainable_weights}
    model.optimizer.apply([keras.ops.zeros_like(v) for v in model.trainable_weights], model.trainable_weights)
    for v in model.trainable_weights:  # zero gradients: only the decay moves a weight, by 1 - lr * wd
        factor = 1.0 if v.path.endswith(("gamma", "beta")) else 0.95
        assert np.allclose(np.array(v), before[v.path] * factor, atol=1e-6), v.path
