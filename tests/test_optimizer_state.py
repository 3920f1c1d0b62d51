"""A resumed training run goes on with the optimiser state it had (mrcnn.optimizer_state).

Each epoch's ``optimizer_<name>_NNNN.h5`` is written (before the checkpoint) by the real
EpochCheckpoint; a rebuilt model restores it by name. Models: the "small" preset (64 px, a
five-conv stand-in backbone), so a build takes seconds; the round trips step the optimisers on
random gradients (eager: no graph to trace); the resume test trains with fit.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from factories import make_config

from mrcnn.checkpoints import checkpoint_epoch, checkpoints_in, newest_checkpoint, optimizer_state_path
from mrcnn.model import MaskRCNN
from mrcnn.optimizer_state import model_keys, resume, state_variables
from mrcnn.train_callbacks import EpochCheckpoint
from mrcnn.training import compile_training_model, set_trainable


def compiled(config, model_dir: Path, layers: str = "all", checkpoint: Path | None = None,
             model: MaskRCNN | None = None) -> MaskRCNN:
    """A training model (``model`` or a new one), loaded from ``checkpoint``, compiled for ``layers``."""
    model = model or MaskRCNN("training", config, str(model_dir))
    if checkpoint is not None:
        model.load_weights(str(checkpoint), by_name=True, verbose=0)
    set_trainable(model, layers)
    compile_training_model(model.keras_model, config.LEARNING_RATE, config)
    return model


def step(model: MaskRCNN, count: int) -> None:
    """``count`` steps of the model's optimiser on random gradients (0.1 scale)."""
    rng = np.random.default_rng(0)
    variables = model.keras_model.main_optimizer_variables()
    for _ in range(count):
        model.keras_model.optimizer.apply([rng.normal(0, 0.1, v.shape).astype(np.float32) for v in variables],
                                          variables)


def write_epoch(model: MaskRCNN, epoch: int, layers: str = "all") -> Path:
    """Epoch ``epoch``'s files, written as training writes them; returns the checkpoint."""
    callback = EpochCheckpoint(model, save_optimizer=True, layers=layers)
    callback.set_model(model.keras_model)
    callback.on_epoch_end(epoch - 1)
    return Path(model.checkpoint_path.format(epoch=epoch))


def state_of(model: MaskRCNN) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in state_variables(model.keras_model, model_keys(model.keras_model)).items()}


def trainable_of(model: MaskRCNN) -> list[np.ndarray]:
    return [np.array(v) for v in model.keras_model.trainable_variables]


@pytest.mark.parametrize("settings", [{"OPTIMIZER": "sgd"},
                                      {"OPTIMIZER": "adamw", "WEIGHTS_EMA": 0.9, "MIXED_PRECISION": "float16"}],
                         ids=["sgd", "adamw-ema-lossscaled"])
def test_state_round_trips_by_name_into_a_rebuilt_model(tmp_path, settings):
    config = make_config("small", **settings)
    first = compiled(config, tmp_path)
    step(first, 3)
    checkpoint = write_epoch(first, 1)
    state_file = optimizer_state_path(checkpoint)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name, state_file.name]
    saved, own = state_of(first), trainable_of(first)
    slots = {key.rsplit("/", 1)[1] for key in saved if "/slots/" in key}
    assert slots == ({"momentum"} if config.OPTIMIZER == "sgd" else {"momentum", "velocity", "average"})
    assert "optimizer/slots/rpn_model/rpn_conv_shared/kernel:0/momentum" in saved  # the checkpoint's names
    assert int(saved["optimizer/own/iteration"]) == 3

    second = compiled(config, tmp_path, checkpoint=checkpoint)  # other variable objects, the same names
    if config.WEIGHTS_EMA:
        assert "optimizer/loss_scale/dynamic_scale" in saved
        assert any(not np.array_equal(a, b) for a, b in zip(own, trainable_of(second), strict=True))  # the average
    assert resume(second, "all") == f"Optimizer: continues from its state after epoch 1 (step 3, {state_file.name})"
    restored = state_of(second)
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(restored[key], value, err_msg=key)
    for before, after in zip(own, trainable_of(second), strict=True):  # with WEIGHTS_EMA: its own weights again
        np.testing.assert_array_equal(after, before)

    # another trainable set (the next stage): the optimiser starts fresh, saying why
    heads = compiled(config, tmp_path, layers="heads", checkpoint=checkpoint, model=second)
    line = resume(heads, "heads")
    assert re.fullmatch(rf"Optimizer: starts fresh \({state_file.name} holds the state of a stage that trained other "
                        r"weights \(layers='all', \d+ trainable weights; this stage: layers='heads', \d+\)\)", line), line
    assert int(heads.keras_model.optimizer.iterations) == 0
    step(heads, 1)
    write_epoch(heads, 2, "heads")  # once epoch 2's checkpoint is complete, epoch 1's state goes
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [
        checkpoint.name, "mask_rcnn_small_0002.h5", "optimizer_small_0002.h5"]


def test_a_state_that_does_not_fit_is_left_with_one_line(tmp_path):
    config = make_config("small")
    model = compiled(config, tmp_path)
    step(model, 2)
    checkpoint = write_epoch(model, 1)
    state_file = optimizer_state_path(checkpoint)

    def fresh_line(settings=config, change=None) -> str:
        compiled(settings, tmp_path, checkpoint=checkpoint, model=model)
        if change is not None:
            change()
        line = resume(model, "all")
        assert int(model.keras_model.optimizer.iterations) == 0, line
        return line

    weight = model.keras_model.get_layer("mrcnn_class_logits").kernel
    assert fresh_line(change=lambda: weight.assign(weight + 1.0)) == (
        f"Optimizer: starts fresh ({state_file.name} was saved with other weights than the model holds"
        " (not this checkpoint's state))")
    assert fresh_line(make_config("small", OPTIMIZER="adamw")) == (
        f"Optimizer: starts fresh ({state_file.name} is the state of optimizer SGD, not of optimizer AdamW)")
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])  # what a plain (not atomic) write could leave
    assert fresh_line().startswith(f"Optimizer: starts fresh ({state_file} is not a readable optimizer state "
                                   "(truncated or corrupt?)")
    state_file.unlink()
    assert fresh_line() == (f"Optimizer: starts fresh (no {state_file.name} beside the checkpoint of epoch 1:"
                            " SAVE_OPTIMIZER_STATE was off, or an older version trained it)")


def test_state_files_are_never_taken_for_weights(tmp_path):
    run = tmp_path / "small20260101T0000"
    run.mkdir()
    for name in ("mask_rcnn_small_0001.h5", "mask_rcnn_small_0002.h5", "optimizer_small_0001.h5",
                 "optimizer_small_0002.h5", "optimizer_small_0003.h5"):  # 0003: killed before its checkpoint
        (run / name).write_bytes(b"")
    assert optimizer_state_path(run / "mask_rcnn_small_0002.h5") == run / "optimizer_small_0002.h5"
    assert checkpoint_epoch(run / "optimizer_small_0003.h5") is None
    assert [p.name for p in checkpoints_in(run)] == ["mask_rcnn_small_0001.h5", "mask_rcnn_small_0002.h5"]
    assert newest_checkpoint(tmp_path, "small") == run / "mask_rcnn_small_0002.h5"
    with pytest.raises(ValueError, match="not a checkpoint name"):
        optimizer_state_path(run / "optimizer_small_0002.h5")


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    """AdamW, N steps then N more: uninterrupted (the epoch-1 files written by EpochCheckpoint in
    fit), and resumed in a rebuilt model from those files. Same batch every step, TF op determinism.
    The ROI sampling draws from TensorFlow's random stream, which starts again with each traced
    train function: the uninterrupted run re-seeds and re-traces where the resumed one starts, so
    both draw the same. Measured: restored, identical to the bit; without the restore (what
    training did before) up to 5e-3 apart."""
    import keras
    import tensorflow as tf
    from helpers import training_inputs
    from tensorflow.python.framework import config as tf_config

    steps = 3
    config = make_config("small", OPTIMIZER="adamw", LEARNING_RATE=1e-3, STEPS_PER_EPOCH=steps, VALIDATION_STEPS=0)
    batches = tf.data.Dataset.from_tensors(training_inputs(config, 1)).repeat()
    was_deterministic = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        reference = compiled(config, tmp_path)
        saving = EpochCheckpoint(reference, save_optimizer=True, layers="all")
        reference.keras_model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[saving],
                                  shuffle=False)
        keras.utils.set_random_seed(11)
        reference.keras_model.make_train_function(force=True)
        reference.keras_model.fit(batches, steps_per_epoch=steps, initial_epoch=1, epochs=2, verbose=0, shuffle=False)
        checkpoint = Path(reference.checkpoint_path.format(epoch=1))

        resumed, ends = None, {}
        for restore in (False, True):
            resumed = compiled(config, tmp_path, checkpoint=checkpoint, model=resumed)
            if restore:
                assert resume(resumed, "all").startswith("Optimizer: continues from its state after epoch 1 (step 3,")
            keras.utils.set_random_seed(11)
            resumed.keras_model.fit(batches, steps_per_epoch=steps, initial_epoch=1, epochs=2, verbose=0,
                                    shuffle=False)
            ends[restore] = trainable_of(resumed)
    finally:
        if not was_deterministic:
            tf_config.disable_op_determinism()
    want = trainable_of(reference)
    worst = {restore: max(float(np.abs(a - b).max()) for a, b in zip(want, end, strict=True))
             for restore, end in ends.items()}
    assert worst[True] <= 1e-6, worst
    assert worst[False] > 1e-4, worst  # a fresh AdamW: its first steps are about lr per weight
