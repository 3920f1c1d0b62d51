"""Test helpers shared by several test modules (not a test module): in-memory datasets,
synthetic lesion images, a tiny stand-in backbone and weight snapshots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from mrcnn.dataset import Dataset


class ArrayDataset(Dataset):
    """Images and instance masks held in memory."""

    def __init__(self, pairs):
        super().__init__()
        self.add_class("isic", 1, "lesion")
        for i, (image, masks) in enumerate(pairs):
            self.add_image("isic", i, None, image=image, masks=masks)
        self.prepare()

    def load_image(self, image_id):
        return self.image_info[image_id]["image"]

    def load_mask(self, image_id):
        masks = self.image_info[image_id]["masks"]
        return masks, np.ones([masks.shape[-1]], np.int32)


def array_dataset(pairs) -> ArrayDataset:
    return ArrayDataset(pairs)


def lesion_pairs(n: int, size: int = 64, seed: int = 0, empty_every: int = 0):
    """n images [size, size, 3] uint8 with one dark ellipse each, masks bool [size, size, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    pairs = []
    for i in range(n):
        image = rng.normal(190, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        ry, rx = rng.uniform(0.18, 0.32, 2) * size
        mask = (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 <= 1
        if empty_every and i % empty_every == empty_every - 1:
            mask[:] = False
        image[mask] = (rng.normal(90, 10, (mask.sum(), 3))).clip(0, 255).astype(np.uint8)
        pairs.append((image, mask[:, :, None]))
    return pairs


def lesion_image(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image with one large dark rectangle-ish lesion (many proposals overlap it) and its mask."""
    rng = np.random.default_rng(seed)
    image = rng.normal(190, 10, (size, size, 3)).clip(0, 255).astype(np.uint8)
    mask = np.zeros((size, size, 1), bool)
    mask[6:size - 5, 5:size - 6] = True
    image[mask[:, :, 0]] = rng.normal(80, 8, (int(mask.sum()), 3)).clip(0, 255).astype(np.uint8)
    return image, mask


def training_inputs(config, copies: int) -> dict[str, np.ndarray]:
    """``copies`` identical training samples stacked into one batch (dict keyed by INPUT_NAMES)."""
    from mrcnn.input_pipeline import INPUT_NAMES, build_training_sample, get_training_anchors

    dataset = ArrayDataset([lesion_image()])
    sample = build_training_sample(dataset, config, 0, get_training_anchors(config), rng=np.random.default_rng(0))
    return {name: np.stack([sample[name]] * copies) for name in INPUT_NAMES}


def weights_of(keras_model, name, inner=None) -> list[np.ndarray]:
    """Copies of the weights of layer ``name`` (of its sub-layer ``inner``)."""
    layer = keras_model.get_layer(name)
    if inner:
        layer = layer.get_layer(inner)
    return [np.array(w) for w in layer.get_weights()]


def tiny_backbone(image, stage5: bool = True, train_bn: bool | None = False) -> list:
    """Five strided 3x3 convs standing in for ResNet (C1..C5, strides 2..32): CPU float16
    convolution gradients are slow (Eigen fallback, ~1000x float32), so the mixed-precision step
    keeps the float16 layers it differentiates small."""
    from keras import layers as KL

    x, outputs = image, []
    for i, channels in enumerate((8, 16, 16, 32, 32)):
        x = KL.Conv2D(channels, 3, strides=2, padding="same", activation="relu", name=f"tiny_c{i + 1}")(x)
        outputs.append(x)
    return outputs


def tiny_backbone_shapes(image_shape) -> np.ndarray:
    """Feature map sizes of tiny_backbone's P2..P6 (strides 4..64)."""
    return np.array([[math.ceil(image_shape[0] / s), math.ceil(image_shape[1] / s)] for s in (4, 8, 16, 32, 64)])


def exif_rotated_jpeg(path, stored_hw: tuple[int, int] = (60, 100)):
    """Write a JPEG stored as ``stored_hw`` with a white left half and EXIF orientation 6.

    Viewers (and ``read_image(upright=True)``) turn it 90 degrees clockwise: displayed it is
    (w, h) with the white half on top. Returns ``path``.
    """
    from PIL import Image

    h, w = stored_hw
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


# Matterport's balloon sample: VGG Image Annotator data


def write_via_subset(folder: Path, count: int, rng: np.random.Generator) -> None:
    """``count`` sky-blue JPEGs (80x64) with one or two red 'balloons' each, and their via_region_data.json."""
    import json

    import skimage.draw
    import skimage.io

    folder.mkdir(parents=True)
    annotations = {}
    for i in range(count):
        image = np.zeros((64, 80, 3), np.uint8) + np.array([120, 170, 230], np.uint8)
        regions = {}
        for k in range(int(rng.integers(1, 3))):
            cy, cx, ry, rx = int(rng.integers(16, 48)), int(rng.integers(16, 64)), int(rng.integers(6, 12)), \
                int(rng.integers(5, 10))
            angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            xs = [int(round(cx + rx * np.cos(a))) for a in angles]
            ys = [int(round(cy + ry * np.sin(a))) for a in angles]
            rows, cols = skimage.draw.polygon(ys, xs, image.shape[:2])
            image[rows, cols] = (200 + 20 * k, 30, 40)
            regions[str(k)] = {"shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
                               "region_attributes": {}}
        name = f"balloon_{i:02d}.jpg"
        skimage.io.imsave(folder / name, image, check_contrast=False)
        annotations[f"{name}1234"] = {"filename": name, "size": 1234, "regions": regions, "file_attributes": {}}
    annotations["unannotated.jpg0"] = {"filename": "unannotated.jpg", "size": 0, "regions": {}}  # skipped, as VIA
    (folder / "via_region_data.json").write_text(json.dumps(annotations))


class SmallSampleModel:
    """Mixin for the Matterport-sample tests' Config subclasses: a light network at 64 px, a few
    steps, so a sample's training runs in seconds (``class ShapesConfig(SmallSampleModel, Config)``)."""

    IMAGE_MIN_DIM = 64
    IMAGE_MAX_DIM = 64
    RPN_ANCHOR_SCALES = (4, 8, 16, 32, 64)
    TRAIN_ROIS_PER_IMAGE = 32
    STEPS_PER_EPOCH = 2
    VALIDATION_STEPS = 1
    BACKBONE = "resnet18"
    BACKBONE_WIDTH = 16
    TOP_DOWN_PYRAMID_SIZE = 32
    FPN_CLASSIF_FC_LAYERS_SIZE = 64
    RPN_CONV_CHANNELS = 32
    MASK_HEAD_CONV_LAYERS = 1
    MASK_HEAD_CHANNELS = 16
    POST_NMS_ROIS_TRAINING = 200
    POST_NMS_ROIS_INFERENCE = 100
    PRE_NMS_LIMIT = 500
    DETECTION_MAX_INSTANCES = 10


def small_sample_values() -> dict:
    """:class:`SmallSampleModel`'s values as a dict (set on a sample's own Config class)."""
    return {k: v for k, v in vars(SmallSampleModel).items() if k.isupper()}


#: Start of every two-logical-CPU script: quiet TF, deterministic ops, the CPU split into two
#: logical devices (before TensorFlow initialises), the repo and tests/ importable.
_TWO_CPU_PREAMBLE = """\
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
tf.config.experimental.enable_op_determinism()  # else a rare reordering moves an update by ~1e-3
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path[:0] = [{repo!r}, {tests!r}]
from factories import make_config
from helpers import training_inputs
from mrcnn.model import MaskRCNN
from mrcnn.training import compile_training_model, set_trainable
"""


def run_on_two_logical_cpus(body: str, model_dir: Path, timeout: int = 300) -> dict:
    """Run ``body`` (Python source; it prints one ``"RESULT" + json`` line, and may use
    ``MODEL_DIR``) in a fresh interpreter whose CPU is two logical devices (what MirroredStrategy
    needs, and what cannot be set once TensorFlow started here). Returns the RESULT dict; a failed
    run fails the test with the script's stderr."""
    tests = Path(__file__).resolve().parent
    script = (_TWO_CPU_PREAMBLE.format(repo=str(tests.parent), tests=str(tests))
              + f"MODEL_DIR = {str(model_dir)!r}\n" + textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd=tests.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT"):])


def write_plain_dataset(root: Path, n_train: int = 6, n_val: int = 2, size: tuple[int, int] = (64, 80),
                        labels: tuple[str, ...] = ("nv",), seed: int = 3,
                        columns: tuple[str, ...] = ("image_id", "dx", "split")) -> None:
    """Synthetic lesions in the plain layout: ``images/<id>.jpg``, ``masks/<id>_segmentation.png``
    and ``metadata.csv`` with ``columns`` (dx cycles through ``labels``; split train, then val)."""
    import csv

    from lesionkit.synthetic import encode_pair, image_id, make_lesion_image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for index in range(n_train + n_val):
        image, masks = make_lesion_image(np.random.default_rng([seed, index]), *size)
        jpg, png = encode_pair(image, masks)
        name = image_id(index)
        (root / "images" / f"{name}.jpg").write_bytes(jpg)
        (root / "masks" / f"{name}_segmentation.png").write_bytes(png)
        rows.append({"image_id": name, "dx": labels[index % len(labels)],
                     "split": "train" if index < n_train else "val"})
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
