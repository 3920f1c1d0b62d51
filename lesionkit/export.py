"""Export a trained model as SavedModel, ONNX and TFLite files that give the same masks as Keras.

:func:`export_model` writes the requested formats into a staging folder next to the output,
runs every written file on check images and compares it with ``MaskRCNN.detect``
(:func:`agreement`), and only then renames the staging folder to the output folder: a format that
does not agree (or a converter that fails) leaves nothing behind and raises :class:`ExportError`.
The graph that every format carries is :class:`lesionkit.export_graph.DeployableDetector`.

Files in the output folder: ``saved_model/`` (signatures ``serving_default``: ``image`` uint8
[H, W, 3]; ``detect_encoded``: ``image_bytes`` string), ``model.onnx`` (input ``image``),
``model.tflite`` and ``model_float16.tflite`` (signature ``serving_default``, input ``image``),
``export.json`` (what was written, file sizes, the measured agreement).
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrcnn.errors import UserError
from mrcnn.fileio import write_json_atomic

FORMATS = ("saved_model", "onnx", "tflite")
#: Packages each format's converter and runtime need (pip names; requirements-export.txt).
CONVERTER_PACKAGES = {"onnx": ("tf2onnx", "onnx", "onnxruntime")}
ONNX_OPSET = 17
SAVED_MODEL_DIR, ONNX_FILE, TFLITE_FILE, TFLITE_FP16_FILE = ("saved_model", "model.onnx", "model.tflite",
                                                             "model_float16.tflite")


class ExportError(UserError):
    """A format that cannot be written or does not agree with the Keras model."""


@dataclass(frozen=True)
class Tolerance:
    """How close an exported model must be to Keras: box corners (pixels), scores, mask IoU."""

    box_px: int = 1
    score: float = 1e-3
    mask_iou: float = 0.99


#: float32 formats: the issue's figures. float16 TFLite is kept only within these looser ones.
STRICT = Tolerance()
FLOAT16 = Tolerance(box_px=2, score=1e-2, mask_iou=0.95)


@dataclass(frozen=True)
class Agreement:
    """What one exported file gave against Keras over the check images."""

    name: str
    images: int
    detections: int
    same_detections: bool
    box_px: int
    score: float
    mask_iou: float

    def within(self, tolerance: Tolerance) -> bool:
        """True when every figure is inside ``tolerance`` and the detections are the same."""
        return (self.same_detections and self.box_px <= tolerance.box_px and self.score <= tolerance.score
                and self.mask_iou >= tolerance.mask_iou)

    def line(self) -> str:
        """One line: the figures, for the console and the failure message."""
        same = "same detections" if self.same_detections else "DIFFERENT detections (count or class)"
        return (f"{self.name}: {self.images} images, {self.detections} detections, {same}, boxes within "
                f"{self.box_px} px, scores within {self.score:.1e}, mask IoU >= {self.mask_iou:.4f}")


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_formats(text: str) -> tuple[str, ...]:
    """``"saved_model,onnx"`` -> ("saved_model", "onnx"); unknown names -> ExportError."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ExportError(f"--format {text!r}: unknown format {', '.join(unknown) or '(none)'};"
                          f" choose from {','.join(FORMATS)}")
    return tuple(dict.fromkeys(names))


def importable(module: str) -> bool:
    """True when ``module`` imports (installed and working)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_converters(formats: Sequence[str]) -> None:
    """ExportError naming the missing packages of a requested format (before any work)."""
    for fmt in formats:
        missing = [pkg for pkg in CONVERTER_PACKAGES.get(fmt, ()) if not importable(pkg)]
        if missing:
            raise ExportError(f"--format {fmt} needs {', '.join(missing)} (not installed):"
                              " pip install -r requirements-export.txt")


#: How many images of --image the exports are checked on.
CHECK_IMAGES = 4


def check_images(spec: str | None, count: int = CHECK_IMAGES) -> list[np.ndarray]:
    """uint8 RGB images [H, W, 3] to check the exports on: the first ``count`` of ``spec`` (a file,
    folder or glob) or, without it, synthetic lesion images of four sizes (``lesionkit.synthetic``)."""
    if spec is None:
        from lesionkit.synthetic import make_lesion_image

        rng = np.random.default_rng(0)
        return [make_lesion_image(rng, h, w)[0] for h, w in ((192, 256), (300, 240), (128, 160), (450, 600))]
    from lesionkit.prediction_files import list_images
    from mrcnn.imaging import read_image

    paths, _, _ = list_images(spec, "--image")
    return [read_image(path) for path in paths[:count]]


def export_config(config: Any) -> Any:
    """The config the exported graph is built with: one image per batch, float32 (a model trained
    with MIXED_PRECISION exports its float32 weights as a float32 graph: what SavedModel, ONNX and
    TFLite runtimes run everywhere); "square" resizing only (its molded size, and so its anchors,
    are constants)."""
    if config.IMAGE_RESIZE_MODE != "square":
        raise ExportError(f"export needs IMAGE_RESIZE_MODE 'square' (got {config.IMAGE_RESIZE_MODE!r}):"
                          " other modes give a molded size that depends on the image")
    changes = {"MIXED_PRECISION": False} if config.MIXED_PRECISION else {}
    if config.BATCH_SIZE != 1:
        changes.update(IMAGES_PER_GPU=1, GPU_COUNT=1)
    return config.replace(**changes) if changes else config


# ---------------------------------------------------------------------------------------------
# Writers


def serving_functions(detector: Any) -> dict[str, Any]:
    """tf.functions of the detector: ``serving_default`` (uint8 image) and ``detect_encoded`` (bytes)."""
    import tensorflow as tf

    image = tf.function(detector.detect, input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")])
    encoded = tf.function(detector.detect_encoded, input_signature=[tf.TensorSpec([], tf.string, name="image_bytes")])
    return {"serving_default": image, "detect_encoded": encoded}


def write_saved_model(detector: Any, folder: Path) -> list[Path]:
    """SavedModel with both signatures; returns [folder]."""
    import tensorflow as tf

    functions = serving_functions(detector)
    tf.saved_model.save(detector, str(folder),
                        signatures={name: fn.get_concrete_function() for name, fn in functions.items()})
    return [folder]


def write_tflite(model: Any, path: Path, float16: bool = False) -> Path:
    """TFLite flatbuffer (builtin ops only, so any LiteRT / tf.lite interpreter runs it) of the
    detector with float32 pre/post-processing and portable ops. One input ("image", resized to each
    image's shape) and four outputs in :data:`OUTPUT_NAMES` order (no signature: the frozen
    graph's nested loops convert only without one)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from lesionkit.export_graph import OUTPUT_NAMES, DeployableDetector
    from mrcnn.portable_ops import portable_ops

    detector = DeployableDetector(model, wide=tf.float32)

    def detect_tuple(image: tf.Tensor) -> tuple[tf.Tensor, ...]:
        outputs = detector.detect(image)
        return tuple(outputs[name] for name in OUTPUT_NAMES)

    spec = [tf.TensorSpec([None, None, 3], tf.uint8, name="image")]
    with portable_ops():
        function = tf.function(detect_tuple, input_signature=spec).get_concrete_function()
    frozen = convert_variables_to_constants_v2(function)  # weights as constants: no READ_VARIABLE ops
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if float16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    path.write_bytes(converter.convert())
    return path


def write_onnx(detector: Any, path: Path) -> Path:
    """ONNX model (opset :data:`ONNX_OPSET`) of the uint8-image function, via tf2onnx."""
    import tensorflow as tf
    import tf2onnx

    from mrcnn.portable_ops import portable_ops

    function = serving_functions(detector)["serving_default"]
    spec = [tf.TensorSpec([None, None, 3], tf.uint8, name="image")]
    with portable_ops():
        tf2onnx.convert.from_function(function, input_signature=spec, opset=ONNX_OPSET, output_path=str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Runners: uint8 image -> {boxes, class_ids, scores, masks} as numpy


def saved_model_runner(folder: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
    return lambda image: {k: v.numpy() for k, v in serve(image=tf.constant(image)).items()}


def tflite_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import tensorflow as tf

    from lesionkit.export_graph import OUTPUT_NAMES

    interpreter = tf.lite.Interpreter(model_path=str(path))
    image_index = interpreter.get_input_details()[0]["index"]
    outputs = [detail["index"] for detail in interpreter.get_output_details()]

    def run(image: np.ndarray) -> dict[str, np.ndarray]:
        interpreter.resize_tensor_input(image_index, image.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(image_index, image)
        interpreter.invoke()
        return {name: interpreter.get_tensor(index) for name, index in zip(OUTPUT_NAMES, outputs, strict=True)}

    return run


def onnx_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda image: dict(zip(names, session.run(None, {"image": image}), strict=True))


# ---------------------------------------------------------------------------------------------
# Agreement


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks [H, W] (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one pixel box [4] with boxes [N, 4] (y1, x1, y2, x2)."""
    y1, x1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    y2, x2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(y2 - y1, 0, None) * np.clip(x2 - x1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1)


def match_detections(ref: dict, out: dict) -> list[int] | None:
    """For each Keras detection (rois, class_ids), the exported detection (boxes, class_ids) of the
    same class whose box overlaps it most, each used once; None when the counts or classes differ.
    (Detections of equal score may come in another order: TopK breaks ties differently.)"""
    if len(out["class_ids"]) != len(ref["class_ids"]):
        return None
    unused, order = set(range(len(out["class_ids"]))), []
    boxes = np.asarray(out["boxes"], np.int64)
    for box, class_id in zip(ref["rois"], ref["class_ids"], strict=True):
        candidates = [j for j in sorted(unused) if out["class_ids"][j] == class_id]
        if not candidates:
            return None
        best = candidates[int(np.argmax(box_iou(box, boxes[candidates])))]
        unused.discard(best)
        order.append(best)
    return order


def compare(name: str, expected: Sequence[dict], got: Sequence[dict]) -> Agreement:
    """Keras ``detect`` results vs an exported model's outputs over the same images."""
    same, box_px, score, iou, detections = True, 0, 0.0, 1.0, 0
    for ref, out in zip(expected, got, strict=True):
        detections += len(ref["class_ids"])
        order = match_detections(ref, out)
        if order is None:
            same = False
            continue
        if not order:
            continue
        box_px = max(box_px, int(np.abs(np.asarray(out["boxes"], np.int64)[order] - ref["rois"]).max()))
        score = max(score, float(np.abs(out["scores"][order] - ref["scores"]).max()))
        iou = min(iou, *(mask_iou(out["masks"][j].astype(bool), ref["masks"][..., k]) for k, j in enumerate(order)))
    return Agreement(name, len(expected), detections, same, box_px, score, iou)


def keras_results(model: Any, images: Sequence[np.ndarray]) -> list[dict]:
    """``model.detect`` on each image (one at a time)."""
    return [model.detect([image], verbose=0)[0] for image in images]


# ---------------------------------------------------------------------------------------------
# The export


@dataclass(frozen=True)
class ExportedFile:
    """One written model: its format name, path relative to the output folder, size and agreement."""

    name: str
    path: str
    bytes: int
    agreement: dict


def size_of(path: Path) -> int:
    """Bytes of a file or of every file under a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_file(name: str, runner: Callable, path: Path, images: Sequence[np.ndarray], expected: Sequence[dict],
               tolerance: Tolerance, root: Path) -> ExportedFile:
    """Run ``path`` on the images; an ExportedFile when it agrees, else ExportError (one line)."""
    got = [runner(image) for image in images]
    agreement = compare(name, expected, got)
    print(f"  {agreement.line()}", flush=True)
    if not agreement.within(tolerance):
        raise ExportError(f"{name} does not agree with the Keras model (allowed: boxes {tolerance.box_px} px,"
                          f" scores {tolerance.score:g}, mask IoU {tolerance.mask_iou}): {agreement.line()}")
    return ExportedFile(name, str(path.relative_to(root)), size_of(path), asdict(agreement))


def write_and_check(formats: Sequence[str], detector: Any, images: Sequence[np.ndarray],
                    expected: Sequence[dict], staging: Path) -> list[ExportedFile]:
    """Write every requested format into ``staging`` and check each (float16 TFLite: kept only if it
    agrees within :data:`FLOAT16`, else removed with a note)."""
    files = []
    if "saved_model" in formats:
        saved_model = convert("saved_model", lambda: write_saved_model(detector, staging / SAVED_MODEL_DIR)[0])
        files.append(check_file("saved_model", saved_model_runner(saved_model), saved_model, images, expected,
                                STRICT, staging))
    if "onnx" in formats:
        path = convert("onnx", lambda: write_onnx(detector, staging / ONNX_FILE))
        files.append(check_file("onnx", onnx_runner(path), path, images, expected, STRICT, staging))
    if "tflite" in formats:
        path = convert("tflite", lambda: write_tflite(detector.model, staging / TFLITE_FILE))
        files.append(check_file("tflite", tflite_runner(path), path, images, expected, STRICT, staging))
        files.extend(float16_variant(detector.model, staging, images, expected))
    return files


def convert(name: str, write: Callable[[], Path]) -> Path:
    """Run a converter; its failure becomes one line naming the format."""
    print(f"Writing {name} ...", flush=True)
    try:
        return write()
    except Exception as exc:  # noqa: BLE001 (converters raise anything; the user needs one line)
        text = converter_message(exc)
        raise ExportError(f"{name} conversion failed: {type(exc).__name__}: {text}") from None


def converter_message(exc: Exception) -> str:
    """The useful part of a converter's exception, on one line (TFLite's lists the ops it lacks)."""
    text = " ".join(str(exc).split())
    ops = text.find("TF Select ops:")
    if ops >= 0:
        return "ops without a TFLite builtin: " + text[ops + len("TF Select ops:"):].split("Details")[0].strip()
    return text[:300]


def float16_variant(model: Any, staging: Path, images: Sequence[np.ndarray],
                    expected: Sequence[dict]) -> list[ExportedFile]:
    """[the float16 TFLite file] when it keeps the masks (:data:`FLOAT16`), else [] (file removed)."""
    path = convert("tflite float16", lambda: write_tflite(model, staging / TFLITE_FP16_FILE, float16=True))
    try:
        return [check_file("tflite_float16", tflite_runner(path), path, images, expected, FLOAT16, staging)]
    except ExportError as exc:
        path.unlink()
        print(f"  not kept: {exc}", flush=True)
        return []


def check_output(output: Path) -> None:
    """ExportError unless ``output`` is absent or an empty folder."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"--output {output} exists and is not an empty folder (export writes a new folder)")


def staging_folder(output: Path) -> Path:
    """A fresh folder next to ``output`` (same file system, so the final rename is atomic)."""
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would stay on the renamed output folder
    return staging


def export_model(model: Any, formats: Sequence[str], output: Path, images: Sequence[np.ndarray],
                 info: dict | None = None) -> list[ExportedFile]:
    """Write ``formats`` of the inference ``model`` (BATCH_SIZE 1, "square" resizing) into ``output``,
    each checked against ``model.detect`` on ``images`` (uint8 RGB [H, W, 3]); see module docstring."""
    from lesionkit.export_graph import OUTPUT_NAMES, DeployableDetector

    check_converters(formats)
    staging = staging_folder(output)
    try:
        expected = keras_results(model, images)
        print(f"Checking against the Keras model on {len(images)} images", flush=True)
        files = write_and_check(formats, DeployableDetector(model), images, expected, staging)
        write_json_atomic(staging / "export.json", {
            **(info or {}), "input": "image: uint8 [H, W, 3] RGB (SavedModel detect_encoded: image_bytes)",
            "outputs": list(OUTPUT_NAMES), "files": [asdict(f) for f in files]})
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files
