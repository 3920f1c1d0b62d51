"""Learning-rate schedules of a training run.

* :func:`learning_rate_at`: the rate after a number of steps, given the share of the run done
  (the one formula: ``benchmarks/budget.py`` applies it over a time budget,
  :class:`mrcnn.train_callbacks.CosineLearningRate` over the epochs of a run with LR_SCHEDULE
  "cosine"). No TensorFlow here.
"""

from __future__ import annotations

import math

#: Shapes of :func:`learning_rate_at`.
SCHEDULES = ("constant", "cosine", "step")
#: Where "cosine" ends, as a share of the base rate.
COSINE_FLOOR = 0.05


def learning_rate_at(base: float, fraction: float, step: int, schedule: str = "constant",
                     warmup_steps: int = 0, floor: float = COSINE_FLOOR) -> float:
    """Learning rate after ``step`` steps with ``fraction`` (0..1) of the run done.

    ``warmup_steps``: linear ramp from base/warmup_steps up to base. ``schedule``: "constant";
    "cosine" from base down to ``floor * base`` at the end; "step": base, then base/10 for the
    last 20 %.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    fraction = min(max(fraction, 0.0), 1.0)
    if schedule == "cosine":
        rate = base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * fraction)))
    elif schedule == "step":
        rate = base if fraction < 0.8 else base / 10.0
    else:
        rate = base
    if warmup_steps > 0 and step < warmup_steps:
        rate *= (step + 1) / warmup_steps
    return rate
