"""Training on several machines: ``TF_CONFIG`` -> ``tf.distribute.MultiWorkerMirroredStrategy``.

Every machine (a *worker*) runs the same training command with its own ``TF_CONFIG``, e.g.::

    {"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}

* :func:`cluster_from_env` reads and checks ``TF_CONFIG``: None without one (or with a cluster
  of one worker), else a :class:`Cluster`; a malformed value raises :class:`ClusterConfigError`
  (a one-line UserError naming the problem).
* :func:`strategy` creates the process's one MultiWorkerMirroredStrategy (TensorFlow needs it
  before any other TensorFlow op), with a collective timeout, so that when a worker dies the
  others fail instead of waiting for it forever.
* Worker 0 (or the task of type ``chief``) is the *chief*: it alone writes checkpoints, logs and
  split files; the other workers write nothing (:func:`is_chief`).
* Each worker feeds its own share of every global batch (:func:`shard_indices`): the global
  batch of step k is samples [k * G, (k + 1) * G) of the single-process order (G = BATCH_SIZE x
  workers), worker w takes the w-th slice of BATCH_SIZE, so the union over workers is the batch
  one process with the same global batch would see.
* :func:`check_same_start` makes every worker stop with one line unless all start from the same
  epoch, weights and optimiser state (e.g. ``--weights last`` without a shared ``--logs`` folder).
  Every worker restores the optimiser state the chief saved beside the checkpoint, by the same rule
  (:func:`mrcnn.optimizer_state.resume`), from the shared folder.
* :func:`lost_worker_error` turns the error a collective raises when a peer is gone into a
  :class:`WorkerLostError` whose one-line message names the worker, when TensorFlow says it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from mrcnn.errors import UserError

ENV = "TF_CONFIG"


class ClusterConfigError(UserError):
    """``TF_CONFIG`` is not valid JSON or does not describe this task in a cluster (one line)."""


class WorkerLostError(RuntimeError):
    """A peer worker stopped answering during multi-worker training (one line; exit status 1)."""


@dataclass(frozen=True)
class Cluster:
    """The training cluster of ``TF_CONFIG``: every task's address, and which task this is.

    ``tasks``: (type, index, "host:port") of every task, the chief first if there is one, then
    the workers in order. ``task_type``/``task_index``: this process.
    """

    tasks: tuple[tuple[str, int, str], ...]
    task_type: str
    task_index: int

    @property
    def size(self) -> int:
        """Number of training processes (chief and workers)."""
        return len(self.tasks)

    @property
    def rank(self) -> int:
        """Position of this task in ``tasks`` (0 = the chief): its shard of each global batch."""
        return next(i for i, (kind, index, _) in enumerate(self.tasks)
                    if kind == self.task_type and index == self.task_index)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def describe(self, task_type: str, task_index: int) -> str:
        """``worker 1 (host1:12345)``: a task by type, index and address."""
        for kind, index, address in self.tasks:
            if kind == task_type and index == task_index:
                return f"{kind} {index} ({address})"
        return f"{task_type} {task_index}"


def _fail(raw: str, problem: str) -> ClusterConfigError:
    shown = " ".join(raw.split())
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    return ClusterConfigError(f"{ENV} {problem} (got {shown!r}); expected e.g. "
                              '{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
                              '"task": {"type": "worker", "index": 0}}')


def parse_cluster(raw: str) -> Cluster | None:
    """The :class:`Cluster` of a ``TF_CONFIG`` value; None for an empty value or a single task."""
    if not raw.strip():
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _fail(raw, f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise _fail(raw, 'has no "cluster" object')
    cluster, task = spec["cluster"], spec.get("task")
    unknown = sorted(set(cluster) - {"chief", "worker", "evaluator", "ps"})
    if unknown:
        raise _fail(raw, f'names unknown task types {unknown} in "cluster" (use "chief" and "worker")')
    if "ps" in cluster:
        raise _fail(raw, 'has parameter servers ("ps"): training supports chief and workers only')
    tasks: list[tuple[str, int, str]] = []
    for kind in ("chief", "worker"):
        addresses = cluster.get(kind, [])
        if not isinstance(addresses, list) or not all(
                isinstance(a, str) and re.fullmatch(r"\S+:\d{1,5}", a) for a in addresses):
            raise _fail(raw, f'"cluster"."{kind}" must be a list of "host:port" strings')
        tasks += [(kind, i, a) for i, a in enumerate(addresses)]
    if len(cluster.get("chief", [])) > 1:
        raise _fail(raw, 'lists more than one "chief"')
    if len({a for _, _, a in tasks}) != len(tasks):
        raise _fail(raw, "lists an address twice")
    if not isinstance(task, dict) or task.get("type") not in ("chief", "worker") \
            or not isinstance(task.get("index"), int) or isinstance(task.get("index"), bool):
        raise _fail(raw, 'needs "task": {"type": "worker" or "chief", "index": N}')
    if not any(kind == task["type"] and index == task["index"] for kind, index, _ in tasks):
        raise _fail(raw, f'has no {task["type"]} {task["index"]} in its "cluster"')
    if len(tasks) < 2:
        return None
    return Cluster(tuple(tasks), task["type"], task["index"])


def cluster_from_env(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """:func:`parse_cluster` of ``TF_CONFIG`` (default: this process's environment)."""
    return parse_cluster((os.environ if environ is None else environ).get(ENV, ""))


_STRATEGY: Any = None


def strategy(cluster: Cluster, timeout_seconds: float) -> Any:
    """This process's MultiWorkerMirroredStrategy (created at the first call, then reused).

    ``timeout_seconds``: how long a collective (gradient all-reduce) waits for the other workers
    before it fails. Must be called before TensorFlow runs any op (ClusterConfigError otherwise).
    """
    global _STRATEGY
    if _STRATEGY is None:
        import tensorflow as tf

        print(f"Multi-worker training: this is {cluster.describe(cluster.task_type, cluster.task_index)}"
              f"{' (chief)' if cluster.is_chief else ''}, one of {cluster.size} workers; waiting for all of them",
              flush=True)
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=float(timeout_seconds))
        try:
            _STRATEGY = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        except (RuntimeError, ValueError) as exc:
            raise ClusterConfigError(f"{ENV}: cannot start multi-worker training ({' '.join(str(exc).split())});"
                                     " it must start before TensorFlow runs anything else in the process") from exc
    return _STRATEGY


def active_cluster() -> Cluster | None:
    """The cluster of the running multi-worker strategy, or None (single process)."""
    return cluster_from_env() if _STRATEGY is not None else None


def is_chief() -> bool:
    """True unless this process is a non-chief worker of a running multi-worker strategy."""
    cluster = active_cluster()
    return cluster is None or cluster.is_chief


def worker_count() -> int:
    """Number of workers of the running multi-worker strategy (1 without one)."""
    cluster = active_cluster()
    return 1 if cluster is None else cluster.size


def shard_indices(start: int, batch_size: int, workers: int, rank: int):
    """Sample numbers of worker ``rank``: its ``batch_size`` slice of every global batch.

    Returns a function j -> sample number (j = 0, 1, ... this worker's own sample count):
    ``start + (j // B) * B * workers + rank * B + j % B`` (B = ``batch_size``).
    """
    def index(j):
        return start + (j // batch_size) * batch_size * workers + rank * batch_size + j % batch_size
    return index


def check_same_start(strategy: Any, cluster: Cluster, epoch: int, weights: list,
                     optimizer_state: list | None = None) -> None:
    """ClusterConfigError on every worker unless all start at the same ``epoch`` with the same
    ``weights`` and ``optimizer_state`` (numpy arrays, e.g. :func:`mrcnn.optimizer_state.state_arrays`;
    compared through their sums, exactly: all load the same files)."""
    import numpy as np
    import tensorflow as tf

    def total(arrays: list | None) -> float:
        return float(sum(np.sum(a, dtype=np.float64) for a in arrays or []))

    table = np.zeros([cluster.size, 3])  # row r: worker r's epoch, weight sum, state sum (others fill theirs)
    table[cluster.rank] = epoch, total(weights), total(optimizer_state)
    local = tf.constant(table / (strategy.num_replicas_in_sync // cluster.size))  # summed over local replicas too

    @tf.function
    def exchange():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                                                   local))

    starts = strategy.experimental_local_results(exchange())[0].numpy()
    low, high = starts.min(axis=0), starts.max(axis=0)
    if np.array_equal(low, high):
        return
    if high[0] != low[0]:
        what = f"epochs {low[0]:.0f} to {high[0]:.0f}"
    elif high[1] != low[1]:
        what = f"the same epoch {epoch} but different weights"
    else:
        what = f"the same epoch {epoch} and weights but different optimizer states (one has its optimizer_*.h5)"
    raise ClusterConfigError(
        f"the {cluster.size} workers start from different checkpoints ({what}; this is "
        f"{cluster.describe(cluster.task_type, cluster.task_index)} at epoch {epoch}): give every worker the "
        "same --weights file (--weights last needs one --logs folder that all workers share)")


_TASK = re.compile(r"/job:(chief|worker)/replica:\d+/task:(\d+)")


def lost_worker_error(exc: BaseException, cluster: Cluster, where: str) -> WorkerLostError:
    """One-line error for a collective that failed because a peer is gone; names the peer when
    TensorFlow's message names a task other than this one."""
    text = " ".join(str(exc).split())
    peers = []
    for kind, index in _TASK.findall(text):
        if (kind, int(index)) != (cluster.task_type, cluster.task_index) and (kind, int(index)) not in peers:
            peers.append((kind, int(index)))
    if peers:
        lost = " or ".join(cluster.describe(kind, index) for kind, index in peers)
    else:
        lost = "another worker"
    reason = type(exc).__name__
    return WorkerLostError(f"multi-worker training stopped {where}: lost contact with {lost} ({reason}); "
                           "restart every worker with --weights last to resume from the chief's newest checkpoint")
