"""Logical axis rules: which mesh axes each logical axis of a parameter or activation uses.

Rules live in the config as a tuple of `(logical_name, mesh_axis)` pairs, where `mesh_axis` is
one mesh axis name, a tuple of them, or None (replicated). The activation names `batch` and
`frames` and the constraints models put on activations are etalk_jax.layers.sharding's.

Parameters carry logical names from their model family's table (etalk_jax.layers.logical_axes;
`embed`, `mlp`, `heads`, `conv_in`, `conv_out`, `norm`, ...; pass `family_axes`). A parameter's
spec:

1. tensors under `min_sharded_size` elements stay replicated (gathering a bias costs more in
   latency than it saves in memory);
2. each dimension whose logical name maps to mesh axes is a candidate; a dimension is only
   sharded when the product of its mesh axes divides its size;
3. a mesh axis is used by at most one dimension: candidates are taken largest first, ties in
   the order the logical names appear in the rules (DEFAULT_RULES lists `heads`, `mlp`,
   `conv_out` before `embed`, `conv_in`: an in-projection splits its output features).

Leaves with no logical names (8-bit Adam's per-block scales, anything not shaped like a named
parameter, or every leaf when no `family_axes` is given) use the shape rule, the logical name
`weight_shard`: FSDP splits the largest dimension its axes divide.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from etalk_jax import model_io
from etalk_jax.layers import logical_axes as axis_names
from etalk_jax.layers.sharding import ACTIVATION_RULES, BATCH, Rules, mesh_axes
from etalk_jax.parallel import logical

WEIGHT_SHARD = "weight_shard"

DEFAULT_LOGICAL_RULES: tuple[tuple[str, Any], ...] = ACTIVATION_RULES + (
    (WEIGHT_SHARD, "fsdp"),
    # Parameter names (layers/logical_axes.py); the order breaks ties between equal-sized dims.
    (axis_names.HEADS, "fsdp"),
    (axis_names.MLP, "fsdp"),
    (axis_names.CONV_OUT, "fsdp"),
    (axis_names.EMBED, "fsdp"),
    (axis_names.CONV_IN, "fsdp"),
    (axis_names.CONV_T, None),
    (axis_names.CONV_H, None),
    (axis_names.CONV_W, None),
    (axis_names.NORM, None),
    (axis_names.BIAS, None),
    (axis_names.POSITION, None),
    (axis_names.SCALAR, None),
)
DEFAULT_RULES = DEFAULT_LOGICAL_RULES
MIN_SHARDED_SIZE = 4096


def logical_to_spec(logical_axes: Sequence[str | None], mesh, rules: Rules) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions carry these logical names."""
  spec = []
  for name in logical_axes:
    axes = mesh_axes(name, mesh, rules)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def parameter_logical_axes(shape: Sequence[int], mesh, rules: Rules, *,
                           min_sharded_size: int = MIN_SHARDED_SIZE) -> tuple[str | None, ...]:
  """`weight_shard` on the largest dimension the FSDP axes divide (the last such on a tie),
  None elsewhere; all None for small parameters or when no dimension divides."""
  axes = mesh_axes(WEIGHT_SHARD, mesh, rules)
  shards = int(np.prod([mesh.shape[axis] for axis in axes]))
  logical: list[str | None] = [None] * len(shape)
  if shards == 1 or int(np.prod(shape)) < min_sharded_size:
    return tuple(logical)
  candidates = [i for i, size in enumerate(shape) if size % shards == 0]
  if candidates:
    logical[max(candidates, key=lambda i: (shape[i], i))] = WEIGHT_SHARD
  return tuple(logical)


def parameter_spec(shape: Sequence[int], mesh, rules: Rules = DEFAULT_RULES, *,
                   min_sharded_size: int = MIN_SHARDED_SIZE) -> PartitionSpec:
  return logical_to_spec(parameter_logical_axes(shape, mesh, rules,
                                                min_sharded_size=min_sharded_size), mesh, rules)


def logical_param_spec(shape: Sequence[int], names: Sequence[str | None], mesh,
                       rules: Rules = DEFAULT_RULES, *,
                       min_sharded_size: int = MIN_SHARDED_SIZE) -> PartitionSpec:
  """PartitionSpec of a parameter whose dimensions carry the logical `names` (see the module
  docstring for the divisibility, one-dimension-per-mesh-axis and size rules)."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not fit a rank-{len(shape)} shape "
                     f"{tuple(shape)}")
  spec: list[Any] = [None] * len(shape)
  if int(np.prod(shape)) < min_sharded_size:
    return PartitionSpec(*spec)
  order = {name: i for i, (name, _) in enumerate(rules)}
  mapped = [(i, mesh_axes(name, mesh, rules)) for i, name in enumerate(names)]
  candidates = sorted((entry for entry in mapped if entry[1]),
                      key=lambda entry: (-shape[entry[0]], order[names[entry[0]]], entry[0]))
  used: set[str] = set()
  for i, axes in candidates:
    axes = tuple(axis for axis in axes if axis not in used)
    shards = int(np.prod([mesh.shape[axis] for axis in axes]))
    if not axes or shards == 1 or shape[i] % shards:
      continue
    spec[i] = axes[0] if len(axes) == 1 else axes
    used.update(axes)
  return PartitionSpec(*spec)


def leaf_spec(path: Sequence[Any], shape: Sequence[int], mesh, rules: Rules = DEFAULT_RULES, *,
              family_axes: Mapping[str, tuple] | None = None,
              min_sharded_size: int = MIN_SHARDED_SIZE) -> PartitionSpec:
  """The spec of one leaf: by its logical names when `family_axes` names it (found through
  `logical.lookup`), by the shape rule otherwise."""
  names = logical.lookup(family_axes, path, len(shape)) if family_axes else None
  if names is None:
    return parameter_spec(shape, mesh, rules, min_sharded_size=min_sharded_size)
  return logical_param_spec(shape, names, mesh, rules, min_sharded_size=min_sharded_size)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES, *,
                    family_axes: Mapping[str, tuple] | None = None,
                    min_sharded_size: int = MIN_SHARDED_SIZE) -> Any:
  """A NamedSharding for every array (or ShapeDtypeStruct) leaf of `state`: an nnx.State, an
  optax state (8-bit Adam's included) or any pytree of them. With `family_axes`
  (`logical.model_axes(model)` or `logical.param_axes(state, family)`) parameters and
  everything shaped and named like them (Adam's moments, 8-bit codes) follow the logical
  rules; other leaves follow the shape rule."""
  def sharding(path, leaf):
    return NamedSharding(mesh, leaf_spec(path, np.shape(leaf), mesh, rules,
                                         family_axes=family_axes,
                                         min_sharded_size=min_sharded_size))
  return jax.tree_util.tree_map_with_path(sharding, state)


def partition_specs(state: Any, mesh, rules: Rules = DEFAULT_RULES, *,
                    family_axes: Mapping[str, tuple] | None = None,
                    min_sharded_size: int = MIN_SHARDED_SIZE) -> dict[str, PartitionSpec]:
  """`{dotted.path: PartitionSpec}` of an nnx.State: for reading and for golden tests."""
  return {logical.dotted(path): leaf_spec(
              path, np.shape(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf),
              mesh, rules, family_axes=family_axes, min_sharded_size=min_sharded_size)
          for path, leaf in nnx.to_flat_state(state)}


def _family_axes(model: nnx.Module, family: str | None) -> dict[str, tuple] | None:
  """Logical names of `model` ('auto': from its class; None: the shape rule only)."""
  if family is None:
    return None
  if family == "auto":
    try:
      family = logical.family_of(model)
    except ValueError:
      return None  # a model without a table (tests' toys): the shape rule
  return logical.model_axes(model, family)


def annotate(model: nnx.Module, mesh, rules: Rules = DEFAULT_RULES, *, family: str = "auto",
             min_sharded_size: int = MIN_SHARDED_SIZE) -> nnx.Module:
  """Stores each variable's logical names as its `out_sharding` metadata (what
  `nnx.with_partitioning` sets in flax 0.12) and, as `sharding_rules`, the per-variable
  resolution of those names on `mesh`, so `nnx.get_partition_spec(nnx.state(model))` gives
  the same specs as `partition_specs` (a global name -> axis table could not express the
  per-tensor divisibility rule). Returns `model`."""
  axes = _family_axes(model, family)
  for path, variable in nnx.iter_graph(model):
    if not isinstance(variable, nnx.Variable):
      continue
    names = axes.get(logical.dotted(path))
    if names is None:
      continue
    spec = logical_param_spec(variable.get_value().shape, names, mesh, rules,
                              min_sharded_size=min_sharded_size)
    variable.set_metadata(out_sharding=tuple(names),
                          sharding_rules=tuple(zip(names, tuple(spec))))
  return model


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules: Rules = DEFAULT_RULES
                   ) -> NamedSharding:
  """Sharding of an input array with a leading batch axis (other axes replicated)."""
  return NamedSharding(mesh, logical_to_spec((BATCH,) + (None,) * (ndim - 1), mesh, rules))


def abstract_sharded(build: Callable[[Any], nnx.Module], mesh: jax.sharding.Mesh,
                     rules: Rules = DEFAULT_RULES, *, family: str | None = "auto") -> nnx.Module:
  """`model_io.abstract(build)` with each leaf's sharding set: `weights.load_into` then places
  converted tensors one by one straight onto their shards. `family`: the logical-axis table
  ('auto' from the model's class, None for the shape rule)."""
  model = model_io.abstract(build)
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, rules, family_axes=_family_axes(model, family))
  state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
      leaf.shape, leaf.dtype, sharding=sharding), state, shardings)
  return nnx.merge(graphdef, state)


def create_sharded(build: Callable[[Any], nnx.Module], mesh: jax.sharding.Mesh,
                   rules: Rules = DEFAULT_RULES, *, seed: int = 0,
                   family: str | None = "auto") -> nnx.Module:
  """Random-initialises `build(rngs)` with every parameter created directly on its shards:
  the shardings come from the abstract model, and the initialiser runs under `jax.jit` with
  them as output shardings, so no device ever holds a whole model."""
  abstract_model = model_io.abstract(build)
  graphdef, abstract_state = nnx.split(abstract_model)
  shardings = state_shardings(abstract_state, mesh, rules,
                              family_axes=_family_axes(abstract_model, family))

  def initialise():
    # model_io.abstract's key stream: traced nnx.Rngs counters make tracing quadratic.
    return nnx.state(build(model_io.KeyStream(seed)))

  return nnx.merge(graphdef, jax.jit(initialise, out_shardings=shardings)())
