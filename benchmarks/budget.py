"""Wall-clock training budgets without TensorFlow: the time-based learning-rate schedule and a
/proc CPU meter that says how much of the machine other processes used meanwhile.

The Keras callback that applies them is :class:`benchmarks.time_budget.TimeBudget`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from mrcnn.schedules import SCHEDULES as SCHEDULES  # noqa: F401  (re-exported for quality.py)
from mrcnn.schedules import learning_rate_at

#: The time budget's rate: :func:`mrcnn.schedules.learning_rate_at` with ``fraction`` = the share of
#: the budget spent.
budget_learning_rate = learning_rate_at


# -------------------------------------------------------------------------------------------
# CPU accounting from /proc


def cpu_count_proc() -> int:
    """Number of ``cpuN`` lines in /proc/stat (the CPUs its totals cover); os.cpu_count() elsewhere."""
    try:
        with open("/proc/stat") as handle:
            return sum(1 for line in handle if line.startswith("cpu") and line[3].isdigit()) or 1
    except OSError:
        return os.cpu_count() or 1


def machine_busy_ticks() -> int:
    """Busy clock ticks of all CPUs since boot (user+nice+system+irq+softirq+steal), 0 without /proc."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def own_ticks() -> int:
    """This process's CPU clock ticks (utime + stime, all threads; children waited for included)."""
    try:
        with open("/proc/self/stat") as handle:
            after = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    utime, stime, cutime, cstime = (int(v) for v in after[11:15])
    return utime + stime + cutime + cstime


@dataclass
class CpuMeter:
    """Measures, between :meth:`start` and :meth:`stop`, which share of the machine's CPU capacity
    this process and all other processes used (from /proc/stat and /proc/self/stat)."""

    cpus: int = field(default_factory=cpu_count_proc)
    hz: int = field(default_factory=lambda: os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
    t0: float = 0.0
    busy0: int = 0
    own0: int = 0
    result: dict[str, float] = field(default_factory=dict)

    def start(self) -> "CpuMeter":
        """Remember the counters now."""
        self.t0, self.busy0, self.own0 = time.time(), machine_busy_ticks(), own_ticks()
        return self

    def stop(self) -> dict[str, float]:
        """``{"own_cpu_share", "other_load_share", "seconds", "cpus"}`` since :meth:`start`.

        Shares are fractions of ``cpus x seconds``: 0.5 on a 2-core machine means one core's
        worth of work. ``other_load_share`` is the budget share lost to other processes.
        """
        seconds = max(time.time() - self.t0, 1e-9)
        busy, own = machine_busy_ticks() - self.busy0, own_ticks() - self.own0
        capacity = self.cpus * seconds * self.hz
        self.result = {"own_cpu_share": round(own / capacity, 4),
                       "other_load_share": round(max(busy - own, 0) / capacity, 4),
                       "seconds": round(seconds, 1), "cpus": self.cpus}
        return self.result
