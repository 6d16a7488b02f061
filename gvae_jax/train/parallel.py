"""Data parallelism over a device mesh: jit with NamedShardings, one or many processes.

The train step is a `jax.jit` over a 1-D mesh of every device of every
process (axis 'data'): the batch is sharded along 'data', parameters and
optimiser state are replicated, and XLA inserts the gradient all-reduce. This
replaces `jax.pmap`, which current JAX documents as the "old way" (it is now
implemented on top of jit and shard_map); the jit form is the same program on
one CPU, an 8-GPU host or a TPU pod slice, with global arrays, so Orbax can
write one checkpoint from all processes.

Multi-process (`jax.distributed`): every process runs the same program; each
holds only its devices' rows of the global batch and assembles the global
array with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str, num_processes: int | None,
                           process_id: int | None) -> None:
  """jax.distributed.initialize, with cross-process CPU collectives enabled.

  On CPU (tests, or a CPU cluster) the gradient all-reduce across processes
  needs a collectives implementation; gloo ships with jaxlib. GPUs and TPUs
  use NCCL / ICI and ignore this setting.
  """
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # a JAX without the option: its default applies
    pass
  if coordinator_address == "auto":  # Cloud TPU VMs, SLURM, ...: JAX finds the cluster
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def barrier(name: str, timeout_seconds: int = 3600) -> None:
  """Waits until every process gets here (no-op with one process).

  Uses the jax.distributed coordination service, not a device collective: on
  CPU a collective's first use sets up gloo with a 30 s deadline, too short
  when one process compiles (or prepares data, or evaluates) longer than the
  others. So the processes meet here before each such first use.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client has no public accessor

  client = getattr(distributed.global_state, "client", None)
  if client is not None and hasattr(client, "wait_at_barrier"):
    client.wait_at_barrier(name, timeout_in_ms=timeout_seconds * 1000)
  else:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
  return jax.process_index() == 0


def make_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices, ordered by process so each process owns a
  contiguous block of the global batch."""
  devices = list(jax.devices() if devices is None else devices)
  devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical in every process) -> global arrays replicated on the mesh.

  make_array_from_callback works across processes in every supported JAX
  (device_put of a host value onto non-addressable devices does not).
  """
  sharding = replicated(mesh)

  def put(value):
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(put, tree)


def to_host(tree: Any) -> Any:
  """Replicated global arrays -> numpy, from this process's first shard (no
  communication: every shard of a replicated array holds the whole value)."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> the global batch sharded along 'data' (rows of
  process p are rows p*L .. (p+1)*L - 1 of the global batch)."""
  sharding = batch_sharded(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in local_batch.items()}


def prefetch_to_mesh(batches: Iterator[dict[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Keeps `size` batches already transferred to the devices, so the host-to-
  device copy of batch k+1 overlaps the train step on batch k."""
  queue: collections.deque = collections.deque()

  def enqueue(n):
    for local in itertools.islice(batches, n):
      queue.append(global_batch(local, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
