"""LR_SCHEDULE: the cosine callback's rates by hand, through Keras' fit (resume included), and the
stages that lesions.py runs for each schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from factories import make_lesion_config

from lesionkit.training_run import schedule_callbacks, stage_line, training_stages
from mrcnn.schedules import learning_rate_at


def cosine_by_hand(base: float, step: int, total: int, warmup: int) -> float:
    rate = base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))
    return rate * (step + 1) / warmup if step < warmup else rate


def test_learning_rate_at_matches_the_formula():
    assert learning_rate_at(0.01, 0.25, 500, "cosine") == pytest.approx(cosine_by_hand(0.01, 25, 100, 0))
    assert learning_rate_at(0.01, 0.03, 3, "cosine", warmup_steps=10) == pytest.approx(0.01 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.03))) * 0.4)
    assert learning_rate_at(0.01, 1.7, 5000, "cosine") == pytest.approx(0.0005)   # clamped at the end


def test_cosine_callback_through_keras_fit_and_resume():
    """Each step's rate as the optimiser applies it (read after the step), 2 epochs x 3 steps; a run
    resumed at epoch 1 (fresh callback and optimiser, initial_epoch=1) continues the same curve."""
    import keras

    from mrcnn.train_callbacks import CosineLearningRate

    x, y = np.ones((6, 2), np.float32), np.zeros((6, 1), np.float32)

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rates = []

        def on_train_batch_end(self, batch, logs=None):
            self.rates.append(float(np.asarray(self.model.optimizer.learning_rate)))

    def fit(initial_epoch: int) -> list[float]:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=123.0), loss="mse")
        record = Record()
        model.fit(x, y, batch_size=2, epochs=2, initial_epoch=initial_epoch, verbose=0,
                  callbacks=[CosineLearningRate(0.1, total_steps=6, steps_per_epoch=3, warmup_steps=2), record])
        return record.rates

    expected = [cosine_by_hand(0.1, step, 6, 2) for step in range(6)]
    assert fit(0) == pytest.approx(expected, rel=1e-6)
    assert fit(1) == pytest.approx(expected[3:], rel=1e-6)
    assert expected[0] == pytest.approx(0.05 * (0.05 + 0.95)) and expected[5] < expected[2] < expected[1]


def test_stages_and_rates_per_schedule():
    stages = make_lesion_config(HEADS_EPOCHS=2, ALL_EPOCHS=5, LEARNING_RATE=0.01, STEPS_PER_EPOCH=7)
    assert [(s.layers, s.final_epoch, s.learning_rate) for s in training_stages(stages, 0)] == [
        ("heads", 2, 0.01), ("all", 5, pytest.approx(0.001))]
    assert schedule_callbacks(stages) == []
    assert stage_line(training_stages(stages, 3)[0], 4, stages) == "Stage 'all': epochs 4..5 at learning rate 0.001 (7 steps/epoch)"
    cosine = stages.replace(LR_SCHEDULE="cosine", LR_WARMUP_STEPS=20)
    assert [s.learning_rate for s in training_stages(cosine, 0)] == [0.01, 0.01]
    (callback,) = schedule_callbacks(cosine)
    assert (callback.base, callback.total_steps, callback.steps_per_epoch, callback.warmup_steps) == (0.01, 35, 7, 20)
    assert stage_line(training_stages(cosine, 3)[0], 4, cosine) == (
        "Stage 'all': epochs 4..5 on the run's cosine learning rate (20 warm-up steps to 0.01, 0.0005 at epoch 5)"
        " (7 steps/epoch)")
