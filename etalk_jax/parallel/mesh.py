"""The device mesh, and multi-host start-up.

One mesh for everything, from the config: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded) and, only when asked for, `context` (frames split across
devices). Axis types are Auto (jax 0.10's default is Explicit): shardings are given on inputs,
outputs and parameters, and XLA propagates the rest.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax
import numpy as np

from etalk_jax.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "context")
OPTIONAL_AXES = ("context",)
# Set by the launchers whose process layout jax.distributed.initialize detects by itself.
CLUSTER_VARIABLES = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                     "MEGASCALE_COORDINATOR_ADDRESS")


def mesh_shape(config: Mapping[str, int], device_count: int) -> dict[str, int]:
  """Axis sizes from `config` (e.g. `{"data": -1, "fsdp": 4}`): at most one size may be -1,
  meaning "the devices left over"; `context` is left out unless configured."""
  sizes = dict(config.items())
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise UserError(f"mesh config names unknown axes {unknown}; the axes are "
                    f"{', '.join(MESH_AXES)}")
  sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES
           if axis not in OPTIONAL_AXES or axis in sizes}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise UserError(f"mesh config {dict(config.items())}: sizes must be positive, with at "
                    "most one -1 (the devices left over)")
  fixed = int(np.prod([size for size in sizes.values() if size != -1]))
  if free:
    if device_count % fixed:
      raise UserError(f"mesh config {dict(config.items())}: {device_count} devices do not "
                      f"divide by the fixed axes' product {fixed}")
    sizes[free[0]] = device_count // fixed
  elif fixed != device_count:
    raise UserError(f"mesh config {dict(config.items())} needs {fixed} devices, but "
                    f"{device_count} are available; set one axis to -1 to use them all")
  return sizes


def make_mesh(config: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """The mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sizes), devices=devices)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run: with explicit arguments (e.g. two CPU processes on localhost),
  or auto-detected on a TPU pod, SLURM or Open MPI cluster. A single process with nothing
  configured returns at once. Call it before anything touches a device."""
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  cluster = any(name in os.environ for name in CLUSTER_VARIABLES)
  if not explicit and not cluster:
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
