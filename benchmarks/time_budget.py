"""A Keras callback that stops training when a wall-clock budget is spent (and schedules the
learning rate over that budget).

Used by :mod:`benchmarks.quality`; it also works in a user's own script::

    model.train(train_set, val_set, learning_rate=0.01, epochs=1000, layers="all",
                custom_callbacks=[TimeBudget(30 * 60, base_lr=0.01, schedule="cosine")])
"""

from __future__ import annotations

import os
import time

import keras

from benchmarks.budget import budget_learning_rate, own_ticks


class TimeBudget(keras.callbacks.Callback):
    """Stops ``fit`` once ``seconds`` of wall clock have passed since ``start`` (default: train begin).

    It stops before a step that would likely overrun the budget (the mean step time so far is
    the estimate), so training ends within the budget plus the epoch-end work (checkpoint).
    With ``base_lr`` it also sets the optimiser's learning rate before every step following
    :func:`budget_learning_rate`. ``steps`` counts the steps done; ``last_logs`` keeps the
    latest batch logs (running means of the losses).
    """

    def __init__(self, seconds: float, start: float | None = None, base_lr: float | None = None,
                 schedule: str = "constant", warmup_steps: int = 0, max_steps: int | None = None,
                 cpu_seconds: float | None = None) -> None:
        super().__init__()
        self.seconds = float(seconds)
        self.start = start
        self.base_lr = base_lr
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.max_steps = max_steps
        self.cpu_seconds = None if cpu_seconds is None else float(cpu_seconds)
        self.start_ticks = own_ticks()
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.steps = 0
        self.first_step_end: float | None = None
        self.first_step_ticks = 0
        self.last_step_end: float | None = None
        self.last_logs: dict[str, float] = {}
        self.last_lr: float | None = None

    def elapsed(self) -> float:
        """Seconds since the budget's start."""
        return time.time() - (self.start if self.start is not None else time.time())

    def cpu_used(self) -> float:
        """This process's CPU seconds since the callback was made (all threads)."""
        return (own_ticks() - self.start_ticks) / self.hz

    def fraction(self) -> float:
        """Share of the budget spent: the largest of wall clock, CPU seconds (``cpu_seconds``) and
        steps (``max_steps``), so the learning-rate schedule ends where training will stop."""
        parts = [self.elapsed() / self.seconds]
        if self.cpu_seconds:
            parts.append(self.cpu_used() / self.cpu_seconds)
        if self.max_steps:
            parts.append(self.steps / self.max_steps)
        return max(parts)

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.time()

    def on_train_batch_begin(self, batch, logs=None):
        if self.base_lr is None:
            return
        rate = budget_learning_rate(self.base_lr, self.fraction(), self.steps, self.schedule,
                                    self.warmup_steps)
        if rate != self.last_lr:
            self.model.optimizer.learning_rate = rate
            self.last_lr = rate

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        now = time.time()
        if self.first_step_end is None:
            self.first_step_end, self.first_step_ticks = now, own_ticks()
        self.last_step_end = now
        self.last_logs = {k: float(v) for k, v in (logs or {}).items() if _is_number(v)}
        if self.should_stop(now):
            self.model.stop_training = True

    def should_stop(self, now: float) -> bool:
        """True when the next step would likely end after the budget (or max_steps is reached, or
        the next step would likely overrun ``cpu_seconds`` of this process's CPU time)."""
        if self.max_steps is not None and self.steps >= self.max_steps:
            return True
        if self.cpu_seconds and self.first_step_end is not None:
            used = self.cpu_used()
            per_step = (own_ticks() - self.first_step_ticks) / self.hz / max(self.steps - 1, 1)
            if used + (per_step if self.steps > 1 else 0.0) >= self.cpu_seconds:
                return True
        elapsed = now - self.start
        step_time = 0.0
        if self.steps > 1 and self.first_step_end is not None:  # the first step includes tracing
            step_time = (now - self.first_step_end) / (self.steps - 1)
        return elapsed + step_time >= self.seconds

    def steady_step_times(self) -> dict[str, float | None]:
        """Mean wall and own-CPU seconds per step after the first one (which includes tracing).

        CPU seconds per step depend much less on other load than wall seconds do.
        """
        if self.steps < 2 or self.first_step_end is None or self.last_step_end is None:
            return {"step_seconds": None, "step_cpu_seconds": None}
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        n = self.steps - 1
        return {"step_seconds": round((self.last_step_end - self.first_step_end) / n, 3),
                "step_cpu_seconds": round((own_ticks() - self.first_step_ticks) / hz / n, 3)}


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
