"""Activation sharding inside models: the logical-axis rules in force and the constraints on
activations that models apply under them.

Rules are a tuple of `(logical_name, mesh_axis)` pairs, where `mesh_axis` is one mesh axis name, a
tuple of them, or None (replicated); a config holds them as `config.rules`. Activation names:

- `batch`: the leading axis of every input batch (data parallel over `data` and `fsdp`: with
  FSDP every device still sees its own slice of the batch).
- `frames`: the frame axis of video activations (sequence parallel over `context`).

Whoever sets the mesh (`jax.set_mesh`: the train loop, benchmarks) installs the config's rules
for the same span with `use_rules`, so the constraints models apply follow them; without
`use_rules`, `ACTIVATION_RULES` are in force. Both are read when a function is traced: a jitted
function traced under some rules keeps them, so set them before the first call or lowering.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import PartitionSpec

from etalk_jax.errors import UserError

BATCH = "batch"
FRAMES = "frames"

Rules = Sequence[tuple[str, Any]]

# The activation part of etalk_jax.parallel's default rules, in force unless `use_rules` says.
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, ("data", "fsdp")),
    (FRAMES, "context"),
)

_rules_in_force: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "etalk_jax_sharding_rules", default=ACTIVATION_RULES)


def rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
  """`{logical_name: mesh axes}` of `rules`; ValueError on a malformed or repeated entry."""
  table = {}
  for entry in rules:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise UserError(f"sharding rule {entry!r} is not a (logical_name, mesh_axis) pair")
    name, axes = entry
    if name in table:
      raise UserError(f"sharding rules name the logical axis {name!r} twice")
    table[name] = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return table


def mesh_axes(logical_name: str | None, mesh, rules: Rules) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to, leaving out those this mesh lacks (e.g. `context`
  on a mesh built without it)."""
  if logical_name is None:
    return ()
  table = rule_table(rules)
  if logical_name not in table:
    raise ValueError(f"no sharding rule for logical axis {logical_name!r}; the rules name "
                     f"{', '.join(sorted(table)) or 'nothing'}")
  return tuple(axis for axis in table[logical_name] if axis in mesh.shape)


def rules_in_force() -> Rules:
  """The rules activation constraints follow now (`use_rules`' or `ACTIVATION_RULES`)."""
  return _rules_in_force.get()


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
  """Puts `rules` in force for activation constraints for the span of the `with`."""
  token = _rules_in_force.set(tuple(tuple(rule) for rule in rules))
  try:
    yield
  finally:
    _rules_in_force.reset(token)


def constrain_rows(x: jax.Array) -> jax.Array:
  """Shard an activation's leading axis, which holds (batch, frames) folded together, over the
  mesh axes that the rules in force give `batch` and `frames`, on the mesh set by `jax.set_mesh`
  (a no-op without one, or where those axes do not divide it). Per-frame layers then run data-
  and frame-parallel and parameter shardings cannot leak into activations."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = rules_in_force()
  axes, size = [], 1
  for axis in mesh_axes(BATCH, mesh, rules) + mesh_axes(FRAMES, mesh, rules):
    if mesh.shape[axis] > 1 and x.shape[0] % (size * mesh.shape[axis]) == 0:
      axes.append(axis)
      size *= mesh.shape[axis]
  spec = PartitionSpec(tuple(axes) if axes else None, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)
