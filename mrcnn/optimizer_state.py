"""The optimiser's state beside each checkpoint, so that a resumed run goes on with it.

A checkpoint ``mask_rcnn_<name>_NNNN.h5`` holds weights. Beside it ``optimizer_<name>_NNNN.h5``
(:func:`mrcnn.checkpoints.optimizer_state_path`) holds what the optimisers keep besides them (the
model's, and the image head's own with DIAGNOSIS_OPTIMIZER "adamw"): the slots (SGD momentum, AdamW
first and second moments, the WEIGHTS_EMA average), the step count, a LossScaleOptimizer's loss
scale and step counter, and with WEIGHTS_EMA the model's own trainable weights (the checkpoint holds
their average). Not the learning rate: the stage and LR_SCHEDULE set it. Without the file a resume
restarts the optimiser; fresh AdamW moments make its first steps about lr per weight, whatever the
gradients. Only the newest checkpoint's state is kept (EpochCheckpoint removes the previous one);
SAVE_OPTIMIZER_STATE = false stops the writing. Size, measured for ham10000_dx (128 px, ResNet-18
width 32, AdamW, 7 classes; 5.27 M trainable weights): 42.5 MB beside a 21.4 MB checkpoint, written
in 0.45 s on a 2-core CPU.

Keys, not positions: a slot is stored under the checkpoint's name of the weight it belongs to
(``<layer>/<weight name>``, :func:`mrcnn.weights.layer_weight_entries`) and the slot's name, e.g.
``optimizer/slots/rpn_model/rpn_conv_shared/kernel:0/momentum``; the other variables under their
names (``optimizer/own/iteration``, ``optimizer/loss_scale/dynamic_scale``), the model's own weights
under ``weights/<layer>/<weight name>``; so the file fits any rebuild of the same model. ``/manifest``
(JSON) records the epoch, the stage's ``layers``, each optimiser's class and trainable weights
(names, shapes) and the sha256 of the trainable weights the checkpoint holds.

Order: :class:`mrcnn.train_callbacks.EpochCheckpoint` writes this file, then the checkpoint, each
atomically, under one deferred Ctrl-C; a kill between the two leaves the new epoch's state without
its checkpoint, which no resume reads (it starts from the previous checkpoint, with that one's own
state). :func:`resume` uses the file of the checkpoint's epoch only when its optimisers and
trainable weights are this stage's and the model holds the weights it was saved with (which also
catches a state file left by another run that reached the same epoch); otherwise it says in one line
why the optimiser starts fresh. At a stage boundary (Matterport's 'heads' then 'all': other layers,
another rate) a fresh optimiser is what the schedule means.

Keras 3 internals used (3.15), nothing else: ``optimizer.variables``; ``optimizer._trainable_variables``
(the variables it was built for); ``LossScaleOptimizer.inner_optimizer``; the name Keras gives a
slot, ``<model variable path, '/' -> '_'>_<slot>`` (documented in ``add_variable_from_reference``);
the learning rate is the optimiser variable named ``learning_rate``; the EMA average via
:func:`averaged_weights`. Keras creates an optimiser's variables at its first
step; :func:`mrcnn.training.compile_training_model` builds them at once, for exactly the variables
each optimiser updates (what Keras would build them for), so a state can be assigned before ``fit``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from mrcnn import checkpoints
from mrcnn.errors import UserError
from mrcnn.fileio import atomic_path
from mrcnn.optimizers import keras_class_name
from mrcnn.weights import weighted_layers

#: ``format`` and ``version`` of the manifest.
STATE_FORMAT, STATE_VERSION = "mrcnn-optimizer-state", 1
#: The optimiser variable that is not state (Keras' name for it).
LEARNING_RATE_NAME = "learning_rate"


class OptimizerStateError(UserError):
    """An optimiser state file cannot be read or written for this model (one line naming the file)."""


def _base(optimizer: Any) -> Any:
    return getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's own


# -------------------------------------------------------------------------------------------
# The weights' moving average (WEIGHTS_EMA)


def moving_averages(optimizer: keras.optimizers.Optimizer | None) -> tuple[list, list] | None:
    """(model variables, their moving averages) of an optimiser that keeps an average of the
    weights (Keras ``use_ema``, WEIGHTS_EMA; a LossScaleOptimizer's inner one) and has stepped
    (Keras starts the average at the first step's weights); else None.

    Keras internals: ``_model_variables_moving_average`` is aligned with ``_trainable_variables``.
    """
    inner = _base(optimizer)
    averages = getattr(inner, "_model_variables_moving_average", None) if getattr(inner, "use_ema", False) else None
    if not averages or not inner.built or int(inner.iterations) == 0:
        return None
    return list(inner._trainable_variables), list(averages)


@contextlib.contextmanager
def averaged_weights(optimizer: keras.optimizers.Optimizer | None):
    """Inside the block the model's trainable variables hold ``optimizer``'s moving average of
    them (Keras ``use_ema``, WEIGHTS_EMA); after it their own values again. Unchanged when the
    optimiser keeps no average (:func:`moving_averages`)."""
    pairs = moving_averages(optimizer)
    if pairs is None:
        yield
        return
    variables, averages = pairs
    own = [v.numpy() for v in variables]
    for variable, average in zip(variables, averages, strict=True):
        variable.assign(average)
    try:
        yield
    finally:
        for variable, value in zip(variables, own, strict=True):
            variable.assign(value)


# -------------------------------------------------------------------------------------------
# Stable keys


def model_keys(keras_model: keras.Model) -> dict[int, str]:
    """{id(variable): ``<layer>/<weight name>``}: the checkpoint's name of each model weight."""
    return {id(v): f"{layer}/{name}" for layer, entries in weighted_layers(keras_model).items() for name, v in entries}


def optimizers(keras_model: keras.Model) -> dict[str, keras.optimizers.Optimizer]:
    """The training model's optimisers by role: ``optimizer``, and ``diagnosis_optimizer`` when
    the image head has its own (mrcnn.training.make_diagnosis_optimizer)."""
    found = {"optimizer": keras_model.optimizer}
    if getattr(keras_model, "diagnosis_optimizer", None) is not None:
        found["diagnosis_optimizer"] = keras_model.diagnosis_optimizer
    return found


def _key(variable: Any, keys: dict[int, str]) -> str:
    return keys.get(id(variable)) or variable.path


def _slot_owner(name: str, by_name: dict[str, Any]) -> tuple[Any, str] | None:
    """(model variable, slot name) of the optimiser variable ``name`` = ``<reference>_<slot>``,
    the longest reference that fits; None for a variable of no model variable (``iteration``)."""
    for cut in range(len(name) - 1, 0, -1):
        if name[cut] == "_" and name[:cut] in by_name:
            return by_name[name[:cut]], name[cut + 1:]
    return None


def optimizer_variables(optimizer: keras.optimizers.Optimizer, keys: dict[int, str]) -> dict[str, Any]:
    """{stable key: variable} of every variable of a built ``optimizer`` but its learning rate:
    ``slots/<weight key>/<slot>``, ``own/<name>``, and a LossScaleOptimizer's ``loss_scale/<name>``."""
    base = _base(optimizer)
    inner = {id(v) for v in base.variables}
    entries = {f"loss_scale/{v.name}": v for v in optimizer.variables
               if id(v) not in inner and v.name != LEARNING_RATE_NAME}
    by_name = {v.path.replace("/", "_"): v for v in base._trainable_variables}
    if len(by_name) != len(base._trainable_variables):
        raise OptimizerStateError("two trainable variables have the same path: their optimiser slots cannot be told apart")
    for variable in base.variables:
        if variable.name == LEARNING_RATE_NAME:
            continue
        owner = _slot_owner(variable.name, by_name)
        key = f"own/{variable.name}" if owner is None else f"slots/{_key(owner[0], keys)}/{owner[1]}"
        if key in entries:
            raise OptimizerStateError(f"two optimiser variables would be saved as {key}")
        entries[key] = variable
    return entries


def trainable_weights(keras_model: keras.Model, keys: dict[int, str]) -> dict[str, dict[str, Any]]:
    """{role: {weight key: variable}}: the variables each optimiser was built for (updates)."""
    return {role: {_key(v, keys): v for v in _base(opt)._trainable_variables}
            for role, opt in optimizers(keras_model).items()}


def state_variables(keras_model: keras.Model, keys: dict[int, str]) -> dict[str, Any]:
    """{file key: variable} of the whole state: each optimiser's variables under ``<role>/``; with
    WEIGHTS_EMA (Keras ``use_ema``) also the trainable weights under ``weights/`` (the checkpoint
    holds their average)."""
    found = {f"{role}/{key}": v for role, opt in optimizers(keras_model).items()
             for key, v in optimizer_variables(opt, keys).items()}
    if getattr(_base(keras_model.optimizer), "use_ema", False):
        found.update({f"weights/{key}": v for key, v in trainable_weights(keras_model, keys)["optimizer"].items()})
    return found


def _digest(named: dict[str, Any]) -> str:
    """sha256 of named arrays (keys sorted; dtype and bytes of each)."""
    digest = hashlib.sha256()
    for key in sorted(named):
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(named[key]))
        digest.update(f"{key}\0{value.dtype}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _all_trainable(trainable: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {key: v for weights in trainable.values() for key, v in weights.items()}


def describe(keras_model: keras.Model, keys: dict[int, str]) -> dict[str, dict[str, Any]]:
    """{role: {class, loss_scaled, trainable: {weight key: shape}}}: what must match for a restore."""
    trainable = trainable_weights(keras_model, keys)
    return {role: {"class": keras_class_name(_base(opt)), "loss_scaled": _base(opt) is not opt,
                   "trainable": {key: [int(d) for d in v.shape] for key, v in trainable[role].items()}}
            for role, opt in optimizers(keras_model).items()}


# -------------------------------------------------------------------------------------------
# Files


def save_optimizer_state(keras_model: keras.Model, path: str | os.PathLike, epoch: int, layers: str) -> Path:
    """Write the state of ``keras_model``'s built optimisers after ``epoch`` (1-based) of a stage
    training ``layers`` to ``path``: HDF5, atomically and durably (mrcnn.fileio.atomic_path)."""
    keys = model_keys(keras_model)
    variables = state_variables(keras_model, keys)
    with averaged_weights(keras_model.optimizer):  # what the checkpoint holds
        digest = _digest(_all_trainable(trainable_weights(keras_model, keys)))
    manifest = {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": int(epoch), "layers": str(layers),
                "weights_sha256": digest, "optimizers": describe(keras_model, keys)}
    with atomic_path(path, durable=True, suffix=".tmp") as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("manifest", data=json.dumps(manifest))
        for key, variable in variables.items():
            f.create_dataset(key, data=keras.ops.convert_to_numpy(variable))
    return Path(path)


def read_optimizer_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(manifest, {file key: array}) of an optimiser state file; OptimizerStateError (one line) for
    a file that is missing, torn or not one."""
    arrays: dict[str, np.ndarray] = {}

    def collect(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset) and name != "manifest":
            arrays[name] = np.asarray(item[()])

    try:
        with h5py.File(path, "r") as f:
            manifest = json.loads(f["manifest"][()])
            f.visititems(collect)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:  # h5py's errors on a torn file
        detail = " ".join(str(err).split())[:160]
        raise OptimizerStateError(f"{path} is not a readable optimizer state (truncated or corrupt?): {detail}") from None
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (STATE_FORMAT, STATE_VERSION):
        raise OptimizerStateError(f"{path} is not an optimizer state of version {STATE_VERSION}")
    return manifest, arrays


# -------------------------------------------------------------------------------------------
# Restoring


def _kinds(described: dict[str, Any]) -> str:
    """``optimizer AdamW, diagnosis_optimizer AdamW (loss-scaled)``: the optimisers by role."""
    return ", ".join(f"{role} {d.get('class')}{' (loss-scaled)' if d.get('loss_scaled') else ''}"
                     for role, d in sorted(described.items()))


def _trainable_mismatch(saved: dict[str, Any], now: dict[str, Any], layers: str, saved_layers: str) -> str | None:
    """Why the saved trainable weights are not this stage's (names, then shapes), or None."""
    for role in now:
        before, after = saved[role]["trainable"], now[role]["trainable"]
        if set(before) != set(after):
            return (f"holds the state of a stage that trained other weights (layers={saved_layers!r}, "
                    f"{len(before)} trainable weights; this stage: layers={layers!r}, {len(after)})")
        for key, shape in after.items():
            if list(before[key]) != shape:
                return f"has weight {key} of shape {tuple(before[key])}, the model {tuple(shape)}"
    return None


def state_mismatch(keras_model: keras.Model, manifest: dict[str, Any], arrays: dict[str, np.ndarray],
                   epoch: int, layers: str) -> str | None:
    """Why a saved state does not fit ``keras_model``'s optimisers at ``epoch`` in a stage training
    ``layers`` (a phrase), or None when it fits."""
    keys = model_keys(keras_model)
    if manifest.get("epoch") != epoch:
        return f"was saved after epoch {manifest.get('epoch')}, not {epoch}"
    saved, now = manifest.get("optimizers", {}), describe(keras_model, keys)
    if _kinds(saved) != _kinds(now):
        return f"is the state of {_kinds(saved)}, not of {_kinds(now)}"
    reason = _trainable_mismatch(saved, now, layers, str(manifest.get("layers")))
    if reason:
        return reason
    variables = state_variables(keras_model, keys)
    if set(variables) != set(arrays):
        return "holds other optimiser variables (WEIGHTS_EMA, MIXED_PRECISION or the optimiser's settings changed?)"
    for key, variable in variables.items():
        if tuple(arrays[key].shape) != tuple(variable.shape):
            return f"has {key} of shape {arrays[key].shape}, the optimiser {tuple(variable.shape)}"
    if manifest.get("weights_sha256") != _digest(_all_trainable(trainable_weights(keras_model, keys))):
        return "was saved with other weights than the model holds (not this checkpoint's state)"
    return None


def restore_optimizer_state(keras_model: keras.Model, path: str | os.PathLike, epoch: int, layers: str) -> str:
    """Assign the state in ``path`` to ``keras_model``'s built optimisers (and with WEIGHTS_EMA its
    own weights) when it fits (:func:`state_mismatch`); returns the one line that says which."""
    name = Path(path).name
    try:
        manifest, arrays = read_optimizer_state(path)
    except OptimizerStateError as err:
        return f"Optimizer: starts fresh ({err})"
    reason = state_mismatch(keras_model, manifest, arrays, epoch, layers)
    if reason:
        return f"Optimizer: starts fresh ({name} {reason})"
    variables = state_variables(keras_model, model_keys(keras_model))
    for key, variable in variables.items():
        variable.assign(arrays[key])
    step = int(np.asarray(arrays.get("optimizer/own/iteration", -1)))
    return f"Optimizer: continues from its state after epoch {epoch} (step {step}, {name})"


def resume(model: Any, layers: str) -> str | None:
    """For ``model`` (a MaskRCNN in training mode, compiled) starting a stage training ``layers`` at
    ``model.epoch``: restore the state saved beside that epoch's checkpoint when it fits. Returns
    the line to print (restored, or why the optimiser starts fresh); None at epoch 0."""
    if not model.epoch:
        return None
    path = checkpoints.optimizer_state_path(model.checkpoint_path.format(epoch=model.epoch))
    if not path.is_file():
        return (f"Optimizer: starts fresh (no {path.name} beside the checkpoint of epoch {model.epoch}:"
                " SAVE_OPTIMIZER_STATE was off, or an older version trained it)")
    return restore_optimizer_state(model.keras_model, path, model.epoch, layers)


def state_arrays(keras_model: keras.Model) -> list[np.ndarray]:
    """Values of the whole state (:func:`state_variables`), e.g. for comparing workers."""
    return [keras.ops.convert_to_numpy(v) for v in state_variables(keras_model, model_keys(keras_model)).values()]
