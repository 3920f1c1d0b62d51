"""--mode export: SavedModel, ONNX and TFLite files that agree with the Keras model and run without
our package; bad input refused with one line, exit 2 and no folder left behind.

One tiny ResNet-18 checkpoint (tests/data/tiny.toml, 64 px) with random but well-conditioned
weights (scores spread out, masks not all near the threshold) is exported once by the CLI for
the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import LESIONS, TINY, assert_user_error
from conftest import DATA_DIR
from PIL import Image

from lesionkit import export

#: A real sample (large, landscape) when ../shared/data is present.
REAL_SAMPLE = DATA_DIR / "real_samples" / "images" / "ISIC_0024337.jpg"


def condition_weights(model) -> None:
    """Random weights, but the RPN's and heads' last layers scaled down so that scores differ (a
    random ResNet saturates them: ties at 1.0, which TopK and NMS may break in any order) and boxes
    stay near their anchors and proposals."""
    layer = model.keras_model.get_layer
    for name in ("rpn_class_raw", "rpn_bbox_pred"):
        rpn_layer = layer("rpn_model").get_layer(name)
        rpn_layer.kernel.assign(rpn_layer.kernel * 0.01)
    for name, factor in (("mrcnn_class_logits", 0.01), ("mrcnn_bbox_fc", 0.01), ("mrcnn_mask", 0.3)):
        layer(name).kernel.assign(layer(name).kernel * factor)
    bias = np.zeros(model.config.NUM_CLASSES, np.float32)
    bias[1:] = 1.0
    layer("mrcnn_class_logits").bias.assign(bias)


def make_checkpoint(logs: Path):
    """(inference MaskRCNN, checkpoint path) of a tiny lesion run with config.json."""
    import keras

    import lesions
    from mrcnn.model import MaskRCNN

    config = lesions.build_config(str(TINY), ['BACKBONE="resnet18"'], inference=True)  # a small graph converts faster
    keras.utils.set_random_seed(3)
    model = MaskRCNN("inference", config, str(logs))
    condition_weights(model)
    run = logs / "lesion20260101T0000"
    run.mkdir(parents=True)
    config.save(run / "config.json")
    path = run / "mask_rcnn_lesion_0001.h5"
    model.save_weights(str(path))
    return model, path


def check_images(folder: Path) -> list[Path]:
    """A real sample (when available) and two synthetic images (JPEG, PNG) of other shapes."""
    from lesionkit.synthetic import make_lesion_image

    folder.mkdir()
    rng = np.random.default_rng(1)
    paths = []
    if REAL_SAMPLE.is_file():
        paths.append(Path(shutil.copy(REAL_SAMPLE, folder / REAL_SAMPLE.name)))
    for name, (h, w) in (("synthetic_a.jpg", (150, 200)), ("synthetic_b.png", (240, 180))):
        Image.fromarray(make_lesion_image(rng, h, w)[0]).save(folder / name)
        paths.append(folder / name)
    return paths


def cli_env(**extra: str) -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore", **extra)


def run_export(*args: str, cwd: Path, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LESIONS), "--mode", "export", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(Keras model, export folder, check image paths, checkpoint, work dir) after one CLI export."""
    work = tmp_path_factory.mktemp("export")
    model, checkpoint = make_checkpoint(work / "logs")
    images = check_images(work / "check")
    proc = run_export("--weights", str(checkpoint), "--format", "saved_model,onnx,tflite", "--output",
                      str(work / "exported"), "--image", str(work / "check"), cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return model, work / "exported", images, checkpoint, work, proc.stdout


def test_export_writes_every_format_and_reports_agreement(exported):
    _, out, images, _, work, stdout = exported
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert (out / "model.onnx").stat().st_size > 1_000_000       # the weights are inside
    assert (out / "model.tflite").stat().st_size > 1_000_000
    info = json.loads((out / "export.json").read_text())
    files = {f["name"]: f for f in info["files"]}
    assert {"saved_model", "onnx", "tflite"} <= set(files)
    for name in ("saved_model", "onnx", "tflite"):
        agreement = files[name]["agreement"]
        assert agreement["images"] == len(images) and agreement["same_detections"], agreement
        assert agreement["detections"] > 0, "the conditioned model must detect something to compare"
        assert agreement["box_px"] <= 1 and agreement["score"] <= 1e-3 and agreement["mask_iou"] >= 0.99, agreement
        assert f"{name}: {len(images)} images" in stdout
    assert not [p for p in work.iterdir() if ".partial-" in p.name], "staging folder left behind"


FRESH_TF = """
import sys, numpy as np, tensorflow as tf
image = np.load(sys.argv[2])
model = tf.saved_model.load(sys.argv[1])
out = {k: v.numpy() for k, v in model.signatures["serving_default"](image=tf.constant(image)).items()}
raw = open(sys.argv[4], "rb").read()
encoded = {k: v.numpy() for k, v in model.signatures["detect_encoded"](image_bytes=tf.constant(raw)).items()}
assert all(np.array_equal(out[k], encoded[k]) for k in out), "bytes and pixels differ"
"""
FRESH_TFLITE = """
import sys, numpy as np, tensorflow as tf
image = np.load(sys.argv[2])
interpreter = tf.lite.Interpreter(model_path=sys.argv[1])
index = interpreter.get_input_details()[0]["index"]
interpreter.resize_tensor_input(index, image.shape)
interpreter.allocate_tensors()
interpreter.set_tensor(index, image)
interpreter.invoke()
values = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
out = dict(zip(["boxes", "class_ids", "scores", "masks"], values))
"""
FRESH_ONNX = """
import sys, numpy as np, onnxruntime
image = np.load(sys.argv[2])
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": image})))
"""
FRESH_END = """
assert not any(m.split(".")[0] in ("mrcnn", "lesionkit", "lesions") for m in sys.modules), "our code was imported"
np.savez(sys.argv[3], **out)
"""


@pytest.mark.parametrize("name,path,code", [
    pytest.param("saved_model", "saved_model", FRESH_TF, id="saved_model"),
    pytest.param("tflite", "model.tflite", FRESH_TFLITE, id="tflite"),
    pytest.param("onnx", "model.onnx", FRESH_ONNX, id="onnx"),
])
def test_exported_file_runs_without_our_code(exported, tmp_path, name, path, code):
    from mrcnn.imaging import read_image

    model, out, images, _, _, _ = exported
    sample = images[0]  # the real sample when ../shared/data is present
    image = read_image(sample)
    np.save(tmp_path / "image.npy", image)
    Image.fromarray(image).save(tmp_path / "image.png")  # lossless: decoded bytes = the pixels
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code + FRESH_END), str(out / path),
                           str(tmp_path / "image.npy"), str(tmp_path / "out.npz"), str(tmp_path / "image.png")],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / "out.npz"))
    assert got["masks"].shape[1:] == image.shape[:2] and got["masks"].dtype == np.uint8
    agreement = export.compare(name, export.keras_results(model, [image]), [got])
    assert agreement.within(export.STRICT), agreement.line()


def test_float16_tflite_is_kept_only_when_it_agrees(exported):
    _, out, _, _, _, stdout = exported
    files = {f["name"]: f for f in json.loads((out / "export.json").read_text())["files"]}
    if (out / "model_float16.tflite").exists():
        agreement = export.Agreement(**files["tflite_float16"]["agreement"])
        assert agreement.within(export.FLOAT16), agreement.line()
        assert (out / "model_float16.tflite").stat().st_size < 0.6 * (out / "model.tflite").stat().st_size
    else:
        assert "tflite_float16" not in files and "not kept: tflite_float16" in stdout


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.mark.parametrize("args,words", [
    pytest.param(["--format", "saved_model,keras"], ["keras", "saved_model,onnx,tflite"], id="unknown-format"),
    pytest.param(["--set", "FPN_CLASSIF_FC_LAYERS_SIZE=32"], ["does not match the config"], id="wrong-checkpoint"),
])
def test_bad_export_input_is_one_line_and_leaves_nothing(exported, args, words):
    _, _, _, checkpoint, work, _ = exported
    before = set(work.iterdir())
    proc = run_export("--weights", str(checkpoint), "--output", str(work / "refused"), *args, cwd=work, timeout=300)
    assert_user_error(proc, *words)
    assert set(work.iterdir()) == before


def test_missing_converter_is_named(exported, tmp_path):
    _, _, _, checkpoint, work, _ = exported
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "tf2onnx.py").write_text("raise ImportError('tf2onnx is not installed (test)')\n")
    proc = run_export("--weights", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "out"),
                      cwd=work, timeout=300, PYTHONPATH=str(blocker))
    assert_user_error(proc, "--format onnx", "tf2onnx", "requirements-export.txt")
    assert not (tmp_path / "out").exists()


def test_occupied_output_is_refused(exported):
    _, out, _, checkpoint, work, _ = exported
    proc = run_export("--weights", str(checkpoint), "--output", str(out), cwd=work, timeout=300)
    assert_user_error(proc, str(out), "not an empty folder")


def test_disagreeing_format_fails_and_leaves_no_folder(exported, tmp_path, monkeypatch):
    """A written model that answers differently: ExportError naming the format and the figure."""
    model, _, images, _, _, _ = exported
    from lesionkit.export_graph import DeployableDetector

    honest = export.saved_model_runner

    def shifted(folder):
        run = honest(folder)
        return lambda image: {**run(image), "boxes": run(image)["boxes"] + 3}

    monkeypatch.setattr(export, "saved_model_runner", shifted)
    assert DeployableDetector  # the graph module imports without the CLI
    from mrcnn.imaging import read_image

    with pytest.raises(export.ExportError, match=r"saved_model does not agree.*boxes within 3 px"):
        export.export_model(model, ("saved_model",), tmp_path / "out", [read_image(images[-1])])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Pieces (no export)


def test_parse_formats():
    assert export.parse_formats("tflite, saved_model,tflite") == ("tflite", "saved_model")
    with pytest.raises(export.ExportError, match="unknown format pb"):
        export.parse_formats("onnx,pb")
    with pytest.raises(export.ExportError, match="none"):
        export.parse_formats(",")


def test_compare_matches_ties_in_any_order_and_flags_other_classes():
    masks = np.zeros((8, 8, 2), bool)
    masks[:4, :4, 0] = masks[4:, 4:, 1] = True
    ref = {"rois": np.array([[0, 0, 4, 4], [4, 4, 8, 8]]), "class_ids": np.array([1, 1]),
           "scores": np.array([0.9, 0.9], np.float32), "masks": masks}
    swapped = {"boxes": ref["rois"][::-1], "class_ids": np.array([1, 1]), "scores": np.array([0.9, 0.9], np.float32),
               "masks": np.moveaxis(masks, 2, 0)[::-1].astype(np.uint8)}
    same = export.compare("x", [ref], [swapped])
    assert same.same_detections and same.box_px == 0 and same.mask_iou == 1.0
    other = export.compare("x", [ref], [{**swapped, "class_ids": np.array([1, 2])}])
    assert not other.same_detections and not other.within(export.STRICT)


def test_graph_resize_is_bit_identical_to_numpy():
    import tensorflow as tf

    from lesionkit.export_graph import resize_like_numpy
    from mrcnn.imaging import resize

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    for shape in ((48, 64), (200, 270), (97, 131)):
        expected = resize(image, shape, preserve_range=True)
        got = resize_like_numpy(tf.constant(image, tf.float64), *shape).numpy()
        np.testing.assert_array_equal(got, expected)


def test_graph_shades_of_gray_matches_numpy():
    import tensorflow as tf

    from lesionkit.export_graph import shades_of_gray_graph
    from mrcnn.imaging import shades_of_gray

    rng = np.random.default_rng(3)
    image = np.pad(rng.integers(0, 256, (40, 64, 3)), ((12, 12), (0, 0), (0, 0))).astype(np.float64)
    image[..., 2] //= 4  # a strong cast: the blue gain clips at 3
    got = shades_of_gray_graph(tf.constant(image, tf.float64)).numpy()
    np.testing.assert_allclose(got, shades_of_gray(image), rtol=1e-12, atol=1e-9)


def test_portable_crop_and_resize_matches_tf():
    import tensorflow as tf

    from mrcnn import portable_ops

    rng = np.random.default_rng(2)
    image = tf.constant(rng.normal(size=(2, 13, 17, 3)), tf.float32)
    boxes = tf.constant([[0.1, 0.2, 0.7, 0.9], [-0.2, 0.0, 0.5, 1.3], [0.3, 0.3, 0.31, 0.32]], tf.float32)
    indices = tf.constant([0, 1, 1], tf.int32)
    expected = tf.image.crop_and_resize(image, boxes, indices, (7, 7))
    with portable_ops.portable_ops():
        got = portable_ops.crop_and_resize(image, boxes, indices, (7, 7))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    with portable_ops.portable_ops():
        inverse = portable_ops.invert_permutation(tf.constant([2, 0, 3, 1]))
    assert inverse.numpy().tolist() == [1, 3, 0, 2]


def test_export_config_builds_one_image_float32_graphs():
    from factories import make_config

    trained = make_config("tiny", MIXED_PRECISION="bfloat16", IMAGES_PER_GPU=2)
    config = export.export_config(trained)
    assert config.MIXED_PRECISION is False and config.BATCH_SIZE == 1
    assert trained.MIXED_PRECISION == "bfloat16" and trained.BATCH_SIZE == 2  # the caller's config unchanged
    with pytest.raises(export.ExportError, match="IMAGE_RESIZE_MODE 'square'"):
        export.export_config(make_config("tiny", IMAGE_RESIZE_MODE="pad64"))
