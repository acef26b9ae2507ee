"""The one place a tf.distribute strategy is made."""

from __future__ import annotations

import logging

import tensorflow as tf

logger = logging.getLogger(__name__)


def make_strategy(logical_cpus: int = 0) -> tf.distribute.Strategy:
    """MirroredStrategy over the GPUs, or over N logical CPUs, else the default.

    Args:
        logical_cpus: when > 1 and there is no GPU, split the CPU into this
            many logical devices and mirror across them (tests the
            multi-replica path without GPUs). Must run before TensorFlow
            initializes its devices.

    Returns:
        The strategy; ``num_replicas_in_sync`` says how many replicas.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        strategy: tf.distribute.Strategy = tf.distribute.MirroredStrategy()
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
