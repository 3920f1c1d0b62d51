"""Speed benchmark of the lesions Mask R-CNN, optionally side by side with the peer harness.

    python benchmarks/bench.py                       # all measurements (~15 min on 2 idle cores)
    python benchmarks/bench.py --only infer512,train512_b2
    python benchmarks/bench.py --quick               # tiny sizes, a smoke test (~2 min)
    python benchmarks/bench.py --peers               # + TF Model Garden / torchvision (their venvs)
    python benchmarks/bench.py --compare ../shared/tools/peers/results_2026-11-22.jsonl

Prints one JSON line per measurement on stdout (progress on stderr). Every measurement runs in
its own subprocess (so ``peak_rss_mb`` is that measurement's), warms up, then keeps timing until
enough iterations were made during which other processes used at most 0.15 cores
(``BENCH_MAX_OTHERS_CORES``); ``others_cores`` is the mean share of the kept iterations,
``discarded`` the iterations thrown away, ``clean: false`` if the time budget ran out first.
Ratio lines (``"ratio": "lesions/<peer>"``) compare medians with peer lines of the same run
(``--peers``) or of a stored JSONL file (``--compare``); target lines (``"check": "target"``) hold
them against issue 17's targets (``TARGETS``: met or not, the speed-up still needed, the command
that profiles the workload).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.timing import wait_until_idle  # noqa: E402

#: name -> (mode, size, batch, extra keyword arguments of the workload)
MEASUREMENTS: dict[str, tuple[str, int, int, dict[str, Any]]] = {
    "infer512": ("infer", 512, 1, {}),
    "infer1024": ("infer", 1024, 1, {}),
    # Model Garden's and torchvision's RPN width (256) instead of Matterport's 512: equal architecture.
    "infer512_rpn256": ("infer", 512, 1, {"suffix": "_rpn256", "RPN_CONV_CHANNELS": 256}),
    "infer1024_rpn256": ("infer", 1024, 1, {"suffix": "_rpn256", "RPN_CONV_CHANNELS": 256}),
    "train512_b1": ("train", 512, 1, {}),
    "train512_b2": ("train", 512, 2, {}),
    "train1024_b1": ("train", 1024, 1, {}),
    # Mixed bfloat16 (MIXED_PRECISION "bfloat16"; oneDNN's AVX512-BF16/AMX kernels), same model and weights.
    "infer512_bf16": ("infer", 512, 1, {"suffix": "_bf16", "MIXED_PRECISION": "bfloat16"}),
    "infer1024_bf16": ("infer", 1024, 1, {"suffix": "_bf16", "MIXED_PRECISION": "bfloat16"}),
    "train512_b2_bf16": ("train", 512, 2, {"suffix": "_bf16", "MIXED_PRECISION": "bfloat16"}),
    "train1024_b1_bf16": ("train", 1024, 1, {"suffix": "_bf16", "MIXED_PRECISION": "bfloat16"}),
    "data1024": ("data", 1024, 1, {}),
    "data1024_aug": ("data", 1024, 1, {"augment": True}),
}
#: Our measurement -> the peer harness's (mode, size, batch).
PEER_WORKLOADS = {"infer512": ("infer", 512, 1), "infer1024": ("infer", 1024, 1),
                  "train512_b1": ("train", 512, 1), "train512_b2": ("train", 512, 2)}
# our bfloat16 lines: the same workloads, the peers run in mixed bfloat16 too (benchmarks/peer_bf16.py)
PEER_WORKLOADS.update({f"{name}_bf16": workload for name, workload in list(PEER_WORKLOADS.items())})
#: Peer name in its JSON lines -> (script, venv folder name).
PEER_SCRIPTS = {"tf-model-garden": ("tfmg_bench.py", "venv-tf"), "torchvision": ("torchvision_bench.py", "venv-torch")}
#: Peer lines that run the same model (keras-hub RetinaNet, also in the harness, does not).
COMPARABLE_PEERS = ("tf-model-garden", "torchvision", "torchvision-nopaste", "tf-model-garden-bf16", "torchvision-bf16")
PEER_BF16 = Path(__file__).resolve().parent / "peer_bf16.py"
WORKER_TIMEOUT_S = 900
#: Issue 17's targets: (our line, the peers it is held against (the fastest counts), the largest
#: time ratio). Inference with Matterport's architecture against Model Garden (graphs, no pasting),
#: the training step against the faster peer.
TARGETS = (("infer512_graph", ("tf-model-garden",), 0.85), ("infer1024_graph", ("tf-model-garden",), 0.85),
           ("train512_b2", ("tf-model-garden", "torchvision"), 0.85))
#: Where the time of each target's workload goes: the command that profiles it (op time by type
#: and by model part; benchmarks/README.md, "Issue 17", has the profiles and the FLOP arithmetic).
PROFILE_COMMANDS = {"infer512_graph": "python benchmarks/profile_ops.py --size 512 --runs 3",
                    "infer1024_graph": "python benchmarks/profile_ops.py --size 1024 --runs 2",
                    "train512_b2": "python benchmarks/profile_ops.py --size 512 --train 2 --runs 3"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated measurements: " + ", ".join(MEASUREMENTS))
    p.add_argument("--quick", action="store_true", help="tiny sizes and loops: checks that everything runs")
    p.add_argument("--peers", action="store_true", help="also run the peer harness scripts (if their venvs exist)")
    p.add_argument("--peers-dir", default=str(REPO.parent / "shared" / "tools" / "peers"),
                   help="the peer harness folder (default ../shared/tools/peers)")
    p.add_argument("--peers-venvs", default=os.environ.get("PEERS", "/tmp/peers"),
                   help="folder holding venv-tf and venv-torch (default $PEERS or /tmp/peers)")
    p.add_argument("--compare", default=None, help="JSONL file of earlier peer lines to compute ratios against")
    p.add_argument("--threads", type=int, default=2, help="TF intra/inter-op threads (as the harness)")
    p.add_argument("--idle-wait", type=float, default=None,
                   help="seconds to wait for a quiet machine before each measurement (default 120; --quick 0)")
    p.add_argument("--max-loop-s", type=float, default=None,
                   help="seconds of timed looping before noisy iterations are accepted "
                        "(default $BENCH_MAX_LOOP_S or 300; --quick 0: nothing discarded)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.idle_wait is None:
        args.idle_wait = 0.0 if args.quick else 120.0
    if args.max_loop_s is None:
        args.max_loop_s = 0.0 if args.quick else float(os.environ.get("BENCH_MAX_LOOP_S", "300"))
    return args


def selected(only: str) -> list[str]:
    """Measurement names from ``--only`` (underscores optional), all of them when empty."""
    if not only.strip():
        return list(MEASUREMENTS)
    canon = {n.replace("_", ""): n for n in MEASUREMENTS}
    names = []
    for raw in only.split(","):
        key = raw.strip().replace("_", "")
        if key not in canon:
            raise SystemExit(f"unknown measurement {raw.strip()!r}; choose from {', '.join(MEASUREMENTS)}")
        names.append(canon[key])
    return names


# -------------------------------------------------------------------------------------------
# Worker (one measurement, in its own process)

def run_worker(name: str, quick: bool, threads: int) -> list[dict[str, Any]]:
    """Run measurement ``name`` in this process and return its JSON-ready records."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from benchmarks import workloads

    mode, size, batch, extra = MEASUREMENTS[name]
    plan = workloads.Plan(quick=quick, threads=threads)
    runner = {"infer": workloads.run_infer, "train": workloads.run_train, "data": workloads.run_data}[mode]
    return runner(plan, size, batch, **extra)


def worker_command(name: str, args: argparse.Namespace) -> list[str]:
    """The subprocess command line of one measurement."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--threads", str(args.threads)]
    return cmd + (["--quick"] if args.quick else [])


def thread_env(threads: int, max_loop_s: float) -> dict[str, str]:
    """Environment with OpenMP/BLAS pools pinned to ``threads`` (as the peer harness does) and the
    timed-loop budget for the workers (``BENCH_MAX_LOOP_S``)."""
    env = dict(os.environ)
    env["BENCH_MAX_LOOP_S"] = str(max_loop_s)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(key, str(threads))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_subprocess(cmd: list[str], env: dict[str, str], cwd: str | None = None) -> list[dict[str, Any]]:
    """Run ``cmd``; JSON lines of its stdout (a failure becomes an ``error`` record)."""
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {WORKER_TIMEOUT_S} s", "command": " ".join(cmd)}]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-5:]
        records.append({"error": f"exit status {proc.returncode}", "command": " ".join(cmd), "stderr_tail": tail})
    return records


# -------------------------------------------------------------------------------------------
# Peers and ratios

def peer_command(peer: str, name: str, args: argparse.Namespace) -> list[str] | None:
    """The harness command for ``peer`` matching our measurement ``name`` (None if not comparable)."""
    if name not in PEER_WORKLOADS:
        return None
    script, venv = PEER_SCRIPTS[peer]
    mode, size, batch = PEER_WORKLOADS[name]
    python = Path(args.peers_venvs) / venv / "bin" / "python"
    # a bfloat16 measurement: the peer's own script, run in mixed bfloat16 by our wrapper
    launch = [str(PEER_BF16), peer, str(Path(args.peers_dir).resolve())] if name.endswith("_bf16") else [script]
    cmd = [str(python), *launch, "--mode", mode, "--size", str(size), "--batch", str(batch),
           "--threads", str(args.threads)]
    return cmd + (["--warmup", "1", "--runs", "2"] if args.quick else [])


def missing_peer_venvs(args: argparse.Namespace) -> dict[str, str]:
    """Peers whose venv or script is absent, with the reason."""
    missing = {}
    for peer, (script, venv) in PEER_SCRIPTS.items():
        python = Path(args.peers_venvs) / venv / "bin" / "python"
        if not (Path(args.peers_dir) / script).exists():
            missing[peer] = f"{Path(args.peers_dir) / script} not found"
        elif not python.exists():
            missing[peer] = f"{python} not found (build it with {Path(args.peers_dir) / 'setup_venvs.sh'})"
    return missing


def _key(rec: dict[str, Any]) -> tuple:
    return rec.get("mode"), rec.get("size"), rec.get("batch")


def ratio_records(ours: Iterable[dict[str, Any]], peers: Iterable[dict[str, Any]], source: str
                  ) -> list[dict[str, Any]]:
    """lesions/peer ratios of median seconds (and train peak RSS) for matching workloads.

    Inference: our detect() (with mask pasting) is compared with torchvision (which pastes) and our
    graph-only line with Model Garden (no pasting); both are given for each peer.
    """
    ours = [r for r in ours if r.get("peer") == "lesions" and "median_s" in r]
    out = []
    for peer in peers:
        if "median_s" not in peer or peer.get("peer") not in COMPARABLE_PEERS:
            continue
        for rec in ours:
            if _key(rec) != _key(peer) or rec.get("quick"):
                continue
            if rec.get("precision", "float32") == "float32" and peer.get("precision", "float32") != "float32":
                continue  # float32 lines against float32 peers only; bfloat16 lines against both
            item = {"ratio": f"lesions/{peer['peer']}", "name": rec["name"], "mode": rec["mode"],
                    "precision": rec.get("precision", "float32"), "peer_precision": peer.get("precision", "float32"),
                    "size": rec["size"], "batch": rec["batch"], "lesions_s": rec["median_s"],
                    "peer_s": peer["median_s"], "time_ratio": round(rec["median_s"] / peer["median_s"], 3),
                    "peer_clean": peer.get("clean"), "peer_others_cores": peer.get("others_cores"),
                    "lesions_others_cores": rec.get("others_cores"), "peer_source": source}
            if rec["mode"] == "train" and peer.get("peak_rss_mb"):
                item["rss_ratio"] = round(rec["peak_rss_mb"] / peer["peak_rss_mb"], 3)
            out.append(item)
    return out


def target_checks(ratios: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per issue-17 target that this run measured: our median against the fastest of its
    peers (float32 on both sides), the ratio, the target, ``met``, the speed-up still needed, and
    the command that profiles the workload."""
    ratios = [r for r in ratios if r.get("peer_precision") == "float32" and r.get("precision") == "float32"]
    out = []
    for name, peers, target in TARGETS:
        against = [r for r in ratios if r["name"] == name and r["ratio"].split("/", 1)[1] in peers]
        if not against:
            continue
        fastest = min(against, key=lambda r: r["peer_s"])
        out.append({"check": "target", "name": name, "against": fastest["ratio"], "lesions_s": fastest["lesions_s"],
                    "peer_s": fastest["peer_s"], "time_ratio": fastest["time_ratio"], "target": target,
                    "met": fastest["time_ratio"] <= target,
                    "speedup_needed": round(max(1.0, fastest["time_ratio"] / target), 3),
                    "profile": PROFILE_COMMANDS[name], "peer_source": fastest["peer_source"]})
    return out


def load_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a JSONL file (non-JSON lines skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def pipeline_check(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Input pipeline images/s over the images/s a 1024 px training step consumes (target >= 3)."""
    data = next((r for r in records if r.get("name", "").startswith("data") and r.get("name", "").endswith(
        tuple(str(s) for s in (1024, 256))) and "images_per_s" in r), None)
    train = next((r for r in records if r.get("mode") == "train" and r.get("size") in (1024, 256)
                  and "per_image_s" in r), None)
    if data is None or train is None:
        return None
    consumed = 1.0 / train["per_image_s"]
    return {"check": "pipeline_vs_train", "pipeline_images_per_s": data["images_per_s"],
            "train_images_per_s": round(consumed, 3), "ratio": round(data["images_per_s"] / consumed, 2),
            "target": 3.0}


# -------------------------------------------------------------------------------------------
# Main

def emit(rec: dict[str, Any], out: str | None) -> None:
    """Print one JSON line (and append it to ``out``)."""
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def log(text: str) -> None:
    """Progress message on stderr."""
    print(f"# {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the selected measurements (and peers) one subprocess each; returns every record."""
    names = selected(args.only)
    env = thread_env(args.threads, args.max_loop_s)
    missing = missing_peer_venvs(args) if args.peers else {}
    for peer, why in missing.items():
        log(f"--peers: skipping {peer}: {why}")
    ours, peers = [], []
    for name in names:
        if args.idle_wait:
            log(f"waiting up to {args.idle_wait:.0f} s for a quiet machine "
                f"(others use {wait_until_idle(args.idle_wait):.2f} cores)")
        log(f"lesions {name}{' (quick)' if args.quick else ''}")
        for rec in run_subprocess(worker_command(name, args), env):
            emit(rec, args.out)
            ours.append(rec)
        for peer in PEER_SCRIPTS if args.peers else ():
            cmd = peer_command(peer, name, args)
            if peer in missing or cmd is None:
                continue
            log(f"{peer} {name}")
            for rec in run_subprocess(cmd, env, cwd=args.peers_dir):
                emit(rec, args.out)
                peers.append(rec)
    return ours + peers


def main(argv: list[str] | None = None) -> int:
    """Entry point: a worker run (``--worker``) or the whole bench."""
    args = parse_args(argv)
    if args.worker:
        for rec in run_worker(args.worker, args.quick, args.threads):
            print(json.dumps(rec), flush=True)
        return 0
    records = run_all(args)
    ours = [r for r in records if r.get("peer") == "lesions"]
    peers = [r for r in records if r.get("peer") not in (None, "lesions")]
    extra = ratio_records(ours, peers, "this run")
    targets = target_checks(extra)
    if args.compare:  # stored peers get their own target lines: a target never mixes two runs' peers
        stored = ratio_records(ours, load_jsonl(args.compare), args.compare)
        extra, targets = extra + stored, targets + target_checks(stored)
    check = pipeline_check(ours)
    for rec in extra + targets + ([check] if check else []):
        emit(rec, args.out)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
