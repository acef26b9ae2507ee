"""The one place a tf.distribute strategy is made: one host, or several from ``TF_CONFIG``.

TensorFlow is imported inside the functions: a malformed ``TF_CONFIG`` is
refused before it is (with TF 2.17 imported, a process refusing an
unparsable one was seen hanging at exit).

``TF_CONFIG`` (the JSON Kubernetes operators, Vertex AI and TF clusters set)
naming more than one worker gives a ``MultiWorkerMirroredStrategy``: every
worker runs the same program; the chief (task ``chief``, else ``worker`` 0)
writes the results, the others write into a private folder they delete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

#: The task types a MultiWorkerMirroredStrategy cluster has.
TASK_TYPES = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class Task:
    """This process's place in a multi-worker cluster."""

    type: str
    index: int
    workers: int  # tasks that train: the chief and the workers
    has_chief: bool = False

    @property
    def is_chief(self) -> bool:
        """The chief writes the outputs: task ``chief``, or ``worker`` 0 when there is none."""
        return self.type == "chief" or (self.index == 0 and not self.has_chief)

    @property
    def name(self) -> str:
        return f"{self.type}-{self.index}"


def _address_problem(address: Any) -> str | None:
    if not isinstance(address, str) or ":" not in address:
        return f"{address!r} is not host:port"
    port = address.rsplit(":", 1)[1]
    return None if port.isdigit() else f"{address!r} has no numeric port"


def cluster_task(tf_config: str | None = None) -> Task | None:
    """The task of ``TF_CONFIG`` when its cluster has more than one worker, else None.

    Args:
        tf_config: the JSON text (default: the ``TF_CONFIG`` environment variable).

    Raises:
        ValueError: a malformed ``TF_CONFIG`` (one-line reason).
    """
    text = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not text.strip():
        return None
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from exc
    cluster = parsed.get("cluster") if isinstance(parsed, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError('needs a "cluster": {"worker": ["host:port", ...], ...}')
    for kind, addresses in cluster.items():
        if kind not in TASK_TYPES:
            raise ValueError(f"cluster has {kind!r} tasks: only {TASK_TYPES} (all-reduce training)")
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f"cluster {kind!r} must be a non-empty list of host:port")
        for address in addresses:
            problem = _address_problem(address)
            if problem:
                raise ValueError(f"cluster {kind!r}: {problem}")
    if len(cluster.get("chief", [])) > 1:
        raise ValueError("cluster has more than one chief")
    workers = sum(len(addresses) for addresses in cluster.values())
    if workers < 2:
        return None  # one host: the single-host strategies
    task = parsed.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ValueError(f'needs a "task": {{"type": one of {sorted(cluster)}, "index": N}}')
    index = task.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"task index {index!r} is not an integer")
    if not 0 <= index < len(cluster[task["type"]]):
        raise ValueError(f"task index {index} is outside the cluster's {task['type']!r} list")
    return Task(task["type"], index, workers, has_chief="chief" in cluster)


def worker_folder(output_dir: str, task: Task) -> str:
    """A non-chief worker's private folder: ``<parent>/.<name>.workers/<task>``.

    Derived from the output and the task alone, so a restarted worker finds
    its backup; beside the output's work folder, never inside it (the chief
    commits that folder whole).
    """
    parent, name = os.path.split(os.path.abspath(output_dir.rstrip("/")))
    return os.path.join(parent, f".{name}.workers", task.name)


def make_strategy(logical_cpus: int = 0, task: Task | None = None) -> Any:
    """MultiWorkerMirroredStrategy for a cluster task, else MirroredStrategy or the default.

    Args:
        logical_cpus: one host only: when > 1 and there is no GPU, split the
            CPU into this many logical devices and mirror across them (tests
            the multi-replica path without GPUs).
        task: this process's cluster task (:func:`cluster_task`).

    Must run before TensorFlow initializes its devices (and, with a task,
    before any other TF op: the collectives are configured at start-up).

    Returns:
        The strategy; ``num_replicas_in_sync`` says how many replicas.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if task is not None:
        # RING (gRPC) is the CPU implementation; NCCL needs GPUs.
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.AUTO
            if gpus
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        strategy: Any = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            )
        )
        logger.info(
            "Cluster task %s of %d workers (%s)",
            task.name,
            task.workers,
            "chief: writes the outputs" if task.is_chief else "not the chief",
        )
    elif gpus:
        strategy = tf.distribute.MirroredStrategy()
    elif logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus
            )
        except RuntimeError:
            # Devices already initialized (e.g. a second run in one process):
            # use what exists.
            logger.warning("CPU devices already initialized; using the existing ones")
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.get_strategy()
    logger.info(
        "Strategy %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync
    )
    return strategy


def is_multi_worker(strategy: Any) -> bool:
    """True for a strategy spanning several workers."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def gather(strategy: Any, values: list[int]) -> list[list[int]]:
    """Every worker's ``values`` (one row per replica); a collective: all workers call it.

    Also a barrier: no worker returns before all have called it.
    """
    import tensorflow as tf

    if not is_multi_worker(strategy):
        return [list(values)]
    local = tf.constant([values], tf.int64)
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: local)
    return [[int(v) for v in row] for row in strategy.gather(per_replica, axis=0).numpy()]


def worker_count(strategy: Any) -> int:
    """How many workers (hosts) the strategy spans: 1 but for a cluster."""
    if not is_multi_worker(strategy):
        return 1
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(spec.get(kind, [])) for kind in TASK_TYPES)
