"""Parallelism: the device mesh, logical sharding rules, sharded model creation, multi-host."""

from etalk_jax.parallel.mesh import initialize_distributed, make_mesh, mesh_shape
from etalk_jax.parallel.rules import (DEFAULT_RULES, abstract_sharded, batch_sharding,
                                      create_sharded, logical_to_spec, parameter_spec,
                                      partition_specs, state_shardings)

__all__ = [
    "initialize_distributed", "make_mesh", "mesh_shape", "DEFAULT_RULES", "abstract_sharded",
    "batch_sharding", "create_sharded", "logical_to_spec", "parameter_spec", "partition_specs",
    "state_shardings",
]
