"""Keras-2 HDF5 weight files (Matterport's ``mask_rcnn_coco.h5``, our checkpoints), read and
written with h5py only, matched to the model by layer name.

File layout (weights-only; a full-model file has the same under ``/model_weights``): root attr
``layer_names`` (all top-level layers, bytes or str, possibly split into ``layer_names0..``); one
group per layer with attr ``weight_names``; each weight is a dataset at ``<layer>/<weight name>``,
e.g. ``/conv1/conv1/kernel:0`` and ``/rpn_model/rpn_conv_shared/kernel:0``. Never unpickles.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import keras
import numpy as np

from mrcnn import checkpoints
from mrcnn.errors import UserError
from mrcnn.fileio import atomic_path

#: Layers whose weight shapes depend on NUM_CLASSES (skipped with a message on mismatch).
CLASS_SPECIFIC_LAYERS = ("mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_mask")
#: Layers whose weight shapes depend on len(CLASSES): the image-level diagnosis head's last layer
#: (mrcnn.diagnosis; skipped with a message on mismatch).
DIAGNOSIS_CLASS_LAYERS = ("mrcnn_diagnosis_logits",)
#: Layers whose input channel count depends on IMAGE_CHANNEL_COUNT.
INPUT_CHANNEL_LAYERS = ("conv1",)
#: Keras-2 save order within a layer (matches tf_keras: trainable first, BN stats last).
_WEIGHT_ORDER = ("kernel", "depthwise_kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")
#: Layout version written to ``keras_version`` (what Keras-2 loaders such as Matterport's expect).
KERAS2_LAYOUT_VERSION = "2.2.4"
#: HDF5 attributes above this many bytes are split into name0, name1, ... (as Keras 2 does).
_MAX_ATTR_BYTES = 64512
#: Test-only fault hook (tests/test_kill_resume.py): when this environment variable equals the base
#: name of the file being saved, the process SIGKILLs itself half-way through writing the temporary
#: file, exactly as a crash mid-write would. Unset in normal use.
KILL_DURING_SAVE_ENV = "MRCNN_TEST_KILL_DURING_SAVE"


class WeightsError(UserError):
    """A weight file cannot be used with this model (one-line message naming the file)."""


@dataclass
class LoadReport:
    """What :func:`load_hdf5_weights` did, layer by layer."""

    filepath: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, reason)
    only_in_file: list[str] = field(default_factory=list)
    only_in_model: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"Loaded weights of {len(self.loaded)} layers from {self.filepath}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        if self.only_in_file:
            lines.append(f"  {len(self.only_in_file)} weighted layers in the file but not in the model: "
                         + _short_list(self.only_in_file))
        if self.only_in_model:
            lines.append(f"  {len(self.only_in_model)} weighted layers of the model not in the file "
                         "(left unchanged): " + _short_list(self.only_in_model))
        return "\n".join(lines)

    __str__ = summary


# -------------------------------------------------------------------------------------------
# Model side: weighted top-level layers and their Keras-2 weight names


def _short_name(variable: Any) -> str:
    """Variable name without scope or ":0" (``kernel``, ``moving_mean``)."""
    return variable.name.split("/")[-1].split(":")[0]


def _ordered(variables: Iterable[Any]) -> list[Any]:
    def rank(v: Any) -> int:
        name = _short_name(v)
        return _WEIGHT_ORDER.index(name) if name in _WEIGHT_ORDER else len(_WEIGHT_ORDER)
    return sorted(variables, key=rank)  # stable: unknown names keep their order


def layer_weight_entries(layer: keras.layers.Layer) -> list[tuple[str, Any]]:
    """[(Keras-2 weight name, variable)] of one top-level layer, in Keras-2 save order.

    Plain layers: ``<layer>/<var>:0``. Sub-models (``rpn_model``): ``<inner layer>/<var>:0``.
    """
    if isinstance(layer, keras.Model):
        return [(f"{inner.name}/{_short_name(v)}:0", v)
                for inner in layer.layers for v in _ordered(inner.weights)]
    return [(f"{layer.name}/{_short_name(v)}:0", v) for v in _ordered(layer.weights)]


def weighted_layers(keras_model: keras.Model) -> dict[str, list[tuple[str, Any]]]:
    """{layer name: [(weight name, variable)]} for every top-level layer that owns weights."""
    return {layer.name: layer_weight_entries(layer) for layer in keras_model.layers if layer.weights}


# -------------------------------------------------------------------------------------------
# File side


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _read_str_list(attrs: h5py.AttributeManager, name: str) -> list[str] | None:
    """A list-of-strings attribute, also when split into name0, name1, ...; None if absent."""
    if name in attrs:
        return [_text(v) for v in np.atleast_1d(attrs[name])]
    if f"{name}0" in attrs:
        values, i = [], 0
        while f"{name}{i}" in attrs:
            values += [_text(v) for v in np.atleast_1d(attrs[f"{name}{i}"])]
            i += 1
        return values
    return None


def _weights_root(f: h5py.File, filepath: str) -> h5py.Group:
    """The group holding ``layer_names``: the root (weights-only file) or ``/model_weights``."""
    if _read_str_list(f.attrs, "layer_names") is not None:
        return f
    if "model_weights" in f and _read_str_list(f["model_weights"].attrs, "layer_names") is not None:
        return f["model_weights"]
    hint = "; Keras 3 '.weights.h5' files are not supported, save with MaskRCNN.save_weights" if "layers" in f else ""
    raise WeightsError(f"{filepath}: not a Keras-2 weight file (no 'layer_names' attribute at the root "
                       f"or in /model_weights){hint}")


def read_weight_file(filepath: str) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{layer name: [(weight name, array)]} for the weighted layers of a Keras-2 HDF5 file."""
    if not os.path.isfile(filepath):
        raise WeightsError(f"{filepath}: weight file not found")
    if not h5py.is_hdf5(filepath):
        raise WeightsError(f"{filepath} is not a readable HDF5 weights file (not an HDF5 file: another format, "
                           "or truncated or corrupt?)")
    layers: dict[str, list[tuple[str, np.ndarray]]] = {}
    try:
        with h5py.File(filepath, "r") as f:
            root = _weights_root(f, filepath)
            for name in _read_str_list(root.attrs, "layer_names") or []:
                if name not in root:
                    raise WeightsError(f"{filepath}: layer {name!r} is listed in layer_names but has no group")
                group = root[name]
                weight_names = _read_str_list(group.attrs, "weight_names") or []
                if weight_names:
                    layers[name] = [(w, np.asarray(group[w])) for w in weight_names]
    except WeightsError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as err:  # h5py's errors on a torn file
        detail = " ".join(str(err).split())[:200]
        raise WeightsError(f"{filepath} is not a readable HDF5 weights file (truncated or corrupt?): {detail}") from None
    return layers


# -------------------------------------------------------------------------------------------
# Loading


def _weight_key(weight_name: str, nested: bool) -> str:
    """Comparable key of a weight name: ``kernel`` (plain) or ``rpn_conv_shared/kernel`` (sub-model)."""
    parts = weight_name.split(":")[0].split("/")
    return "/".join(parts[-2:]) if nested else parts[-1]


def _pair_weights(layer_name: str, nested: bool, model_entries: list[tuple[str, Any]],
                  file_entries: list[tuple[str, np.ndarray]]) -> list[tuple[Any, np.ndarray]] | str:
    """Pair variables with arrays by weight name (positionally if the names differ).

    Returns the pairs, or a one-line description of the first mismatch.
    """
    if len(model_entries) != len(file_entries):
        return (f"layer {layer_name!r} has {len(model_entries)} weights in the model "
                f"but {len(file_entries)} in the file")
    by_key = {_weight_key(n, nested): a for n, a in file_entries}
    model_keys = [_weight_key(n, nested) for n, _ in model_entries]
    if set(model_keys) == set(by_key):
        pairs = [(v, by_key[k]) for k, (_, v) in zip(model_keys, model_entries, strict=True)]
    else:
        pairs = [(v, a) for (_, v), (_, a) in zip(model_entries, file_entries, strict=True)]
    for (name, _), (variable, array) in zip(model_entries, pairs, strict=True):
        if tuple(variable.shape) != tuple(array.shape):
            return (f"layer {layer_name!r} weight {name}: model expects shape {tuple(variable.shape)}, "
                    f"file has {tuple(array.shape)}")
    return pairs


def load_hdf5_weights(keras_model: keras.Model, filepath: str, by_name: bool = False,
                      exclude: Iterable[str] | None = None, strict: bool = False,
                      verbose: int = 1) -> LoadReport:
    """Load a Keras-2 HDF5 file into ``keras_model``, matching top-level layers by name.

    * ``exclude``: layer names to leave untouched (a non-empty list implies ``by_name``).
    * ``by_name=False`` requires the file to describe this architecture: every weighted layer of
      the file must exist in the model and vice versa (matching is still by name: Keras-2 layer
      order differs between model versions, so positional loading is unsafe).
    * Shape mismatch on class-specific heads (NUM_CLASSES differs) or on ``conv1`` (channel count
      differs): the layer is skipped with a message, or WeightsError if ``strict``. Any other shape
      mismatch means a different architecture: WeightsError naming the file and the layer.
    Returns a :class:`LoadReport` (printed when ``verbose``).
    """
    exclude = set(exclude or ())
    by_name = by_name or bool(exclude)
    file_layers = read_weight_file(filepath)
    model_layers = weighted_layers(keras_model)
    nested = {layer.name for layer in keras_model.layers if isinstance(layer, keras.Model)}
    report = LoadReport(str(filepath))
    report.only_in_file = [n for n in file_layers if n not in model_layers]
    report.only_in_model = [n for n in model_layers if n not in file_layers and n not in exclude]
    if not by_name and (report.only_in_file or report.only_in_model):
        first = (report.only_in_file or report.only_in_model)[0]
        where = "file but not in the model" if report.only_in_file else "model but not in the file"
        raise WeightsError(f"{filepath}: different architecture: layer {first!r} is in the {where} "
                           "(use by_name=True to load the matching layers only)")

    assignments: list[tuple[Any, np.ndarray]] = []
    for name, model_entries in model_layers.items():
        if name not in file_layers:
            continue
        if name in exclude:
            report.skipped.append((name, "excluded"))
            continue
        pairs = _pair_weights(name, name in nested, model_entries, file_layers[name])
        if isinstance(pairs, str):
            tolerated = name in CLASS_SPECIFIC_LAYERS or name in INPUT_CHANNEL_LAYERS or name in DIAGNOSIS_CLASS_LAYERS
            if strict or not tolerated:
                raise WeightsError(f"{filepath}: {pairs}")
            why = ("NUM_CLASSES differs" if name in CLASS_SPECIFIC_LAYERS else
                   "the number of CLASSES differs" if name in DIAGNOSIS_CLASS_LAYERS else "IMAGE_CHANNEL_COUNT differs")
            report.skipped.append((name, f"shape mismatch ({why}): {pairs}"))
            continue
        assignments += pairs
        report.loaded.append(name)
    if not report.loaded and model_layers:
        raise WeightsError(f"{filepath}: no weighted layer of the file matches the model "
                           f"(file layers start with {_short_list(list(file_layers))})")
    for variable, array in assignments:
        variable.assign(array)
    if verbose:
        print(report.summary())
    return report


# -------------------------------------------------------------------------------------------
# Saving


def _str_attr(values: list[str]) -> np.ndarray:
    """Fixed-length byte strings, as Keras 2.0-2.2 + h5py 2 wrote them (readable by every loader)."""
    return np.array([v.encode("utf8") for v in values], dtype=f"S{max([len(v.encode()) for v in values] + [1])}")


def _write_str_list(attrs: h5py.AttributeManager, name: str, values: list[str]) -> None:
    data = _str_attr(values)
    if data.nbytes <= _MAX_ATTR_BYTES:
        attrs[name] = data
        return
    chunks = int(np.ceil(data.nbytes / _MAX_ATTR_BYTES))
    for i, chunk in enumerate(np.array_split(data, chunks)):
        attrs[f"{name}{i}"] = chunk


def save_hdf5_weights(keras_model: keras.Model, filepath: str) -> None:
    """Write every top-level layer's weights in the Keras-2 weights-only layout, atomically.

    The file is written to a temporary file in the same folder (``.tmp-<pid>-<hex>.tmp``, see
    :func:`mrcnn.fileio.atomic_path`), synced to disk, renamed over ``filepath``, and the folder is
    synced: a crash or kill at any moment leaves the previous file (or none) under ``filepath``,
    never a torn one.
    """
    die_at = len(keras_model.layers) // 2 if os.environ.get(KILL_DURING_SAVE_ENV) == os.path.basename(filepath) else -1
    with atomic_path(filepath, durable=True, suffix=".tmp") as tmp, h5py.File(tmp, "w") as f:
        _write_str_list(f.attrs, "layer_names", [layer.name for layer in keras_model.layers])
        f.attrs["backend"] = np.bytes_(b"tensorflow")  # fixed-length: Keras 2 calls .decode() on it
        f.attrs["keras_version"] = np.bytes_(KERAS2_LAYOUT_VERSION.encode())
        for i, layer in enumerate(keras_model.layers):
            if i == die_at:  # test hook, see KILL_DURING_SAVE_ENV
                f.flush()
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
            group = f.create_group(layer.name)
            entries = layer_weight_entries(layer) if layer.weights else []
            if entries:
                _write_str_list(group.attrs, "weight_names", [n for n, _ in entries])
            else:
                group.attrs["weight_names"] = np.array([], dtype=np.float64)
            for name, variable in entries:
                group.create_dataset(name, data=np.asarray(keras.ops.convert_to_numpy(variable)))
        f.flush()


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _float_datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    """Every floating-point dataset of an open weight file, by its path."""
    found: dict[str, h5py.Dataset] = {}

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset) and np.issubdtype(item.dtype, np.floating):
            found[name] = item

    f.visititems(visit)
    return found


def average_weight_files(paths: list[str | os.PathLike], out_path: str | os.PathLike) -> str:
    """Write the element-wise mean of the weight files ``paths`` (the same model's checkpoints,
    e.g. the last epochs of a run: "stochastic weight averaging" of the tail) to ``out_path``,
    atomically; BatchNorm moving statistics are averaged like the other float weights. The
    layout, attributes and any non-float data are those of the last file. Returns ``out_path``.
    Raises WeightsError naming the file whose weights differ in names or shapes."""
    if not paths:
        raise WeightsError("average_weight_files: no weight files given")
    last = str(paths[-1])
    with h5py.File(last, "r") as f:
        reference = {k: (d.shape, d.dtype) for k, d in _float_datasets(f).items()}
        total = {k: np.asarray(d[()], np.float64) for k, d in _float_datasets(f).items()}
    for path in paths[:-1]:
        with h5py.File(path, "r") as f:
            datasets = _float_datasets(f)
            shapes = {k: d.shape for k, d in datasets.items()}
            if shapes != {k: s for k, (s, _) in reference.items()}:
                differ = sorted(set(shapes.items()) ^ {(k, s) for k, (s, _) in reference.items()})
                raise WeightsError(f"{path}: weights differ from {last} in names or shapes"
                                   f" ({_short_list([k for k, _ in differ])}); cannot average them")
            for key, dataset in datasets.items():
                total[key] += dataset[()]
    with atomic_path(out_path, durable=True, suffix=".tmp") as tmp:
        shutil.copyfile(last, tmp)
        with h5py.File(tmp, "r+") as f:
            for key, (_, dtype) in reference.items():
                f[key][...] = (total[key] / len(paths)).astype(dtype)
    return str(out_path)


def write_tail_average(run_dir: str | os.PathLike, count: int) -> Path | None:
    """Average the last ``count`` checkpoints of ``run_dir`` (fewer when fewer exist) into
    :func:`mrcnn.checkpoints.average_path` of the newest; returns that path, or None when ``count``
    < 2 or the folder holds fewer than two checkpoints."""
    tail = checkpoints.checkpoints_in(run_dir)[-int(count):] if count >= 2 else []
    if len(tail) < 2:
        return None
    return Path(average_weight_files(tail, checkpoints.average_path(tail[-1], len(tail))))
