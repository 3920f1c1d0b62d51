#!/usr/bin/env python
"""Interleaved A/B of frozen-BatchNorm folding (``mrcnn.backbone.FOLD_FROZEN_BN``) in one process.

::

    python benchmarks/bn_fold_ab.py --mode infer --size 512 --rounds 6
    python benchmarks/bn_fold_ab.py --mode infer --size 1024 --rounds 4
    python benchmarks/bn_fold_ab.py --mode train --size 512 --batch 2 --rounds 6

Builds bench.py's workload (``benchmarks/workloads.py``: ResNet-50-FPN, frozen BN, float32, 2 TF
threads) twice, folded and not, with the same weights, checks that both give the same outputs,
then alternates them: each round times ``--reps`` calls of A then of B (the order flips every
round). Inference times ``MaskRCNN.detect`` and the compiled graph alone; training one
``train_step``. Prints one JSON line per timed thing: medians of the per-round means of wall and
of this process's CPU seconds, the folded/unfolded ratios of the medians and per round, and the
cores other processes used. Ratios from one process are robust to slow drifts in load; absolute
seconds are not; on a busy machine the CPU-second ratio is the steadier one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.timing import machine_busy_seconds, own_cpu_seconds  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=2, help="calls per side per round")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def build(fold: bool, mode: str, size: int, batch: int, threads: int) -> Any:
    """A MaskRCNN of bench.py's workload built with folding on or off."""
    from benchmarks import workloads
    from mrcnn import backbone
    from mrcnn.model import MaskRCNN

    backbone.FOLD_FROZEN_BN = fold
    config = workloads.make_config(workloads.Plan(quick=False, threads=threads), size, batch)
    if mode == "infer":
        model = workloads.inference_model(config)
    else:
        model = MaskRCNN("training", config, tempfile.mkdtemp(prefix="ab-logs-"))
    backbone.FOLD_FROZEN_BN = True
    return model, config


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, reps: int
               ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-round mean wall seconds and own CPU seconds of each function, run alternately (order
    flipped every round)."""
    names = list(fns)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), own_cpu_seconds()
            for _ in range(reps):
                fns[n]()
            wall[n].append((time.perf_counter() - start) / reps)
            cpu[n].append((own_cpu_seconds() - start_cpu) / reps)
    return wall, cpu


def summary(what: str, times: tuple[dict[str, list[float]], dict[str, list[float]]], others: float,
            args: argparse.Namespace) -> dict[str, Any]:
    """One JSON-ready line: wall and own-CPU medians of both sides and folded/unfolded ratios."""
    out: dict[str, Any] = {"ab": what, "size": args.size, "batch": args.batch, "rounds": args.rounds,
                           "reps": args.reps}
    for kind, values in zip(("wall", "cpu"), times, strict=True):
        folded, plain = values["folded"], values["unfolded"]
        out[f"{kind}_folded_median_s"] = round(statistics.median(folded), 4)
        out[f"{kind}_unfolded_median_s"] = round(statistics.median(plain), 4)
        out[f"{kind}_ratio"] = round(statistics.median(folded) / statistics.median(plain), 3)
        out[f"{kind}_ratio_per_round"] = [round(a / b, 3) for a, b in zip(folded, plain, strict=True)]
    out["others_cores"] = round(others, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from benchmarks import workloads

    plain, config = build(False, args.mode, args.size, args.batch, args.threads)
    folded, _ = build(True, args.mode, args.size, args.batch, args.threads)
    folded.keras_model.set_weights(plain.keras_model.get_weights())
    models = {"folded": folded, "unfolded": plain}
    busy0, own0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    if args.mode == "infer":
        rng = np.random.default_rng(0)
        images = [workloads.synthetic_lesion(args.size, rng)[0] for _ in range(args.batch)]
        molded, metas, _ = plain.mold_inputs(images)
        outs = {k: m._run(molded, metas) for k, m in models.items()}  # noqa: SLF001 (warm-up, trace)
        diff = float(np.abs(outs["folded"][0] - outs["unfolded"][0]).max())
        print(json.dumps({"check": "max |detections folded - unfolded|", "value": diff,
                          "detections": int((outs["unfolded"][0][0, :, 4] > 0).sum())}), flush=True)
        graph = interleave({k: (lambda m=m: m._run(molded, metas)) for k, m in models.items()},  # noqa: SLF001
                           args.rounds, args.reps)
        detect = interleave({k: (lambda m=m: m.detect(images)) for k, m in models.items()}, args.rounds, args.reps)
        results = [("infer_graph", graph), ("infer_detect", detect)]
    else:
        inputs = {k: tf.constant(v) for k, v in workloads.training_batch(config, args.batch).items()}
        steps = {k: workloads.compiled_train_step(m, config) for k, m in models.items()}
        losses = {k: float(s(inputs)["loss"]) for k, s in steps.items()}
        print(json.dumps({"check": "first-step loss", **losses}), flush=True)
        results = [("train_step", interleave({k: (lambda s=s: float(s(inputs)["loss"])) for k, s in steps.items()},
                                             args.rounds, args.reps))]
    wall = time.perf_counter() - t0
    others = max(0.0, (machine_busy_seconds() - busy0) - (own_cpu_seconds() - own0)) / wall
    for what, times in results:
        print(json.dumps(summary(what, times, others, args)), flush=True)


if __name__ == "__main__":
    main()
