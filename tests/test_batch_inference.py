"""Batch inference: ``MaskRCNN.detect`` with any number of images, and predict in batches.

Models use the tests' "small" preset (a tiny stand-in backbone, 64 px) with deterministic weights
and a class bias that makes the foreground win, so every image has detections to compare.
"""

from __future__ import annotations

import numpy as np
import pytest
from factories import make_config
from matterport_h5 import det_value

from mrcnn.model import MaskRCNN
from mrcnn.weights import weighted_layers

BATCH = 3


def deterministic_model(logs, **overrides) -> MaskRCNN:
    """An inference model of the "small" preset with the reference rule's weights."""
    model = MaskRCNN("inference", make_config("small", **overrides), str(logs))
    for _, entries in weighted_layers(model.keras_model).items():
        for name, variable in entries:
            variable.assign(det_value(name, variable.shape))
    model.keras_model.get_layer("mrcnn_class_logits").bias.assign(np.array([0.0, 6.0], np.float32))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(batch-3 model, batch-1 model) with identical weights."""
    logs = tmp_path_factory.mktemp("logs")
    return deterministic_model(logs, IMAGES_PER_GPU=BATCH), deterministic_model(logs, IMAGES_PER_GPU=1)


def images(count: int, seed: int = 0, sizes=((57, 70), (64, 64), (40, 90))) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, sizes[i % len(sizes)] + (3,), dtype=np.uint8) for i in range(count)]


def assert_same_results(got: list[dict], expected: list[dict]) -> None:
    """Same boxes, classes and masks (a pixel or two may flip at the 0.5 mask threshold), scores to 1e-4."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert len(b["scores"]) > 0
        np.testing.assert_array_equal(a["class_ids"], b["class_ids"])
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
        np.testing.assert_allclose(a["rois"], b["rois"], atol=1)
        assert a["masks"].shape == b["masks"].shape
        assert np.mean(a["masks"] != b["masks"]) < 1e-3


@pytest.mark.parametrize("count", [1, BATCH, BATCH + 1, 2 * BATCH + 2])
def test_any_count_matches_one_by_one(models, count):
    batched, single = models
    inputs = images(count, seed=count)
    expected = [single.detect([image])[0] for image in inputs]
    assert_same_results(batched.detect(inputs), expected)
    assert batched.detect_trace_count == 1 and single.detect_trace_count == 1  # padding keeps one graph


def test_zero_images_give_no_results(models):
    assert models[0].detect([]) == []
    assert models[0].detect_molded(np.zeros((0, 64, 64, 3), np.float32), np.zeros((0, 14), np.float32)) == []


def test_detect_molded_any_count(models):
    batched, single = models
    molded, metas, _ = batched.mold_inputs(images(BATCH + 1, seed=9, sizes=((64, 64),)))
    expected = [single.detect_molded(molded[i:i + 1], metas[i:i + 1])[0] for i in range(len(molded))]
    assert_same_results(batched.detect_molded(molded, metas), expected)


def test_exact_batch_raises_matterports_error(models):
    batched, _ = models
    with pytest.raises(ValueError, match=f"got 2 images .* BATCH_SIZE = {BATCH}"):
        batched.detect(images(2), exact_batch=True)
    with pytest.raises(ValueError, match=f"BATCH_SIZE = {BATCH}"):
        batched.detect_molded(np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 14), np.float32), exact_batch=True)
    assert len(batched.detect(images(BATCH), exact_batch=True)) == BATCH


def test_mixed_shapes_outside_square_mode_run_per_shape(tmp_path):
    """pad64 molds 57x70, 64x64 and 40x90 to three shapes: each runs as its own padded batch."""
    batched = deterministic_model(tmp_path, IMAGES_PER_GPU=BATCH, IMAGE_RESIZE_MODE="pad64", IMAGE_MIN_DIM=64,
                                  IMAGE_MAX_DIM=128)
    single = deterministic_model(tmp_path, IMAGES_PER_GPU=1, IMAGE_RESIZE_MODE="pad64", IMAGE_MIN_DIM=64,
                                  IMAGE_MAX_DIM=128)
    inputs = images(5, seed=4)
    shapes = [batched.mold_inputs([image])[0].shape[1:3] for image in inputs]
    assert shapes == [(64, 128), (64, 64), (64, 192), (64, 128), (64, 64)]
    assert_same_results(batched.detect(inputs), [single.detect([image])[0] for image in inputs])
    assert batched.detect_trace_count <= 2


# -------------------------------------------------------------------------------------------
# predict_images: batches, read-ahead and write-behind


class DarkPixelModel:
    """Stands in for MaskRCNN: lesion = dark pixels; records the batch sizes it was called with."""

    def __init__(self, fail_on_call: int | None = None, error: type[BaseException] = KeyboardInterrupt):
        self.calls: list[int] = []
        self.fail_on_call, self.error = fail_on_call, error

    def detect(self, images, verbose=0):
        self.calls.append(len(images))
        if self.fail_on_call == len(self.calls):
            raise self.error()
        from lesionkit.tta import as_result

        return [as_result(image[..., 0] < 100, 0.9) for image in images]


def write_images(folder, count: int, corrupt: tuple[int, ...] = ()) -> list:
    """``count`` PNGs img_000.png ... (a dark square at a place that depends on i); ``corrupt``
    indices are written as text with a .png name."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.png"
        if i in corrupt:
            path.write_text("not an image")
        else:
            image = np.full((24, 30, 3), 220, np.uint8)
            image[i % 10:i % 10 + 8, i % 7:i % 7 + 9] = 30
            Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def test_predict_images_batches_in_order_with_unreadable_files(tmp_path):
    from lesionkit.prediction_run import PredictOptions, predict_images

    paths = write_images(tmp_path / "in", 11, corrupt=(0, 4))
    seen = []
    model = DarkPixelModel()
    records, unreadable = predict_images(model, paths, tmp_path / "out", PredictOptions(0.5, batch_size=4),
                                         on_result=lambda image_id, result, kept: seen.append(image_id))
    readable = [p for i, p in enumerate(paths) if i not in (0, 4)]
    assert model.calls == [4, 4, 1]
    assert unreadable == ["img_000.png", "img_004.png"]
    assert [r["id"] for r in records] == [p.stem for p in readable] == seen
    for record, path in zip(records, readable, strict=True):
        i = int(path.stem[-3:])
        assert record["instances"][0]["box"] == [i % 10, i % 7, i % 10 + 8, i % 7 + 9]
        assert (tmp_path / "out" / f"{path.stem}_segmentation.png").is_file()


def test_predict_images_tta_in_batches_matches_batch_one(tmp_path):
    from lesionkit.prediction_run import PredictOptions, predict_images

    paths = write_images(tmp_path / "in", 5)
    by_batch = {}
    for batch_size in (1, 3):
        model = DarkPixelModel()
        records, _ = predict_images(model, paths, tmp_path / f"out{batch_size}",
                                    PredictOptions(0.5, tta=True, batch_size=batch_size))
        by_batch[batch_size] = (records, model.calls)
    assert by_batch[3][1] == [12, 8]  # 3 images x 4 variants, then 2 x 4
    assert [r["instances"] for r in by_batch[3][0]] == [r["instances"] for r in by_batch[1][0]]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_predict_leaves_only_complete_files(tmp_path, error):
    from lesionkit.prediction_run import PredictOptions, predict_images

    paths = write_images(tmp_path / "in", 9)
    out = tmp_path / "out"
    with pytest.raises(error):
        predict_images(DarkPixelModel(fail_on_call=3, error=error), paths, out, PredictOptions(0.5, batch_size=2))
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".tmp-")]
    from PIL import Image

    for name in names:  # every file written before the interruption is a complete PNG
        with Image.open(out / name) as image:
            image.load()
    assert {n.split("_")[1] for n in names} <= {"000", "001", "002", "003"}


def test_predict_options_refuse_bad_batch_size():
    from lesionkit.prediction_run import PredictOptions

    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            PredictOptions(0.5, batch_size=bad)


# -------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(work folder, weights file, images folder): deterministic weights for tests/data/tiny.toml."""
    from cli_helpers import TINY

    import lesions
    from lesionkit.synthetic import INPUT_DIR, write_isic_dataset

    work = tmp_path_factory.mktemp("cli")
    config = lesions.build_config(str(TINY), [], inference=True)
    model = MaskRCNN("inference", config, str(work / "logs"))
    for _, entries in weighted_layers(model.keras_model).items():
        for name, variable in entries:
            variable.assign(det_value(name, variable.shape))
    weights = work / "model.h5"
    model.save_weights(str(weights))
    write_isic_dataset(work / "data", 5, seed=3, size=(64, 80))
    (work / "data" / INPUT_DIR / "ISIC_0000002.jpg").write_bytes(b"truncated")
    return work, weights, work / "data" / INPUT_DIR


def test_cli_batch_size_writes_the_same_masks_as_batch_one(checkpoint):
    import json

    from cli_helpers import TINY, run_cli
    from PIL import Image

    work, weights, images_dir = checkpoint
    outputs = {}
    for batch_size in ("1", "3"):
        proc = run_cli("--mode", "predict", "--image", str(images_dir), "--weights", str(weights), "--config",
                       str(TINY), "--batch-size", batch_size, "--output", f"out{batch_size}", cwd=work, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"\n{'BATCH_SIZE':30} {batch_size}\n" in proc.stdout  # the inference config shown
        summary = json.loads((work / f"out{batch_size}" / "summary.json").read_text())
        assert summary["batch_size"] == int(batch_size) and summary["unreadable"] == ["ISIC_0000002.jpg"]
        assert [r["id"] for r in summary["images"]] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003",
                                                        "ISIC_0000004"]
        outputs[batch_size] = summary
    masks_found = 0
    for record in outputs["1"]["images"]:
        name = record["files"]["segmentation"]
        with Image.open(work / "out1" / name) as a, Image.open(work / "out3" / name) as b:
            one, three = np.asarray(a), np.asarray(b)
        assert one.shape == (64, 80) and np.mean(one != three) < 1e-3
        masks_found += int(one.any())
    assert masks_found > 0


def test_cli_evaluate_in_batches_scores_the_same_masks(checkpoint):
    from cli_helpers import TINY, run_cli
    from PIL import Image

    from lesionkit.synthetic import GROUND_TRUTH_DIR

    work, weights, images_dir = checkpoint
    proc = run_cli("--mode", "evaluate", "--images", str(images_dir), "--masks", str(work / "data" / GROUND_TRUTH_DIR),
                   "--weights", str(weights), "--config", str(TINY), "--batch-size", "3", "--output", "eval3",
                   cwd=work, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = sorted(p.name for p in (work / "eval3" / "predictions").glob("*_segmentation.png"))
    assert written == [f"ISIC_000000{i}_segmentation.png" for i in (0, 1, 3, 4)]
    if (work / "out1").is_dir():  # the predict test ran first: the same masks at batch 1
        for name in written:
            with Image.open(work / "out1" / name) as a, Image.open(work / "eval3" / "predictions" / name) as b:
                assert np.mean(np.asarray(a) != np.asarray(b)) < 1e-3


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_cli_bad_batch_size_is_one_line_exit_2(tmp_path, value):
    from cli_helpers import assert_user_error, run_cli

    proc = run_cli("--mode", "predict", "--image", "x.jpg", "--batch-size", value, cwd=tmp_path)
    assert_user_error(proc, "--batch-size", "integer >= 1", value)
