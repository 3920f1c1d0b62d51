"""Timing loop that measures how busy the rest of the machine is, and throws away noisy iterations.

On a small shared machine (2 cores) one other busy process makes a 2-thread run several times
slower, so every timed iteration records how many cores *other* processes used meanwhile
(machine busy time from ``/proc/stat`` minus this process's own CPU time) and is repeated when
that share is above ``max_others_cores``, within a bounded looping time. No framework imports.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

#: Iterations during which other processes used more cores than this are discarded.
DEFAULT_MAX_OTHERS_CORES = float(os.environ.get("BENCH_MAX_OTHERS_CORES", "0.15"))
#: Seconds of timed looping after which contaminated iterations are accepted (``clean`` False).
DEFAULT_MAX_LOOP_S = float(os.environ.get("BENCH_MAX_LOOP_S", "300"))


def machine_busy_seconds(stat_path: str = "/proc/stat") -> float:
    """CPU seconds all cores have spent busy since boot (NaN when /proc/stat is unreadable)."""
    try:
        with open(stat_path) as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Sample:
    """One timed iteration: wall seconds, cores used by others and by this process."""

    seconds: float
    others_cores: float
    own_cores: float


@dataclass
class LoopResult:
    """Kept iterations plus bookkeeping of a :func:`time_loop` run."""

    first_call_s: float
    kept: list[Sample] = field(default_factory=list)
    discarded: int = 0
    clean: bool = True

    @property
    def seconds(self) -> list[float]:
        """Wall seconds of the kept iterations."""
        return [s.seconds for s in self.kept]

    def summary(self) -> dict[str, Any]:
        """median/p10/p90/min seconds and load statistics, rounded for a JSON line."""
        t = sorted(self.seconds)
        others = [s.others_cores for s in self.kept if not math.isnan(s.others_cores)]
        return {
            "median_s": round(statistics.median(t), 4),
            "p10": round(percentile(t, 10), 4),
            "p90": round(percentile(t, 90), 4),
            "min_s": round(t[0], 4),
            "runs": len(t),
            "first_call_s": round(self.first_call_s, 3),
            "others_cores": round(statistics.fmean(others), 3) if others else None,
            "others_cores_max": round(max(others), 3) if others else None,
            "own_cores": round(statistics.fmean(s.own_cores for s in self.kept), 2),
            "discarded": self.discarded,
            "clean": self.clean,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of an ascending list (numpy's default rule)."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(fn: Callable[[], Any], busy: Callable[[], float] = machine_busy_seconds,
            own: Callable[[], float] = own_cpu_seconds) -> Sample:
    """Run ``fn()`` once and return its wall time with the cores used by others and by us."""
    busy0, own0 = busy(), own()
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-9)
    own_s = own() - own0
    others = max(0.0, (busy() - busy0) - own_s) / dt
    return Sample(dt, others, own_s / dt)


def time_loop(fn: Callable[[], Any], warmup: int, runs: int,
              max_others_cores: float = DEFAULT_MAX_OTHERS_CORES, max_loop_s: float = DEFAULT_MAX_LOOP_S,
              sample: Callable[[Callable[[], Any]], Sample] = measure) -> LoopResult:
    """Call ``fn`` ``warmup`` times (the first call timed on its own), then until ``runs`` clean
    iterations are kept.

    An iteration during which others used more than ``max_others_cores`` is discarded; once the
    timed looping has lasted ``max_loop_s`` and at least ``runs`` iterations were made, the least
    contaminated discarded ones fill the gap and ``clean`` is False.
    """
    t0 = time.perf_counter()
    fn()
    result = LoopResult(first_call_s=time.perf_counter() - t0)
    for _ in range(max(0, warmup - 1)):
        fn()
    dirty: list[Sample] = []
    start = time.perf_counter()
    while len(result.kept) < runs:
        s = sample(fn)
        if math.isnan(s.others_cores) or s.others_cores <= max_others_cores:
            result.kept.append(s)
        else:
            dirty.append(s)
        if time.perf_counter() - start > max_loop_s and len(result.kept) + len(dirty) >= runs:
            break
    if len(result.kept) < runs:
        dirty.sort(key=lambda s: s.others_cores)
        fill = runs - len(result.kept)
        result.kept.extend(dirty[:fill])
        dirty = dirty[fill:]
        result.clean = False
    result.discarded = len(dirty)
    return result


def machine_others_cores(seconds: float = 1.0) -> float:
    """Average cores other processes kept busy over ``seconds`` (this process sleeps meanwhile)."""
    return measure(lambda: time.sleep(seconds)).others_cores


def wait_until_idle(max_wait_s: float, threshold: float = DEFAULT_MAX_OTHERS_CORES, window_s: float = 2.0) -> float:
    """Wait (up to ``max_wait_s``) until others use at most ``threshold`` cores; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    reading = machine_others_cores(min(window_s, max(max_wait_s, 0.2)))
    while reading > threshold and time.monotonic() < deadline:
        reading = machine_others_cores(window_s)
    return reading
