"""Training on several machines (issue 17, point 4): TF_CONFIG -> MultiWorkerMirroredStrategy.

Fast checks: TF_CONFIG parsing (one-line errors naming the problem, exit 2 from the CLI before
TensorFlow starts) and the batch sharding (the union of the workers' shares of every global batch
is the single-process batch).

One real run, shared by the last three tests (module fixture): two CLI workers on free localhost
ports (``TF_CONFIG``, ``CUDA_VISIBLE_DEVICES=""``, one CPU device each, IMAGES_PER_GPU 1: global
batch 2) train the tiny preset (ResNet-18) for 2 epochs; at the same time one process with the
same global batch (GPU_COUNT 2 over two logical CPUs, IMAGES_PER_GPU 1: the same per-replica
batches and all-reduce, in one process) trains epoch 1. All three run with TF op determinism and
ROI_POSITIVE_RATIO 1 with TRAIN_ROIS_PER_IMAGE = POST_NMS_ROIS_TRAINING, so the ROI sampling keeps
every positive proposal (no random subset: the random streams of the two set-ups differ).
Measured: the epoch-1 weights were bit-identical in 3 of 3 runs (same per-replica batches, same
all-reduce sum of two terms); the bound, 1e-5 of the largest weight (about 1.0), leaves room for
another summation order on other builds, and is ~0.4% of what one such epoch moves a weight (up to
2.7e-3, epoch 2 vs epoch 1): a batch with other images should not pass (not tried).
As soon as the chief's epoch-1 checkpoint exists, worker 1 is SIGKILLed: the chief must exit 1
within a bounded time with one line naming worker 1, keep its epoch-1 checkpoint intact and write
no epoch-2 one; then ``--weights last`` in one plain process (IMAGES_PER_GPU 2) resumes at epoch 1
from that checkpoint and finishes epoch 2. Every subprocess has a hard timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import LESIONS, TF_NOISE, TINY, assert_user_error

from mrcnn.multiworker import ClusterConfigError, lost_worker_error, parse_cluster, shard_indices

#: The schedule and the small model of the real run (tiny preset, ResNet-18: quick to trace).
SETTINGS = ["--set", "BACKBONE=resnet18", "--set", "HEADS_EPOCHS=2", "--set", "ALL_EPOCHS=2",
            "--set", "STEPS_PER_EPOCH=3", "--set", "VALIDATION_STEPS=1",
            "--set", "ROI_POSITIVE_RATIO=1.0", "--set", "TRAIN_ROIS_PER_IMAGE=64",
            "--set", "MULTI_WORKER_TIMEOUT=60"]
TRAIN = ["--mode", "train", "--dataset", "demo", "--config", str(TINY), "--no-cache", *SETTINGS]
TIMEOUT = 300  # seconds, any one process (three TensorFlow processes share two busy cores; ~2 min seen)
LOST_WORKER_SECONDS = 150  # the chief must give up this soon after its peer died

#: Runs lesions.py (argv after the script) with TF op determinism; LOGICAL_CPUS=2 splits the CPU in two.
LAUNCH = """
import os, runpy, sys
import tensorflow as tf
tf.config.experimental.enable_op_determinism()
if os.environ.get("LOGICAL_CPUS") == "2":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# -------------------------------------------------------------------------------------------
# TF_CONFIG and sharding (no TensorFlow)

def tf_config(ports: list[int], index: int, kind: str = "worker") -> str:
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": kind, "index": index}})


def test_tf_config_is_parsed_and_checked():
    cluster = parse_cluster(tf_config([1111, 2222], 1))
    assert cluster.size == 2 and cluster.rank == 1 and not cluster.is_chief
    assert cluster.describe("worker", 0) == "worker 0 (localhost:1111)"
    assert parse_cluster(tf_config([1111, 2222], 0)).is_chief
    with_chief = parse_cluster(json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]},
                                           "task": {"type": "worker", "index": 0}}))
    assert with_chief.size == 3 and with_chief.rank == 1 and not with_chief.is_chief
    assert parse_cluster("") is None and parse_cluster(tf_config([1111], 0)) is None  # one process: no cluster
    bad = {
        "{": "is not valid JSON",
        json.dumps({"task": {"type": "worker", "index": 0}}): 'has no "cluster" object',
        json.dumps({"cluster": {"worker": ["a:1", "b:2"]}}): 'needs "task"',
        tf_config([1111, 2222], 2): "has no worker 2 in its",
        json.dumps({"cluster": {"worker": ["a", "b:2"]}, "task": {"type": "worker", "index": 0}}): '"host:port"',
        json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}): '"ps"',
        json.dumps({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}): "address twice",
    }
    for raw, words in bad.items():
        with pytest.raises(ClusterConfigError, match=re.escape(words)) as caught:
            parse_cluster(raw)
        assert str(caught.value).startswith("TF_CONFIG ") and "\n" not in str(caught.value)


def test_malformed_tf_config_is_one_line_exit_2(tmp_path):
    env = dict(os.environ, TF_CONFIG='{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker"}}',
               TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(LESIONS), *TRAIN], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert_user_error(proc, "TF_CONFIG", '"task"')
    assert not (tmp_path / "logs").exists() and not (tmp_path / "demo_data").exists()
    env["TF_CONFIG"] = tf_config([1111, 2222], 0)
    proc = subprocess.run([sys.executable, str(LESIONS), *TRAIN, "--folds", "2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert_user_error(proc, "--folds", "multi-worker TF_CONFIG")


def test_lost_worker_message_names_the_peer_from_tensorflows_error():
    cluster = parse_cluster(tf_config([1111, 2222, 3333], 0))
    error = RuntimeError("Collective ops is aborted by: Task /job:worker/replica:0/task:2 heartbeat timeout; "
                         "also seen on /job:worker/replica:0/task:0")
    message = str(lost_worker_error(error, cluster, "during epoch 3"))
    assert message.startswith("multi-worker training stopped during epoch 3: lost contact with worker 2 "
                              "(localhost:3333) (RuntimeError); restart every worker with --weights last")
    assert "another worker" in str(lost_worker_error(RuntimeError("socket closed"), cluster, "here"))


@pytest.mark.parametrize("per_worker, workers", [(1, 2), (2, 2), (3, 4)])
def test_workers_share_each_global_batch_like_one_process(per_worker, workers):
    start, steps = 10, 5
    shares = [[shard_indices(start, per_worker, workers, rank)(j) for j in range(steps * per_worker)]
              for rank in range(workers)]
    for step in range(steps):
        union = sorted(i for share in shares for i in share[step * per_worker:(step + 1) * per_worker])
        assert union == list(range(start + step * per_worker * workers, start + (step + 1) * per_worker * workers))


def test_steps_of_zero_are_one_pass_with_the_global_batch():
    import lesions
    from lesionkit.training_run import complete_steps

    config = lesions.build_config(str(TINY), ["STEPS_PER_EPOCH=0", "VALIDATION_STEPS=0", "IMAGES_PER_GPU=2"])
    one, two = complete_steps(config, 101, 10), complete_steps(config, 101, 10, workers=2)
    assert (one.STEPS_PER_EPOCH, one.VALIDATION_STEPS) == (51, 5)  # ceil(101 / 2), ceil(10 / 2)
    assert (two.STEPS_PER_EPOCH, two.VALIDATION_STEPS) == (26, 3)  # ceil(101 / 4), ceil(10 / 4)


# -------------------------------------------------------------------------------------------
# The real run

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(work: Path, name: str, args: list[str], **env: str) -> subprocess.Popen:
    """lesions.py ARGS under LAUNCH in ``work``; stdout/stderr to ``work/<name>.out|err``."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
                    CUDA_VISIBLE_DEVICES="", **env)
    full_env.pop("TF_CONFIG", None)
    full_env.update(env)
    with open(work / f"{name}.out", "wb") as out, open(work / f"{name}.err", "wb") as err:
        return subprocess.Popen([sys.executable, "-c", LAUNCH, str(LESIONS), *args], cwd=work, env=full_env,
                                stdout=out, stderr=err)


def finish(proc: subprocess.Popen, seconds: float) -> int:
    """Exit status within ``seconds`` (else killed: the test fails instead of hanging)."""
    try:
        return proc.wait(max(seconds, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
        pytest.fail(f"process {proc.args[3:6]} still running after {seconds:.0f} s: killed")


def text(work: Path, name: str) -> str:
    return (work / name).read_text(errors="replace")


def weights_of(path: Path) -> dict[str, np.ndarray]:
    from mrcnn.weights import read_weight_file

    return {f"{layer}/{name}": array for layer, arrays in read_weight_file(str(path)).items()
            for name, array in arrays}


def run_folder(logs: Path) -> Path:
    (folder,) = [d for d in logs.iterdir() if d.is_dir()]
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The two-worker run (killed in epoch 2), the one-process reference, and the resume."""
    import lesions

    work = tmp_path_factory.mktemp("multiworker")
    lesions.prepare_demo_data(lesions.build_config(str(TINY), [a for a in SETTINGS if a != "--set"]),
                              work / "demo_data")  # once, before three processes would race to write it
    ports, resume = free_ports(2), None
    workers = [launch(work, f"worker{i}", [*TRAIN, "--set", "IMAGES_PER_GPU=1", "--logs", "logs_mw",
                                           "--weights", "none"], TF_CONFIG=tf_config(ports, i))
               for i in range(2)]
    reference = launch(work, "reference", [*TRAIN, "--set", "GPU_COUNT=2", "--set", "IMAGES_PER_GPU=1",
                                           "--set", "ALL_EPOCHS=1", "--set", "HEADS_EPOCHS=1",
                                           "--logs", "logs_one", "--weights", "none"], LOGICAL_CPUS="2")
    try:
        started, first = time.monotonic(), None
        while first is None and time.monotonic() - started < TIMEOUT:
            found = list((work / "logs_mw").glob("*/mask_rcnn_lesion_0001.h5"))
            if found:
                first = found[0]
            elif any(p.poll() is not None for p in workers):
                break
            time.sleep(0.1)
        killed = time.monotonic()
        workers[1].send_signal(signal.SIGKILL)
        assert first is not None, text(work, "worker0.out")[-2000:] + text(work, "worker0.err")[-3000:]
        chief_code = finish(workers[0], LOST_WORKER_SECONDS)
        chief_seconds = time.monotonic() - killed
        workers[1].wait(30)
        files_after_kill = sorted(p.name for p in run_folder(work / "logs_mw").iterdir()
                                  if not p.name.startswith("events."))
        newest_after_kill = sorted((work / "logs_mw").glob("*/mask_rcnn_*.h5"))
        first_after_kill = weights_of(first)
        # --weights last, in one plain process with the same global batch, while the reference finishes
        resume = launch(work, "resume", [*TRAIN, "--set", "IMAGES_PER_GPU=2", "--logs", "logs_mw",
                                         "--weights", "last"])
        reference_code = finish(reference, TIMEOUT - (time.monotonic() - started))
        resume_code = finish(resume, TIMEOUT)
    finally:
        for proc in (*workers, reference, resume):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert reference_code == 0, text(work, "reference.out")[-2000:] + text(work, "reference.err")[-3000:]
    return {"work": work, "first": first, "chief_code": chief_code, "chief_seconds": chief_seconds,
            "chief_out": text(work, "worker0.out"), "chief_err": text(work, "worker0.err"),
            "worker_out": text(work, "worker1.out"), "newest_after_kill": newest_after_kill,
            "files_after_kill": files_after_kill,
            "first_after_kill": first_after_kill, "resume_code": resume_code}


def test_two_workers_end_with_the_weights_of_one_process_with_the_same_global_batch(run):
    work = run["work"]
    assert "this is worker 0 (localhost:" in run["chief_out"] and "(chief), one of 2 workers" in run["chief_out"]
    assert "this is worker 1 (localhost:" in run["worker_out"]
    mw = weights_of(run["first"])
    one = weights_of(run_folder(work / "logs_one") / "mask_rcnn_lesion_0001.h5")
    assert mw.keys() == one.keys() and len(mw) > 50
    # the chief alone wrote files; the worker wrote nothing, anywhere
    assert run["files_after_kill"] == ["config.json", "mask_rcnn_lesion_0001.h5", "optimizer_lesion_0001.h5",
                                       "split.json", "training.csv"]
    worst = max(float(np.abs(mw[k] - one[k]).max()) for k in mw)
    scale = max(float(np.abs(one[k]).max()) for k in one)
    print(f"\nmulti-worker vs one process, epoch 1: max |difference| {worst:.3g} (weights up to {scale:.3g})")
    assert worst < 1e-5 * scale, worst


def test_a_killed_worker_stops_the_chief_with_one_line(run):
    lines = [s for s in run["chief_err"].splitlines() if s.strip() and not TF_NOISE.match(s)]
    assert run["chief_code"] == 1, run["chief_err"][-3000:]
    assert len(lines) == 1 and "Traceback" not in run["chief_err"], run["chief_err"][-3000:]
    assert re.fullmatch(r"lesions: error: multi-worker training stopped during epoch 2 \(the chief keeps its "
                        r"checkpoints up to epoch 1\): lost contact with worker 1 \(localhost:\d+\) \(\w+\); "
                        r"restart every worker with --weights last to resume from the chief's newest checkpoint",
                        lines[0]), lines[0]
    assert run["chief_seconds"] < LOST_WORKER_SECONDS
    print(f"\nchief stopped {run['chief_seconds']:.0f} s after worker 1 was killed")


def test_the_run_resumes_from_the_chiefs_checkpoint_with_weights_last(run):
    import lesions

    work = run["work"]
    logs = work / "logs_mw"
    assert run["newest_after_kill"] == [run["first"]]  # no epoch-2 file, no torn file
    out, err = text(work, "resume.out"), text(work, "resume.err")
    assert run["resume_code"] == 0, out[-2000:] + err[-3000:]
    assert "Re-starting from epoch 1" in out and "Multi-worker" not in out
    assert "Stage 'heads': epochs 2..2" in out
    # the chief's optimiser state of epoch 1 (SGD momentum, step 3) fits the one-process model too
    assert "Optimizer: continues from its state after epoch 1 (step 3, optimizer_lesion_0001.h5)" in out
    before = run["first_after_kill"]
    unchanged = weights_of(run["first"])
    assert all(np.array_equal(unchanged[k], before[k]) for k in before)  # the resume kept epoch 1 as it was
    second = run_folder(logs) / "mask_rcnn_lesion_0002.h5"
    after = weights_of(second)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # epoch 2 trained on from epoch 1
    assert lesions.find_last_checkpoint(logs, "lesion") == second
