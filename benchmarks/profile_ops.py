#!/usr/bin/env python
"""Where the time of the bench's inference graph goes: TF profiler trace, summed by op type.

::

    python benchmarks/profile_ops.py --size 512 --runs 3          # bench.py's infer512 workload
    python benchmarks/profile_ops.py --size 1024 --runs 2 --top 25
    python benchmarks/profile_ops.py --size 512 --train 2 --runs 3  # bench.py's train512_b2 step

Builds the ``infer<size>`` workload of ``benchmarks/bench.py`` (ResNet-50-FPN, random init, 1000
proposals, 100 detections, frozen BN, float32, 2 TF threads), warms the compiled detect graph up,
traces ``--runs`` calls with ``tf.profiler`` and prints, per op type (``_MklNativeFusedConv2D``,
``Mul``, ``CropAndResize`` ...) and per top-level layer name, the summed op time per run and its
share. Op times are summed over threads, so with 2 threads the shares, not the sums, are what to
read. ``--inter-op 1`` (default) keeps op durations from overlapping. ``--train B`` traces
bench.py's training step at batch B instead (forward, backward, SGD update; ops of the gradient
are named ``gradient_tape/...``, counted under the layer they differentiate).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="square image side (bench: 512 or 1024)")
    p.add_argument("--runs", type=int, default=3, help="traced graph calls")
    p.add_argument("--threads", type=int, default=2, help="TF intra-op threads")
    p.add_argument("--inter-op", type=int, default=1, help="TF inter-op threads")
    p.add_argument("--top", type=int, default=20, help="rows per table")
    p.add_argument("--train", type=int, default=0, metavar="B", help="trace the training step at batch B"
                   " (bench.py's train<size>_b<B>) instead of the detect graph")
    p.add_argument("--no-fold", action="store_true", help="build without frozen-BN folding (A/B)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    return p.parse_args(argv)


def op_times(logdir: str) -> list[tuple[str, str, float]]:
    """(op name, op type, seconds) of every TF op event in the trace under ``logdir``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    events = []
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(path).read_bytes())
        for plane in space.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                if line.name == "python":
                    continue
                for ev in line.events:
                    meta = plane.event_metadata[ev.metadata_id]
                    name, sep, op_type = meta.name.rpartition(":")
                    if sep and op_type and op_type == meta.display_name:
                        events.append((name, op_type, ev.duration_ps * 1e-12))
    return events


def layer_of(op_name: str) -> str:
    """Top-level layer of an op name (``mask_rcnn_1/res2a_branch2a_1/convolution`` -> ``res2a_branch2a``)."""
    parts = [p for p in op_name.split("/") if p]
    parts = parts[1:] if parts and parts[0] == "StatefulPartitionedCall" else parts  # under Model.fit
    parts = parts[1:] if parts and parts[0] == "gradient_tape" else parts  # a gradient op: its layer's
    part = parts[1] if len(parts) > 1 and parts[0].startswith("mask_rcnn") else (parts[0] if parts else "?")
    base, _, suffix = part.rpartition("_")
    return base if suffix.isdigit() and base else part


#: Part of the model -> regular expression on the top-level layer name (first match wins).
PARTS = (("backbone", r"^(res\d|bn|conv1|max_pooling|zero_padding|activation|add)"),
         ("fpn", r"^fpn_"), ("rpn", r"^(rpn_|ROI)"),
         ("box head", r"^(roi_align_classifier|mrcnn_class|mrcnn_bbox|pool_squeeze|fold_rois|unfold_rois)"),
         ("detection", r"^(mrcnn_detection|detection_boxes)"), ("mask head", r"^(roi_align_mask|mrcnn_mask)"))


def part_of(layer: str) -> str:
    """Model part of a top-level layer name (see PARTS; "other" if none matches)."""
    return next((part for part, pattern in PARTS if re.match(pattern, layer)), "other")


def print_table(title: str, totals: dict[str, float], runs: int, top: int) -> None:
    total = sum(totals.values())
    print(f"\n{title} (op seconds per run, summed over threads; total {total / runs:.3f})")
    for key, secs in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {key:<48s} {secs / runs:8.4f}  {100 * secs / total:5.1f} %")


def traced_detect(workloads, plan, size: int, overrides: dict):
    """(one detect-graph call, name) of bench.py's infer<size> workload, warmed up."""
    import numpy as np

    config = workloads.make_config(plan, size, 1, **overrides)
    model = workloads.inference_model(config)
    image = workloads.synthetic_lesion(size, np.random.default_rng(0))[0]
    molded, metas, _ = model.mold_inputs([image])
    for _ in range(2):
        detections = model._run(molded, metas)[0]  # noqa: SLF001 (warm-up: trace + first runs)
    print(f"detections: {int((detections[0, :, 4] > 0).sum())} (the mask head's work scales with them)")
    return (lambda: model._run(molded, metas)), f"infer{size}"  # noqa: SLF001


def traced_train_step(workloads, plan, size: int, batch: int, overrides: dict):
    """(one training step, name) of bench.py's train<size>_b<batch> workload, warmed up."""
    import tensorflow as tf

    from mrcnn.model import MaskRCNN

    config = workloads.make_config(plan, size, batch, **overrides)
    model = MaskRCNN("training", config, tempfile.mkdtemp(prefix="profile-logs-"))
    step = workloads.compiled_train_step(model, config)
    inputs = {k: tf.constant(v) for k, v in workloads.training_batch(config, batch).items()}

    def one_step() -> None:
        float(step(inputs)["loss"])  # wait for the step

    for _ in range(3):
        one_step()
    return one_step, f"train{size}_b{batch}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    from benchmarks import workloads

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    plan = workloads.Plan(quick=False, threads=args.threads)
    from mrcnn import backbone

    backbone.FOLD_FROZEN_BN = not args.no_fold
    run_once, name = (traced_train_step(workloads, plan, args.size, args.train, overrides) if args.train
                      else traced_detect(workloads, plan, args.size, overrides))
    logdir = tempfile.mkdtemp(prefix="profile-trace-")
    tf.profiler.experimental.start(logdir)
    for _ in range(args.runs):
        run_once()
    tf.profiler.experimental.stop()
    by_type: dict[str, float] = collections.defaultdict(float)
    by_layer: dict[str, float] = collections.defaultdict(float)
    by_part: dict[str, float] = collections.defaultdict(float)
    by_part_type: dict[str, float] = collections.defaultdict(float)
    for op_name, op_type, secs in op_times(logdir):
        layer = layer_of(op_name)
        by_type[op_type] += secs
        by_layer[layer] += secs
        by_part[part_of(layer)] += secs
        by_part_type[f"{part_of(layer)}: {op_type}"] += secs
    print_table(f"{name}: by op type", by_type, args.runs, args.top)
    print_table(f"{name}: by part", by_part, args.runs, args.top)
    print_table(f"{name}: by part and op type", by_part_type, args.runs, args.top)
    print_table(f"{name}: by layer", by_layer, args.runs, args.top)


if __name__ == "__main__":
    main()
