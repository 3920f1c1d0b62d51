"""Run a peer harness script (../shared/tools/peers) in mixed bfloat16, for an equal-precision
comparison with our ``MIXED_PRECISION = "bfloat16"`` lines. Runs inside the peer's venv:

    /tmp/peers/venv-torch/bin/python benchmarks/peer_bf16.py torchvision ../shared/tools/peers --mode infer --size 512
    /tmp/peers/venv-tf/bin/python    benchmarks/peer_bf16.py tf-model-garden ../shared/tools/peers --mode train --size 512 --batch 2

torchvision: the harness's ``main()`` inside ``torch.autocast("cpu", dtype=torch.bfloat16)``
(forward ops in bfloat16 where autocast allows, backward follows). Model Garden: tf_keras's
global policy ``mixed_bfloat16`` before the harness builds the model. The JSON line is the
harness's own, with ``peer`` suffixed ``-bf16`` and ``"precision": "bfloat16"``. Nothing of the
harness is copied; it is imported from the folder given.
"""

from __future__ import annotations

import sys


def _patch_emit(bench_common) -> None:
    """Make the harness's JSON line say bfloat16."""
    original = bench_common.emit

    def emit(peer, *args, **kwargs):
        kwargs["precision"] = "bfloat16"
        return original(f"{peer}-bf16", *args, **kwargs)

    bench_common.emit = emit


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[1] not in ("torchvision", "tf-model-garden"):
        print("usage: peer_bf16.py torchvision|tf-model-garden PEERS_DIR [harness options]", file=sys.stderr)
        return 2
    peer, peers_dir = sys.argv[1], sys.argv[2]
    sys.argv = [f"{peer}_bench.py", *sys.argv[3:]]
    sys.path.insert(0, peers_dir)
    import bench_common

    _patch_emit(bench_common)
    if peer == "torchvision":
        import torch
        import torchvision_bench

        with torch.autocast("cpu", dtype=torch.bfloat16):
            torchvision_bench.main()
    else:
        import tf_keras

        tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
        import tfmg_bench

        tfmg_bench.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
