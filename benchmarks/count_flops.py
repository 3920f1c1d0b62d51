"""Deterministic FLOP count of the benchmark graphs (a count, no timing).

Counts what the peer harness counts (``../shared/tools/peers``: torch ``FlopCounterMode``, the TF
v1 profiler on Model Garden's graph): 2 x the multiply-accumulates of the Conv2D,
Conv2DBackpropInput, Conv2DBackpropFilter, MatMul and BatchMatMul ops; ROI align, NMS, BatchNorm
and elementwise ops are not counted.

Method: the graph that the benchmark runs is traced (not executed) as a TF function, the same way
``benchmarks/workloads.py`` builds it (``run_train``: ``MaskRCNN("training")`` +
``compiled_train_step``; ``run_infer``: the detect function of ``inference_model``), and every
such op that the function's outputs or side effects depend on is counted from its static shapes.
Ops under ``gradient_tape/`` are the backward pass; ops nobody consumes (the input gradient of
``conv1``) are pruned, not run, by the TF runtime and are listed apart. Each op is attributed to a part
(backbone, FPN, RPN, box head, mask head) by the layer names in its name scope.

The mask head runs on a data-dependent number of ROIs (``DetectionBoxes`` at inference,
``PositiveRois`` in training: the real detections / positives, padded slots skipped), which leaves
its batch dimension unknown; for the count, those two layers are patched to slice a fixed number of
rows (``--mask-rois``; inference: DETECTION_MAX_INSTANCES, the bench's 100 forced detections), so
that every shape is static. The mask head's cost is linear in that number, so the output also gives
its cost per ROI. ``--probe-steps`` runs that many real train steps of the bench's workload and
records how many ROIs the mask head really got in each (the first ``--probe-steps`` of a bench run;
the op count for a given ROI number is exact and deterministic, the ROI numbers are not: random ROI
sampling and threaded float sums change them from run to run after the first few steps; at 512 px
batch 2 they went 4, 8, 8, then 8-25 per image, as the RPN learns the one repeated batch).

Usage (from the repository root)::

    python -m benchmarks.count_flops --size 512 --batch 2 --infer --probe-steps 15
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import tempfile
from collections import defaultdict
from typing import Any, Iterator

#: Op types whose 2 x MACs are counted.
COUNTED_OPS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "MatMul", "BatchMatMul",
               "BatchMatMulV2", "BatchMatMulV3")
#: Heavy op types this counter does not know: reported if they appear (none expected).
UNKNOWN_HEAVY_OPS = ("DepthwiseConv2dNative", "Conv3D", "Einsum", "Conv2DTranspose", "_FusedConv2D",
                     "_FusedMatMul", "Conv")
#: Part of the network, by the layer name found in an op's name scope (first match wins).
PARTS = (("mask_head", r"mrcnn_mask"), ("box_head", r"mrcnn_class|mrcnn_bbox"), ("rpn", r"rpn_"),
         ("fpn", r"fpn_"), ("backbone", r"conv1|res\d"))


def part_of(op_name: str) -> str:
    """The network part that the op named ``op_name`` belongs to ("other" if none)."""
    for component in op_name.split("/"):
        for part, pattern in PARTS:
            if re.match(pattern, component):
                return part
    return "other"


def _dims(shape: Any) -> list[int | None]:
    return list(shape.as_list()) if shape.rank is not None else []


def _prod(values: list[int | None]) -> int | None:
    out = 1
    for v in values:
        if v is None:
            return None
        out *= int(v)
    return out


def op_macs(op: Any) -> int | None:
    """Multiply-accumulates of one counted op from its static shapes (None: a dimension unknown)."""
    t = op.type
    if t == "Conv2D":                           # out [N, Ho, Wo, Co] x kh*kw*Ci (filter [kh, kw, Ci, Co])
        kh, kw, ci, _ = _dims(op.inputs[1].shape)
        return _mul(_prod(_dims(op.outputs[0].shape)), kh, kw, ci)
    if t == "Conv2DBackpropInput":              # (input_sizes, filter, out_backprop): as the forward conv
        kh, kw, ci, _ = _dims(op.inputs[1].shape)
        return _mul(_prod(_dims(op.inputs[2].shape)), kh, kw, ci)
    if t == "Conv2DBackpropFilter":             # (input, filter_sizes, out_backprop) -> filter
        kh, kw, ci, _ = _dims(op.outputs[0].shape)
        return _mul(_prod(_dims(op.inputs[2].shape)), kh, kw, ci)
    if t == "MatMul":                           # [M, K] @ [K, N]
        a = _dims(op.inputs[0].shape)
        k = a[0] if op.get_attr("transpose_a") else a[1]
        return _mul(_prod(_dims(op.outputs[0].shape)), k)
    if t.startswith("BatchMatMul"):             # [..., M, K] @ [..., K, N]
        a = _dims(op.inputs[0].shape)
        k = a[-2] if op.get_attr("adj_x") else a[-1]
        return _mul(_prod(_dims(op.outputs[0].shape)), k)
    raise ValueError(f"not a counted op type: {t}")


def _mul(*values: int | None) -> int | None:
    return _prod(list(values))


def live_ops(graph: Any) -> set[str]:
    """Names of the ops that the function's outputs or its side effects (variable updates) need."""
    todo = [t.op for t in graph.outputs] + list(graph.control_outputs)
    seen: set[str] = set()
    while todo:
        op = todo.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        todo.extend(t.op for t in op.inputs)
        todo.extend(op.control_inputs)
    return seen


def _registry_flops(graph: Any, op: Any) -> int | None:
    """FLOPs the TF v1 profiler's registry gives the op (the harness's count for Model Garden)."""
    from tensorflow.python.framework import ops as tf_ops
    from tensorflow.python.profiler.internal import flops_registry  # noqa: F401  (registers the stats)

    try:
        value = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value
    except Exception:  # noqa: BLE001  (no statistics registered, or unknown shapes)
        return None
    return None if value is None else int(value)


def count_graph(graph: Any) -> dict[str, Any]:
    """2 x MACs of the counted ops of ``graph`` by part and direction ("fwd", "bwd"), plus the
    heavy ops left out (dead, unknown shape, unknown type) and the profiler registry's total."""
    live = live_ops(graph)
    flops: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_type: dict[str, int] = defaultdict(int)
    dead, unresolved, unknown_types = [], [], []
    registry_total, registry_missing = 0, 0
    for op in graph.get_operations():
        if op.type in UNKNOWN_HEAVY_OPS:
            unknown_types.append(f"{op.type} {op.name}")
        if op.type not in COUNTED_OPS:
            continue
        macs = op_macs(op)
        if op.name not in live:
            dead.append({"op": op.name, "type": op.type, "gflop": None if macs is None else round(2 * macs / 1e9, 3)})
            continue
        if macs is None:
            unresolved.append(f"{op.type} {op.name}")
            continue
        direction = "bwd" if op.name.startswith("gradient_tape/") else "fwd"
        flops[part_of(op.name)][direction] += 2 * macs
        by_type[op.type] += 2 * macs
        reg = _registry_flops(graph, op)
        if reg is None:
            registry_missing += 1
        else:
            registry_total += reg
    return {"flops": {p: dict(d) for p, d in flops.items()}, "by_type": dict(by_type), "dead": dead,
            "unresolved": unresolved, "unknown_types": unknown_types,
            "registry_total": registry_total, "registry_missing": registry_missing}


@contextlib.contextmanager
def static_mask_rois(count: int) -> Iterator[None]:
    """Make the mask head's ROI count static: ``DetectionBoxes`` (inference) and ``PositiveRois``
    (training) return exactly the first ``count`` rows instead of the data-dependent number."""
    from mrcnn.inference_graph import DetectionBoxes
    from mrcnn.training import PositiveRois

    saved = DetectionBoxes.call, PositiveRois.call
    DetectionBoxes.call = lambda self, detections: detections[:, :count, :4]
    PositiveRois.call = lambda self, inputs: inputs[0][:, :count]
    try:
        yield
    finally:
        DetectionBoxes.call, PositiveRois.call = saved


def summarize(counted: dict[str, Any], batch: int, mask_rois: int) -> dict[str, Any]:
    """GFLOP by part (forward, backward, total), per batch and per image, from :func:`count_graph`."""
    parts = {}
    for part in ("backbone", "fpn", "rpn", "box_head", "mask_head", "other"):
        d = counted["flops"].get(part, {})
        fwd, bwd = d.get("fwd", 0), d.get("bwd", 0)
        if fwd or bwd:
            parts[part] = {"fwd": round(fwd / 1e9, 2), "bwd": round(bwd / 1e9, 2), "total": round((fwd + bwd) / 1e9, 2)}
    total = sum(sum(d.values()) for d in counted["flops"].values())
    mask = sum(counted["flops"].get("mask_head", {}).values())
    return {"batch": batch, "mask_rois_per_image": mask_rois, "gflop_total": round(total / 1e9, 2),
            "gflop_per_image": round(total / 1e9 / batch, 2), "parts": parts,
            "mask_head_gflop_per_roi": round(mask / 1e9 / (batch * mask_rois), 4),
            "gflop_by_op_type": {k: round(v / 1e9, 2) for k, v in counted["by_type"].items()},
            "profiler_registry_gflop_same_ops": round(counted["registry_total"] / 1e9, 2),
            "profiler_registry_missing_ops": counted["registry_missing"],
            "dead_ops": counted["dead"], "unresolved_ops": counted["unresolved"],
            "unknown_heavy_op_types": counted["unknown_types"]}


def count_inference(size: int) -> dict[str, Any]:
    """Count the bench's detect graph (``run_infer``) at ``size`` px, batch 1, mask head on all
    DETECTION_MAX_INSTANCES slots (the bench forces 100 detections)."""
    from benchmarks.workloads import Plan, inference_model, make_config

    config = make_config(Plan(quick=False), size, 1)
    rois = int(config.DETECTION_MAX_INSTANCES)
    with static_mask_rois(rois):
        model = inference_model(config)
        concrete = model._detect_function().get_concrete_function()  # noqa: SLF001
        return {"mode": "infer", "size": size, **summarize(count_graph(concrete.graph), 1, rois)}


def build_training(size: int, batch: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(config, MaskRCNN, compiled train step, input tensors) exactly as ``run_train`` builds them."""
    import tensorflow as tf

    from benchmarks.workloads import Plan, compiled_train_step, make_config, training_batch
    from mrcnn.model import MaskRCNN

    config = make_config(Plan(quick=False), size, batch)
    model = MaskRCNN("training", config, tempfile.mkdtemp(prefix="flops-logs-"))
    step = compiled_train_step(model, config)
    inputs = {k: tf.constant(v) for k, v in training_batch(config, batch).items()}
    return config, model, step, inputs


def count_training(model: Any, step: Any, inputs: dict[str, Any], batch: int, mask_rois: int) -> dict[str, Any]:
    """Count one train step (forward, backward, SGD update) with the mask head on ``mask_rois`` per image."""
    import tensorflow as tf

    with static_mask_rois(mask_rois):
        fn = tf.function(model.keras_model.train_step)  # a fresh trace under the patch
        concrete = fn.get_concrete_function(inputs)
        return {"mode": "train", **summarize(count_graph(concrete.graph), batch, mask_rois)}


@contextlib.contextmanager
def recording_mask_rois(store: Any) -> Iterator[None]:
    """While active, graphs traced with ``PositiveRois`` write the number of rows it keeps (the
    mask head's ROIs per image in that step) to the tf.Variable ``store``: no extra forward pass
    and no extra random op, so the steps are those of an unobserved run."""
    import tensorflow as tf

    from mrcnn.training import PositiveRois

    original = PositiveRois.call

    def call(self: Any, inputs: Any) -> Any:
        rois = original(self, inputs)
        with tf.control_dependencies([store.assign(tf.shape(rois)[1])]):
            return tf.identity(rois)

    PositiveRois.call = call
    try:
        yield
    finally:
        PositiveRois.call = original


def probe_mask_rois(step: Any, inputs: dict[str, Any], steps: int, store: Any) -> list[int]:
    """Run ``steps`` real train steps (traced under :func:`recording_mask_rois`); the mask head's
    ROIs per image in each (the most positives of any image in the batch, at least 1)."""
    counts = []
    for _ in range(steps):
        float(step(inputs)["loss"])
        counts.append(int(store.numpy()))
    return counts


def per_step(counted: dict[str, Any], probed: list[int], batch: int, warmup: int = 3) -> dict[str, Any]:
    """Step GFLOP for each probed mask-ROI count (the mask head is linear in it; everything else is
    static), and their mean over the steps a bench run times (after its ``warmup`` steps)."""
    fixed = counted["gflop_total"] - counted["parts"]["mask_head"]["total"]
    per_roi = counted["mask_head_gflop_per_roi"]
    steps = [round(fixed + batch * n * per_roi, 1) for n in probed]
    timed = steps[warmup:]
    return {"gflop_without_mask_head": round(fixed, 2), "gflop_per_probed_step": steps,
            "gflop_mean_timed_steps": round(sum(timed) / len(timed), 1) if timed else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--infer", action="store_true", help="also count the detect graph (batch 1)")
    p.add_argument("--mask-rois", type=int, default=None,
                   help="mask-head ROIs per image for the training count (default: the largest probed, else 1)")
    p.add_argument("--probe-steps", type=int, default=0, help="real train steps to record the mask-head ROI count")
    args = p.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)  # as bench.py; the count does not depend on it
    tf.config.threading.set_inter_op_parallelism_threads(2)
    if args.infer:
        print(json.dumps(count_inference(args.size)), flush=True)
    config, model, step, inputs = build_training(args.size, args.batch)
    store = tf.Variable(0, dtype=tf.int32, trainable=False)
    with recording_mask_rois(store):
        probed = probe_mask_rois(step, inputs, args.probe_steps, store) if args.probe_steps else []
    if probed:
        print(json.dumps({"mode": "probe", "mask_rois_per_step": probed}), flush=True)
    rois = args.mask_rois or (max(probed) if probed else 1)
    out = count_training(model, step, inputs, args.batch, rois)
    out.update(size=args.size, slot=int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO),
               box_head_rois_per_image=int(config.TRAIN_ROIS_PER_IMAGE), probed_mask_rois=probed)
    out.update(per_step(out, probed, args.batch))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
