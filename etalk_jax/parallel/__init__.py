"""Parallelism: the device mesh, logical sharding rules, sharded model creation, multi-host."""

from etalk_jax.parallel import logical
from etalk_jax.parallel.logical import family_of, model_axes, param_axes, tree_axes
from etalk_jax.parallel.mesh import initialize_distributed, make_mesh, mesh_shape
from etalk_jax.parallel.rules import (
  DEFAULT_LOGICAL_RULES,
  DEFAULT_RULES,
  MIN_SHARDED_SIZE,
  abstract_sharded,
  annotate,
  batch_sharding,
  create_sharded,
  logical_param_spec,
  logical_to_spec,
  parameter_spec,
  partition_specs,
  state_shardings,
)

__all__ = [
    "logical", "family_of", "model_axes", "param_axes", "tree_axes", "initialize_distributed",
    "make_mesh", "mesh_shape", "DEFAULT_LOGICAL_RULES", "DEFAULT_RULES", "MIN_SHARDED_SIZE",
    "abstract_sharded", "annotate", "batch_sharding", "create_sharded",
    "logical_param_spec", "logical_to_spec", "parameter_spec", "partition_specs", "state_shardings",
]
