"""Test helper: write Matterport-style Keras-2 HDF5 weight files with h5py only.

The deterministic weight rule and the layout are those of ../shared/reference/README.md and
MATTERPORT_API.md §8.2 (fixed-length byte-string attributes, keras_version "2.2.4", only the
weighted layers listed), i.e. a file that loads into real Matterport.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np

HEAD_GAINS = {"rpn_class_raw": 2.0, "mrcnn_class_logits": 8.0, "mrcnn_bbox_fc": 2.0, "mrcnn_mask": 16.0}


def det_value(weight_name: str, shape: Any) -> np.ndarray:
    """The reference README's deterministic value of one weight array."""
    rs = np.random.RandomState(zlib.crc32(weight_name.encode("utf-8")))
    kind = weight_name.split("/")[-1].split(":")[0]
    shape = tuple(int(s) for s in shape)
    if kind == "kernel":
        gain = HEAD_GAINS.get(weight_name.split("/")[0], 0.5)
        v = rs.standard_normal(size=shape) * (gain / float(np.sqrt(np.prod(shape[:-1]))))
    elif kind in ("bias", "beta", "moving_mean"):
        v = rs.standard_normal(size=shape) * 0.05
    elif kind in ("gamma", "moving_variance"):
        v = rs.uniform(0.8, 1.2, size=shape)
    else:
        raise ValueError(f"unknown weight kind {kind!r}")
    return v.astype(np.float32)


def load_manifest(reference_dir: Path) -> dict:
    return json.loads((Path(reference_dir) / "mask_rcnn_coco_manifest.json").read_text())


def manifest_layers(manifest: dict, num_classes: int | None = None) -> list[dict]:
    """Manifest layers; with ``num_classes`` the class-specific head shapes are changed to it."""
    layers = json.loads(json.dumps(manifest["layers"]))
    if num_classes is not None:
        per_class = {"mrcnn_class_logits": 1, "mrcnn_bbox_fc": 4, "mrcnn_mask": 1}
        for layer in layers:
            if layer["name"] in per_class:
                for w in layer["weights"]:
                    w["shape"][-1] = per_class[layer["name"]] * num_classes
    return layers


def _bytes_attr(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf8") for v in values])


def write_rule_weights(path: Path, layers: list[dict], full_model_layout: bool = False,
                       str_attrs: bool = False, top_level_group: bool = False) -> dict[str, np.ndarray]:
    """Write the rule weights of ``layers`` (manifest entries) in the Keras-2 layout.

    full_model_layout nests everything under /model_weights (as Keras 2 model.save does);
    str_attrs writes variable-length str attributes (tf_keras + h5py 3) instead of bytes.
    Returns {weight name with layer prefix "layer/weight_name": array}.
    """
    values = {}
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model_layout else f
        if full_model_layout:
            f.attrs["model_config"] = b"{}"
        names = [layer["name"] for layer in layers]
        root.attrs["layer_names"] = names if str_attrs else _bytes_attr(names)
        root.attrs["backend"] = "tensorflow" if str_attrs else b"tensorflow"
        root.attrs["keras_version"] = "2.21.0" if str_attrs else b"2.2.4"
        if top_level_group:
            root.create_group("top_level_model_weights")
        for layer in layers:
            group = root.create_group(layer["name"])
            wnames = [w["name"] for w in layer["weights"]]
            group.attrs["weight_names"] = wnames if str_attrs else _bytes_attr(wnames)
            for w in layer["weights"]:
                arr = det_value(w["name"], w["shape"])
                group.create_dataset(w["name"], data=arr)
                values[f"{layer['name']}/{w['name']}"] = arr
    return values


def shared_coco_rule_file(reference_dir: Path, tmp_path_factory: Any) -> tuple[Path, dict[str, np.ndarray]]:
    """The COCO-manifest rule-weight file, written once per test session and shared by modules."""
    global _SHARED_RULE_FILE
    if _SHARED_RULE_FILE is None:
        path = Path(tmp_path_factory.getbasetemp()) / "rule_coco_shared.h5"
        values = write_rule_weights(path, manifest_layers(load_manifest(reference_dir)))
        _SHARED_RULE_FILE = (path, values)
    return _SHARED_RULE_FILE


_SHARED_RULE_FILE: tuple[Path, dict[str, np.ndarray]] | None = None
