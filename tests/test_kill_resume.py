"""A killed training run loses nothing (issue 7, items 1 and 2): kill it, check, resume, repeat.

One tiny CLI training (tests/data/tiny.toml: 64 px, ResNet-50; here 2 'heads' epochs then 1
'all' epoch, 4 steps each) in one log folder; every resumed run is itself the next subject:

1. fresh run, SIGKILLed half-way through writing the checkpoint of epoch 2 (the test-only hook
   ``MRCNN_TEST_KILL_DURING_SAVE`` of mrcnn/weights.py: deterministic, leaves a torn temp file);
2. ``--weights last``: must resume after epoch 1 in 'heads'; SIGKILL at a random moment while
   the steps of epoch 2 run (after its first step, i.e. once the graph is traced);
3. ``--weights last`` once 'heads' is over (HEADS_EPOCHS lowered to the newest epoch by ``--set``,
   which spares training one more 'heads' epoch in one more TensorFlow process): must go straight
   into 'all' at LEARNING_RATE / 10; SIGINT (Ctrl-C) at a random moment as that stage starts:
   exit 130, the library's and the CLI's (``--weights last``) resume hints, no traceback;
4. a NaN loss (``--set LEARNING_RATE=1e30``, resumed from the epoch-1 checkpoint): one error
   line naming the step and the losses, exit 1, no checkpoint written or touched.

After each fault every ``*.h5`` under the log folder opens with h5py and reads completely
(:func:`mrcnn.weights.read_weight_file`; the optimiser states ``optimizer_lesion_NNNN.h5``:
:func:`mrcnn.optimizer_state.read_optimizer_state`), ``--weights last`` (lesions.find_last_checkpoint,
resolve_train_weights) is the newest complete checkpoint and has its optimiser state beside it
(written first), training.csv and config.json parse, and the next run says where it restarts (and,
in 'heads', that its optimiser continues). Random delays come from KILL_RESUME_SEED (printed).
Each fault costs one TensorFlow start-up, which is most of this file's time.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mrcnn.checkpoints import optimizer_state_path
from mrcnn.optimizer_state import read_optimizer_state
from mrcnn.weights import WeightsError, read_weight_file
from tests.cli_helpers import LESIONS, TF_NOISE, TINY

HEADS_EPOCHS, ALL_EPOCHS, STEPS = 2, 3, 4
SETTINGS = ["--set", f"HEADS_EPOCHS={HEADS_EPOCHS}", "--set", f"ALL_EPOCHS={ALL_EPOCHS}",
            "--set", f"STEPS_PER_EPOCH={STEPS}", "--set", "VALIDATION_STEPS=1"]
TRAIN = ["--mode", "train", "--dataset", "demo", "--config", str(TINY), *SETTINGS]
SEED = int(os.environ.get("KILL_RESUME_SEED", "20261205"))
TIMEOUT = 300  # one process, on two busy cores
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Training:
    """``python lesions.py ARGS`` in a subprocess; stdout lines (split at \\r and \\n) timestamped."""

    def __init__(self, work: Path, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
        full_env.pop("MRCNN_TEST_KILL_DURING_SAVE", None)
        full_env.update(env or {})
        self.lines: list[str] = []
        self.err = ""
        self.changed = threading.Condition()
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(LESIONS), *args], cwd=work, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.readers = [threading.Thread(target=self._read_out, daemon=True),
                        threading.Thread(target=self._read_err, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read_out(self) -> None:
        rest = b""
        while chunk := self.proc.stdout.read1(65536):
            parts = re.split(rb"[\r\n]", rest + chunk)
            rest = parts.pop()
            with self.changed:
                self.lines += [ANSI.sub("", p.decode(errors="replace")) for p in parts if p.strip()]
                self.changed.notify_all()
        with self.changed:
            self.lines.append(ANSI.sub("", rest.decode(errors="replace")))
            self.changed.notify_all()

    def _read_err(self) -> None:
        self.err = self.proc.stderr.read().decode(errors="replace")

    @property
    def out(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, start: int = 0) -> int:
        """Index of the first stdout line at or after ``start`` that matches ``pattern``."""
        deadline = time.monotonic() + TIMEOUT
        regex = re.compile(pattern)
        with self.changed:
            while True:
                for i in range(start, len(self.lines)):
                    if regex.search(self.lines[i]):
                        return i
                if self.proc.poll() is not None and not self.readers[0].is_alive():
                    pytest.fail(f"exited {self.proc.returncode} before printing {pattern!r}:\n"
                                f"{self.out[-3000:]}\n{self.err[-3000:]}")
                if time.monotonic() > deadline:
                    self.proc.kill()
                    pytest.fail(f"no {pattern!r} within {TIMEOUT} s:\n{self.out[-3000:]}")
                self.changed.wait(0.2)

    def stop(self, sig: int | None = signal.SIGKILL) -> int:
        """Send ``sig`` (None: none, just wait) unless it has exited; returns the exit status."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for reader in self.readers:
            reader.join(30)
        self.seconds = time.monotonic() - self.started
        return code


def checkpoint_epochs(logs: Path) -> dict[int, Path]:
    """{epoch: path} of every checkpoint under ``logs``, each checked to open and read completely;
    every other ``*.h5`` must be a complete optimiser state."""
    found = {}
    layer_sets = set()
    for path in sorted(logs.rglob("*.h5")):
        state = re.fullmatch(r"optimizer_lesion_(\d{4})\.h5", path.name)
        if state:
            manifest, arrays = read_optimizer_state(path)  # raises on a torn or partial file
            assert manifest["epoch"] == int(state.group(1)) and "optimizer/own/iteration" in arrays, path
            continue
        layers = read_weight_file(str(path))  # raises on a torn or partial file
        assert layers and all(arrays for arrays in layers.values()), path
        layer_sets.add(tuple(sorted(layers)))
        match = re.fullmatch(r"mask_rcnn_lesion_(\d{4})\.h5", path.name)
        assert match, f"unexpected file {path}"
        found[int(match.group(1))] = path
    assert len(layer_sets) <= 1, "checkpoints of different architectures"
    return found


def check_after_fault(logs: Path, expected_epoch: int) -> Path:
    """Every visible checkpoint is complete; ``--weights last`` is the newest one; logs parse."""
    import lesions

    (run,) = [d for d in logs.iterdir() if d.is_dir()]  # one run folder, reused by every resume
    found = checkpoint_epochs(logs)
    assert sorted(found) == list(range(1, expected_epoch + 1)), (sorted(found), expected_epoch)
    newest = found[expected_epoch]
    assert optimizer_state_path(newest).is_file(), "the newest checkpoint lacks its optimizer state"
    assert lesions.find_last_checkpoint(logs, "lesion") == newest
    assert lesions.resolve_train_weights("last", logs, "lesion") == lesions.StartWeights("last", newest)
    assert json.loads((run / "config.json").read_text())["ALL_EPOCHS"] == ALL_EPOCHS
    with open(run / "training.csv", newline="") as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) <= expected_epoch + 1, epochs
    return newest


def expect_resumed_at(proc: Training, epoch: int, heads_epochs: int = HEADS_EPOCHS) -> int:
    """The run restarts after ``epoch`` in the right stage; returns the index of its stage line."""
    proc.wait_for(rf"^Re-starting from epoch {epoch}$")
    if epoch < heads_epochs:
        return proc.wait_for(rf"^Stage 'heads': epochs {epoch + 1}\.\.{heads_epochs} at learning rate 0\.001 ")
    return proc.wait_for(rf"^Stage 'all': epochs {epoch + 1}\.\.{ALL_EPOCHS} at learning rate 0\.0001 ")


def no_traceback(proc: Training) -> None:
    assert "Traceback" not in proc.out + proc.err, proc.err[-3000:]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def h5_files(logs: Path) -> dict[str, tuple[str, int]]:
    """{name: (sha256, mtime)} of every ``*.h5`` under ``logs`` (checkpoints and optimizer states)."""
    return {str(p.relative_to(logs)): (sha256(p), p.stat().st_mtime_ns) for p in sorted(logs.rglob("*.h5"))}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill")


def test_killed_runs_resume_from_the_newest_complete_checkpoint(work, capsys):
    rng = random.Random(SEED)
    logs = work / "logs"
    survived: list[str] = []

    # 1. fresh run; the checkpoint writer of epoch 2 (last 'heads' epoch) kills itself mid-write
    first = Training(work, *TRAIN, "--weights", "none", env={"MRCNN_TEST_KILL_DURING_SAVE": "mask_rcnn_lesion_0002.h5"})
    assert first.stop(sig=None) == -signal.SIGKILL, first.out[-3000:] + first.err[-3000:]
    assert "Epoch 2/2" in first.out
    check_after_fault(logs, expected_epoch=1)
    (torn,) = list(logs.rglob(".tmp-*.tmp"))  # mrcnn.fileio's temporary name, never *.h5
    with pytest.raises((WeightsError, OSError)):  # what a plain write would have left under the final name
        read_weight_file(str(torn))
    torn_stamp = torn.stat().st_mtime_ns
    assert (torn.parent / "optimizer_lesion_0002.h5").is_file()  # written (complete) before the killed write
    survived.append(f"SIGKILL inside the checkpoint write of epoch 2, temp file half written ({first.seconds:.0f} s run)")

    # 2. resume: after epoch 1, stage 'heads'; SIGKILL at a random moment during the steps of epoch 2
    second = Training(work, *TRAIN, "--weights", "last")
    line = second.wait_for(rf"^Optimizer: continues from its state after epoch 1 \(step {STEPS}, "
                           r"optimizer_lesion_0001\.h5\)$", expect_resumed_at(second, 1))
    line = second.wait_for(rf"^1/{STEPS} ", line)
    delay = rng.uniform(0.0, 0.5)
    time.sleep(delay)
    assert second.stop() == -signal.SIGKILL
    steps = [s for s in second.lines[line:] if re.match(rf"^\d/{STEPS} ", s)]
    epoch = 2 if (torn.parent / "mask_rcnn_lesion_0002.h5").exists() else 1
    newest = check_after_fault(logs, expected_epoch=epoch)
    assert not torn.exists() or torn.stat().st_mtime_ns != torn_stamp, "the resumed run left the torn temp file"
    survived.append(f"SIGKILL {delay:.2f} s after step 1/{STEPS} of epoch 2 "
                    f"(last progress seen: {steps[-1].split(' ')[0] if steps else '-'}; newest {newest.name}; {second.seconds:.0f} s run)")

    # 3. resume once 'heads' is over (here: HEADS_EPOCHS lowered to the newest epoch, which saves
    #    the cost of training a 'heads' epoch in yet another TensorFlow process): straight into
    #    'all' at LEARNING_RATE / 10; Ctrl-C at a random moment as that stage starts
    third = Training(work, *TRAIN, "--set", f"HEADS_EPOCHS={epoch}", "--weights", "last")
    index = expect_resumed_at(third, epoch, heads_epochs=epoch)
    assert not any(s.startswith("Stage 'heads'") for s in third.lines[:index])
    third.wait_for(rf"^Starting at epoch {epoch}\. ", index)
    delay = rng.uniform(0.0, 2.0)
    time.sleep(delay)
    signalled = time.monotonic()
    assert third.stop(signal.SIGINT) == 130, third.out[-3000:] + third.err[-3000:]
    exit_seconds = time.monotonic() - signalled
    no_traceback(third)
    lines = [s for s in third.err.splitlines() if s.strip() and not TF_NOISE.match(s)]
    command = shlex.join(["python", "lesions.py", *TRAIN, "--set", f"HEADS_EPOCHS={epoch}", "--weights", "last"])
    assert lines[-1] == f"lesions: interrupted; complete checkpoints and files are kept. Resume with: {command}"
    assert f"Training interrupted during epoch {epoch + 1}; the checkpoints up to epoch {epoch} are kept in" \
        in third.out, third.out[-2000:]
    assert "model.load_weights(model.find_last())" in third.out and "--resume" not in third.out + third.err
    check_after_fault(logs, expected_epoch=epoch)
    survived.append(f"SIGINT {delay:.2f} s after a resume started the 'all' stage: exit 130 {exit_seconds:.1f} s "
                    f"later, with the resume command ({third.seconds:.0f} s run)")

    with capsys.disabled():
        print(f"\nkill/resume (seed {SEED}): survived {len(survived)} faults:\n  " + "\n  ".join(survived))
    assert len(survived) == 3


def test_nan_loss_stops_with_one_line_and_keeps_the_good_checkpoint(work):
    """Resumed from the kill test's newest checkpoint at LEARNING_RATE 1e30: the loss turns NaN."""
    logs = work / "logs"
    found = checkpoint_epochs(logs)
    if 1 not in found:
        pytest.skip("needs the run left by the kill/resume test")
    before = h5_files(logs)
    proc = Training(work, *TRAIN, "--set", "LEARNING_RATE=1e30", "--weights", str(found[1]))
    code = proc.stop(sig=None)
    no_traceback(proc)
    lines = [s for s in proc.err.splitlines() if s.strip() and not TF_NOISE.match(s)]
    assert code == 1 and len(lines) == 1, proc.out[-2000:] + proc.err[-3000:]
    assert re.match(r"lesions: error: training diverged at epoch 2, step \d+ \(global step \d+\): "
                    r"non-finite \S.*\(loss=.*rpn_class_loss=.*\); last good checkpoint kept in ", lines[0]), lines[0]
    checkpoint_epochs(logs)
    assert h5_files(logs) == before


def test_gradients_are_clipped_to_the_configured_norm():
    """The training optimiser (mrcnn.training.make_optimizer) clips at GRADIENT_CLIP_NORM: a huge
    gradient moves one weight tensor by exactly lr * clip in the first SGD step; a small one is not
    changed; with two tensors neither moves further (whether the norm is per tensor or global)."""
    import numpy as np
    import tensorflow as tf
    from factories import make_config

    from mrcnn.training import make_optimizer

    config = make_config("matterport")
    clip, lr = float(config.GRADIENT_CLIP_NORM), 0.1
    assert clip == 5.0

    def first_update(*grads: np.ndarray) -> list[np.ndarray]:
        variables = [tf.Variable(np.zeros_like(g)) for g in grads]
        make_optimizer(config, lr).apply([tf.constant(g) for g in grads], variables)
        return [v.numpy() for v in variables]

    big = np.full((3, 4), 100.0, np.float32)
    (update,) = first_update(big)
    assert np.linalg.norm(update) == pytest.approx(lr * clip, rel=1e-5)
    assert np.allclose(update / np.linalg.norm(update), -big / np.linalg.norm(big), atol=1e-6)  # direction kept
    small = np.full((2, 2), 0.01, np.float32)
    (update,) = first_update(small)
    assert np.allclose(update, -lr * small, rtol=1e-5)
    updates = first_update(big, 3 * big[:2])
    assert all(np.linalg.norm(u) <= lr * clip * (1 + 1e-5) for u in updates)
    # GRADIENT_CLIP_MODE: per_variable (default) clips each tensor to the norm; global their joint norm
    assert [np.linalg.norm(u) for u in updates] == pytest.approx([lr * clip, lr * clip], rel=1e-5)
    config = make_config("matterport", GRADIENT_CLIP_MODE="global")
    updates = first_update(big, 3 * big[:2])
    joint = np.sqrt(sum(np.sum(u ** 2) for u in updates))
    assert joint == pytest.approx(lr * clip, rel=1e-5)
    big_norm, other_norm = np.linalg.norm(big), np.linalg.norm(3 * big[:2])
    assert np.linalg.norm(updates[0]) / np.linalg.norm(updates[1]) == pytest.approx(big_norm / other_norm, rel=1e-5)


def test_adamw_optimizer_decays_decoupled_and_spares_norm_parameters():
    """OPTIMIZER "adamw": the first step of Keras AdamW by hand (bias-corrected m / sqrt(v) = g / |g|,
    so each weight moves by lr * sign(g)), plus decoupled decay w * lr * ADAMW_WEIGHT_DECAY on a
    kernel and none on a BatchNorm gamma; the L2 loss term is off (its decay is decoupled)."""
    import types

    import keras
    import numpy as np
    from factories import make_config

    from mrcnn.training import TrainingModel, make_optimizer

    config = make_config("matterport", OPTIMIZER="adamw", ADAMW_WEIGHT_DECAY=0.5)
    lr = 0.1
    start = np.array([[2.0, -4.0], [1.0, 8.0]], np.float32)
    grad = np.array([[0.3, -0.2], [-5.0, 0.01]], np.float32)
    kernel, gamma = keras.Variable(start, name="kernel"), keras.Variable(start, name="gamma")
    optimizer = make_optimizer(config, lr, [kernel, gamma])
    assert isinstance(optimizer, keras.optimizers.AdamW)
    optimizer.apply([grad, grad], [kernel, gamma])
    step = lr * grad / (np.abs(grad) + 1e-7)
    assert np.allclose(np.asarray(kernel), start * (1 - lr * 0.5) - step, atol=1e-5)
    assert np.allclose(np.asarray(gamma), start - step, atol=1e-5)
    # built without the variable list: the same rule, by name
    kernel, gamma = keras.Variable(start, name="kernel"), keras.Variable(start, name="gamma")
    make_optimizer(config, lr).apply([grad, grad], [kernel, gamma])
    assert np.allclose(np.asarray(kernel), start * (1 - lr * 0.5) - step, atol=1e-5)
    assert np.allclose(np.asarray(gamma), start - step, atol=1e-5)
    owner = types.SimpleNamespace(mrcnn_config=config)
    assert TrainingModel._l2_weight_decay.fget(owner) == 0.0
    owner.mrcnn_config = make_config("matterport")
    assert TrainingModel._l2_weight_decay.fget(owner) == 0.0001
    assert isinstance(make_optimizer(owner.mrcnn_config, lr), keras.optimizers.SGD)


def test_weights_ema_is_kept_by_the_optimiser_and_written_into_checkpoints(tmp_path):
    """WEIGHTS_EMA 0.5, plain SGD at 0.1 (momentum 0): the average after each step by hand
    (Keras starts it at the first step's weights, then avg = 0.5 avg + 0.5 w); the model keeps its
    own weights. In a fit, EpochCheckpoint saves the average and training goes on with the own
    weights; after fit the model holds the average (what the last checkpoint holds)."""
    import keras
    import numpy as np
    from factories import make_config

    from mrcnn.train_callbacks import EpochCheckpoint, averaged_weights
    from mrcnn.training import make_optimizer

    config = make_config("matterport", WEIGHTS_EMA=0.5, LEARNING_MOMENTUM=0.0)
    w = keras.Variable(np.array([1.0, 2.0], np.float32), name="kernel")
    optimizer = make_optimizer(config, 0.1, [w])
    expected = [([0.9, 1.9], [0.9, 1.9]), ([0.7, 2.0], [0.8, 1.95]), ([0.7, 1.6], [0.75, 1.775])]
    for grad, (own, average) in zip(([1.0, 1.0], [2.0, -1.0], [0.0, 4.0]), expected, strict=True):
        optimizer.apply([np.array(grad, np.float32)], [w])
        with averaged_weights(optimizer):
            np.testing.assert_allclose(np.asarray(w), average, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(w), own, rtol=1e-6)
    with averaged_weights(make_optimizer(make_config("matterport"), 0.1, [w])):  # no average: unchanged
        np.testing.assert_allclose(np.asarray(w), [0.7, 1.6], rtol=1e-6)

    keras_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    saved, own = [], []

    class Model:  # the part of MaskRCNN that EpochCheckpoint uses
        log_dir = str(tmp_path)
        checkpoint_path = str(tmp_path / "mask_rcnn_x_{epoch:04d}.h5")
        epoch = 0

        def save_weights(self, path: str) -> None:
            saved.append([np.array(v) for v in keras_model.get_weights()])

    class OwnWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            own.append([np.array(v) for v in keras_model.get_weights()])

    keras_model.compile(optimizer=make_optimizer(make_config("matterport", WEIGHTS_EMA=0.9), 0.05), loss="mse")
    x, y = np.random.default_rng(0).normal(size=(16, 3)), np.ones((16, 2))
    keras_model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[EpochCheckpoint(Model()), OwnWeights()])
    after = keras_model.get_weights()
    assert not np.allclose(saved[0][0], own[0][0])          # 4 steps: the average lags the weights
    for kept, final in zip(saved[0], after, strict=True):
        np.testing.assert_allclose(kept, final, rtol=1e-6)   # Keras put the average in at the end


def test_ctrl_c_during_a_checkpoint_write_finishes_that_file_first(tmp_path):
    """EpochCheckpoint: stale temp files of a killed write go at train start; a Ctrl-C arriving while
    a finished epoch is being saved lets the file complete, then stops training."""
    import keras

    from mrcnn import weights
    from mrcnn.train_callbacks import EpochCheckpoint

    keras_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])

    class Model:  # the part of MaskRCNN that EpochCheckpoint uses
        log_dir = str(tmp_path)
        checkpoint_path = str(tmp_path / "mask_rcnn_x_{epoch:04d}.h5")
        epoch = 0

        def save_weights(self, path: str) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the file is being written
            time.sleep(0.05)
            weights.save_hdf5_weights(keras_model, path)

    stale = [tmp_path / "mask_rcnn_x_0007.h5.tmp", tmp_path / ".tmp-4242-0123abcd.tmp"]  # older and current names
    for path in stale:
        path.write_bytes(b"torn")
    model = Model()
    callback = EpochCheckpoint(model)
    callback.on_train_begin()
    assert not any(path.exists() for path in stale)
    with pytest.raises(KeyboardInterrupt):
        callback.on_epoch_end(0)
    assert model.epoch == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["mask_rcnn_x_0001.h5"]
    assert list(weights.read_weight_file(str(tmp_path / "mask_rcnn_x_0001.h5"))) == ["dense"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_command_is_shell_quoted():
    import lesions

    assert lesions.resume_hint(["--mode", "train", "--dataset", "my lesions/ü", "--weights=coco"]) == (
        "python lesions.py --mode train --dataset 'my lesions/ü' --weights last")


def test_an_interrupt_that_tensorflow_turns_into_another_error_still_ends_as_keyboardinterrupt():
    import os
    import signal

    from mrcnn.training import run_interruptible

    def step_hit_by_ctrl_c():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here (at once)
        except KeyboardInterrupt:
            raise SystemError("Objects/listobject.c:338: bad argument to internal function") from None
        raise AssertionError("SIGINT did not interrupt")

    with pytest.raises(KeyboardInterrupt):
        run_interruptible(step_hit_by_ctrl_c)

    def plain_error():
        raise SystemError("not an interrupt")

    with pytest.raises(SystemError, match="not an interrupt"):
        run_interruptible(plain_error)
    assert run_interruptible(lambda: 7) == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
