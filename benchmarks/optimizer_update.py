#!/usr/bin/env python
"""CPU cost of one optimiser update, Keras's AdamW / SGD against mrcnn.optimizers' fused ones.

::

    python benchmarks/optimizer_update.py --config ham10000_dx
    python benchmarks/optimizer_update.py --config isic2018 --threads 2

The weights are the trainable variables' shapes of the preset's training model (random values);
the gradients fixed random tensors. Each optimiser runs ``--updates`` updates in a tf.function
after one tracing call, in ``--rounds`` interleaved rounds (Keras, fused, Keras, ...); the minimum
CPU seconds per update is kept. Prints one JSON line: variables, weights and, per optimiser,
Keras's and the fused CPU seconds and their ratio.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

import lesions  # noqa: E402
from benchmarks.quality import emit_record  # noqa: E402


def trainable_shapes(config_name: str, sets: list[str]) -> list[tuple[int, ...]]:
    """Shapes of the training model's trainable variables for the preset (+ ``--set``)."""
    from mrcnn import model as modellib

    config = lesions.build_config(config_name, ['CLASS_LOSS_WEIGHTS="none"', *sets])
    with tempfile.TemporaryDirectory() as tmp:
        model = modellib.MaskRCNN(mode="training", config=config, model_dir=tmp)
    return [tuple(int(d) for d in v.shape) for v in model.keras_model.trainable_variables]


def update_cpu_seconds(make: Callable[[], Any], shapes: list[tuple[int, ...]], updates: int) -> float:
    """CPU seconds per update of a fresh optimiser from ``make`` over weights of ``shapes``."""
    import keras
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    weights = [keras.Variable(rng.normal(size=s).astype("float32")) for s in shapes]
    grads = [tf.constant(rng.normal(size=s).astype("float32")) for s in shapes]
    optimizer = make()
    optimizer.build(weights)
    step = tf.function(lambda: optimizer.apply(grads, weights))
    step()
    start = time.process_time()
    for _ in range(updates):
        step()
    return (time.process_time() - start) / updates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="optimizer_update", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="ham10000_dx", help="preset whose trainable shapes to use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--updates", type=int, default=10, help="timed updates per round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--threads", type=int, default=1, help="TF intra-op threads (default 1; 0 = TF's own"
                   " choice, e.g. where TF already runs)")
    p.add_argument("--record", help="also append the JSON line to this file")
    args = p.parse_args(argv)
    import keras
    import tensorflow as tf

    from mrcnn.optimizers import FusedAdamW, FusedSGD

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    shapes = trainable_shapes(args.config, args.set)
    pairs = {"adamw": (lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.01), lambda: FusedAdamW(1e-3, weight_decay=0.01)),
             "sgd": (lambda: keras.optimizers.SGD(1e-2, momentum=0.9), lambda: FusedSGD(1e-2, momentum=0.9))}
    record: dict[str, Any] = {"config": args.config, "set": args.set, "threads": args.threads,
                              "variables": len(shapes), "weights": sum(math.prod(s) for s in shapes)}
    for name, (stock, fused) in pairs.items():
        times: dict[str, list[float]] = {"keras": [], "fused": []}
        for _ in range(args.rounds):
            times["keras"].append(update_cpu_seconds(stock, shapes, args.updates))
            times["fused"].append(update_cpu_seconds(fused, shapes, args.updates))
        keras_s, fused_s = min(times["keras"]), min(times["fused"])
        record[name] = {"keras_cpu_seconds": round(keras_s, 5), "fused_cpu_seconds": round(fused_s, 5),
                        "ratio": round(fused_s / keras_s, 3)}
    emit_record(record, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
