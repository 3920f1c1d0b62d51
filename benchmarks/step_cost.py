#!/usr/bin/env python
"""CPU cost of one training step for several config variants, in one process (no evaluation).

::

    python benchmarks/step_cost.py --steps 8 --variant "" --variant "BACKBONE=resnet18" \
        --variant "BACKBONE=resnet18,MASK_HEAD_CHANNELS=64"

Each variant is the preset (``--config``, default ham10000_cpu) plus ``--set`` plus the
variant's comma-separated KEY=VALUE pairs. Two real training batches of the HAM10000 train
split are loaded once per variant (no augmentation) and the model is trained on them repeatedly
with ``fit``; the first step (tracing) is dropped. Prints one JSON line per variant: own CPU
seconds and wall seconds per step, per image, parameters, and other processes' load share.
CPU seconds per step are much less sensitive than wall time to what else runs on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

import lesions  # noqa: E402
from benchmarks.budget import CpuMeter  # noqa: E402
from benchmarks.quality import DEFAULT_CONFIG, DEFAULT_DATASET, emit_record  # noqa: E402


def measure(args: argparse.Namespace, variant: str) -> dict:
    """Train ``args.steps`` + 1 steps of one variant on two fixed batches; cost per step."""
    import keras
    import tensorflow as tf

    from benchmarks.time_budget import TimeBudget
    from mrcnn import model as modellib
    from mrcnn.diagnosis import resolve_class_weights
    from mrcnn.input_pipeline import make_dataset
    from mrcnn.training import compile_training_model

    sets = list(args.set) + [s for s in variant.split(",") if s.strip()]
    config = lesions.build_config(args.config, sets)
    report, train_ids, _ = lesions.scan_and_split(Path(args.dataset), config)
    train_set, = lesions.make_datasets(report, train_ids[:64])
    config = resolve_class_weights(config, train_set)  # a diagnosis preset's "balanced" weights
    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = modellib.MaskRCNN(mode="training", config=config, model_dir=tmp)
    batches = list(make_dataset(train_set, config, shuffle=False).take(2))
    data = tf.data.Dataset.from_tensor_slices([0, 1]).repeat().map(
        lambda i: tf.nest.map_structure(lambda a, b: tf.where(i == 0, a, b), batches[0], batches[1]))
    compile_training_model(model.keras_model, config.LEARNING_RATE, config)
    budget = TimeBudget(1e9, max_steps=args.steps + 1)
    meter = CpuMeter().start()
    model.keras_model.fit(data, epochs=1, steps_per_epoch=args.steps + 1, callbacks=[budget], verbose=0)
    load = meter.stop()
    times = budget.steady_step_times()
    if args.profile:
        profile_fit(model.keras_model, data, args.profile)
    return {"variant": variant, "set": sets, "steps": args.steps, "batch_size": config.BATCH_SIZE,
            "step_cpu_seconds": times["step_cpu_seconds"], "step_seconds": times["step_seconds"],
            "cpu_seconds_per_image": round(times["step_cpu_seconds"] / config.BATCH_SIZE, 4),
            "params": int(model.keras_model.count_params()), "other_load_share": load["other_load_share"]}


def profile_fit(keras_model, data, steps: int) -> None:
    """Trace ``steps`` more training steps with tf.profiler; print op time by type, part and layer
    (benchmarks/profile_ops.py's tables; shares are what to read, the sums are over threads)."""
    import collections

    import tensorflow as tf

    from benchmarks.profile_ops import layer_of, op_times, part_of, print_table

    logdir = tempfile.mkdtemp(prefix="step-cost-trace-")
    tf.profiler.experimental.start(logdir)
    keras_model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    tf.profiler.experimental.stop()
    tables: dict[str, dict[str, float]] = {k: collections.defaultdict(float) for k in ("type", "part", "layer")}
    for op_name, op_type, secs in op_times(logdir):
        layer = layer_of(op_name)
        tables["type"][op_type] += secs
        tables["part"][part_of(layer)] += secs
        tables["layer"][layer] += secs
    for key, totals in tables.items():
        print_table(f"training step: by op {key}", totals, steps, 25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="step_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=str(DEFAULT_DATASET))
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every variant")
    p.add_argument("--variant", action="append", default=[], help="comma-separated KEY=VALUE (\"\" = preset)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after one tracing step)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="then trace N steps and print where"
                   " the op time goes (to stderr)")
    p.add_argument("--record", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    for variant in args.variant or [""]:
        with contextlib.redirect_stdout(sys.stderr):
            record = measure(args, variant)
        emit_record(record, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
