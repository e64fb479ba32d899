"""Logical axis rules: which mesh axes each logical axis of a parameter or activation uses.

Rules live in the config as a tuple of `(logical_name, mesh_axis)` pairs, where `mesh_axis` is
one mesh axis name, a tuple of them, or None (replicated). Logical names:

- `batch`: the leading axis of every input batch (data parallel over `data` and `fsdp`: with
  FSDP every device still sees its own slice of the batch).
- `frames`: the frame axis of video activations (sequence parallel over `context`).
- `weight_shard`: the one dimension of a large parameter that FSDP splits (ZeRO-3).

Parameters get their logical axes from their shape, not from annotations in each model: FSDP
splits the largest dimension that the `weight_shard` axes divide evenly, for every parameter of
at least `min_sharded_size` elements; smaller ones (biases, norm scales, tiny kernels) stay
replicated, as gathering them would cost more in latency than they save in memory. The same
rule applies to anything shaped like a parameter (Adam's moments, 8-bit Adam's codes), so the
optimizer state shards exactly like the model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from etalk_jax import model_io

BATCH = "batch"
FRAMES = "frames"
WEIGHT_SHARD = "weight_shard"

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, ("data", "fsdp")),
    (FRAMES, "context"),
    (WEIGHT_SHARD, "fsdp"),
)
MIN_SHARDED_SIZE = 4096

Rules = Sequence[tuple[str, Any]]


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for entry in rules:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"sharding rule {entry!r} is not a (logical_name, mesh_axis) pair")
    name, axes = entry
    if name in table:
      raise ValueError(f"sharding rules name the logical axis {name!r} twice")
    table[name] = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return table


def mesh_axes(logical_name: str | None, mesh, rules: Rules) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to, leaving out those this mesh lacks (e.g. `context`
  on a mesh built without it)."""
  if logical_name is None:
    return ()
  table = _rule_table(rules)
  if logical_name not in table:
    raise ValueError(f"no sharding rule for logical axis {logical_name!r}; the rules name "
                     f"{', '.join(sorted(table)) or 'nothing'}")
  return tuple(axis for axis in table[logical_name] if axis in mesh.shape)


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


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES, *,
                    min_sharded_size: int = MIN_SHARDED_SIZE) -> Any:
  """A NamedSharding for every array (or ShapeDtypeStruct) leaf of `state`: an nnx.State, an
  optax state or any pytree of them."""
  def sharding(leaf):
    return NamedSharding(mesh, parameter_spec(np.shape(leaf), mesh, rules,
                                              min_sharded_size=min_sharded_size))
  return jax.tree.map(sharding, state)


def partition_specs(state: Any, mesh, rules: Rules = DEFAULT_RULES, *,
                    min_sharded_size: int = MIN_SHARDED_SIZE) -> dict[str, PartitionSpec]:
  """`{dotted.path: PartitionSpec}` of an nnx.State: for reading and for golden tests."""
  return {".".join(str(part) for part in path): parameter_spec(
              np.shape(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf), mesh,
              rules, min_sharded_size=min_sharded_size)
          for path, leaf in nnx.to_flat_state(state)}


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules: Rules = DEFAULT_RULES
                   ) -> NamedSharding:
  """Sharding of an input array with a leading batch axis (other axes replicated)."""
  return NamedSharding(mesh, logical_to_spec((BATCH,) + (None,) * (ndim - 1), mesh, rules))


def abstract_sharded(build: Callable[[Any], nnx.Module], mesh: jax.sharding.Mesh,
                     rules: Rules = DEFAULT_RULES) -> nnx.Module:
  """`model_io.abstract(build)` with each leaf's sharding set: `weights.load_into` then places
  converted tensors one by one straight onto their shards."""
  model = model_io.abstract(build)
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, rules)
  state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(
      leaf.shape, leaf.dtype, sharding=sharding), state, shardings)
  return nnx.merge(graphdef, state)


def create_sharded(build: Callable[[Any], nnx.Module], mesh: jax.sharding.Mesh,
                   rules: Rules = DEFAULT_RULES, *, seed: int = 0) -> nnx.Module:
  """Random-initialises `build(rngs)` with every parameter created directly on its shards:
  the shardings come from the abstract model, and the initialiser runs under `jax.jit` with
  them as output shardings, so no device ever holds a whole model."""
  graphdef, abstract_state = nnx.split(model_io.abstract(build))
  shardings = state_shardings(abstract_state, mesh, rules)

  def initialise():
    # model_io.abstract's key stream: traced nnx.Rngs counters make tracing quadratic.
    return nnx.state(build(model_io.KeyStream(seed)))

  return nnx.merge(graphdef, jax.jit(initialise, out_shardings=shardings)())
