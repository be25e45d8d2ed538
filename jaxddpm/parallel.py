"""Devices and hosts: one 1-D `data` mesh over every device of every process.

Data parallelism only: the batch is split along the `data` axis, the train
state is replicated. One CPU, eight GPUs and a multi-host pod run the same
code; only the mesh size changes.

Multi-host runs call `maybe_initialize_distributed` before anything touches a
device. Each process then loads its own slice of the global batch
(`process_batch_size` examples) and `host_to_global` assembles the slices into
one global `jax.Array` sharded over the mesh.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'

# Environment variables that ask for a multi-process run (the first is also
# read by `jax.distributed.initialize` itself).
_ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
_ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
_ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def maybe_initialize_distributed(enabled: bool | None = None, *,
                                 coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize()` for a multi-process run.

  Args:
    enabled: True forces initialisation (arguments not given are read from
      the environment or detected by JAX: SLURM, Open MPI, Cloud TPU, ...);
      None initialises only when `JAX_COORDINATOR_ADDRESS` or
      `JAX_NUM_PROCESSES` is set; False never initialises.
    coordinator_address: 'host:port' of process 0 (else `JAX_COORDINATOR_ADDRESS`).
    num_processes: number of processes (else `JAX_NUM_PROCESSES`).
    process_id: this process's index (else `JAX_PROCESS_ID`).

  Returns:
    Whether `jax.distributed.initialize` was called.

  Must run before any JAX computation. Collectives between CPU processes use
  gloo (GPU and TPU backends are unaffected by that setting).
  """
  if enabled is False:
    return False
  env = os.environ
  if enabled is None and not (env.get(_ENV_COORDINATOR) or env.get(_ENV_NUM_PROCESSES)):
    return False
  if num_processes is None and env.get(_ENV_NUM_PROCESSES):
    num_processes = int(env[_ENV_NUM_PROCESSES])
  if process_id is None and env.get(_ENV_PROCESS_ID):
    process_id = int(env[_ENV_PROCESS_ID])
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id)
  return True


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes).

  Auto axis types: sharding inside the step is left to the compiler, which for
  a replicated state and a batch-sharded input means one all-reduce of the
  gradients.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def data_sharding(mesh: jax.sharding.Mesh, *, batch_axis: int = 0) -> NamedSharding:
  """Dimension `batch_axis` split over 'data', the rest whole."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def process_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch (each process reads its own slice)."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(
        f'Global batch {global_batch_size} is not divisible by the '
        f'{count} processes.')
  return global_batch_size // count


def host_to_global(batch: Any, mesh: jax.sharding.Mesh, *, batch_axis: int = 0) -> Any:
  """Host-local NumPy batch -> global `jax.Array`s sharded on 'data'.

  Args:
    batch: pytree of arrays [B_local, ...] (batch dimension at `batch_axis`);
      process p holds rows [p * B_local, (p + 1) * B_local) of the global batch.
    mesh: the mesh from `make_mesh`.
    batch_axis: the batch dimension (1 for stacked batches [k, B_local, ...]).

  Returns:
    The same pytree of global arrays with B_local * process_count rows.
  """
  sharding = data_sharding(mesh, batch_axis=batch_axis)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def round_to_mesh(batch_size: int, mesh: jax.sharding.Mesh | None) -> int:
  """batch_size rounded up to a multiple of the mesh size, so it splits over the devices
  (unchanged without a mesh)."""
  return batch_size if mesh is None else -(-batch_size // mesh.size) * mesh.size


def host_array_to_global(x: np.ndarray, mesh: jax.sharding.Mesh | None) -> Any:
  """A host array that every process holds whole -> a global array sharded on 'data'.

  Unlike `host_to_global`, whose input is each process's own rows. Without a mesh
  the array is returned as it is (placed on the default device by its first use).
  """
  if mesh is None:
    return x
  return jax.make_array_from_callback(x.shape, data_sharding(mesh), lambda index: x[index])


def is_main_process() -> bool:
  """True on process 0, the one that writes logs and images."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a host sync when there are several)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def fetch(x: jax.Array) -> np.ndarray:
  """A global array -> NumPy, the same on every process (gathers other processes' shards).

  All processes must call it for arrays that are not fully addressable.
  """
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
