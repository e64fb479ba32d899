"""Logical axis names of every parameter of a model, from its family's table of rules.

The names, the rules and each family's table are etalk_jax.layers.logical_axes' (a model class
names its family in `logical_family`); this module matches a model's parameter paths against
its table and finds the names of a leaf in trees that embed parameter paths (optimizer states).
Every parameter must match exactly one rule: `param_axes` raises listing every unmatched and
every ambiguously matched path, so a new layer type cannot silently fall back to replication.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping, Sequence

from flax import nnx

# The tables' vocabulary, read through this module by its users too (tests, benchmarks).
from etalk_jax.layers.logical_axes import FAMILIES, PARAM_LOGICAL_NAMES, Rule

__all__ = ["FAMILIES", "PARAM_LOGICAL_NAMES", "Rule", "WRAPPERS", "dotted", "family_of",
           "key_names", "lookup", "match", "model_axes", "param_axes", "tree_axes"]


def family_of(model: nnx.Module) -> str:
  """The family name of a model instance: its class's `logical_family` (ETHD's own, though it
  is a UNet)."""
  family = getattr(type(model), "logical_family", None)
  if family is None:
    raise ValueError(f"no logical-axis table for {type(model).__name__}; the families are "
                     f"{', '.join(FAMILIES)}")
  return family


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
  return re.compile(pattern)


def dotted(path: Iterable[Any]) -> str:
  return ".".join(str(part) for part in path)


def _table(family: str | Sequence[Rule]) -> Sequence[Rule]:
  if isinstance(family, str):
    if family not in FAMILIES:
      raise ValueError(f"unknown model family {family!r}; the families are "
                       f"{', '.join(FAMILIES)}")
    return FAMILIES[family]
  return family


def match(path: str, ndim: int, family: str | Sequence[Rule]) -> list[Rule]:
  """Every rule of `family` that matches this path and rank."""
  return [rule for rule in _table(family)
          if rule.ndim == ndim and _compiled(rule.pattern).fullmatch(path)]


def param_axes(state: Any, family: str | Sequence[Rule]) -> dict[str, tuple[str | None, ...]]:
  """`{dotted.path: logical names}` for every variable of an nnx.State / Module (parameters,
  batch statistics). Raises listing all unmatched and ambiguous paths."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  axes, unmatched, ambiguous = {}, [], []
  for path, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    shape = tuple(getattr(value, "shape", ()))
    name = dotted(path)
    rules = match(name, len(shape), family)
    if not rules:
      unmatched.append(f"{name} {shape}")
    elif len(rules) > 1:
      ambiguous.append(f"{name} {shape}: " + ", ".join(r.pattern for r in rules))
    else:
      axes[name] = rules[0].names
  if unmatched or ambiguous:
    label = family if isinstance(family, str) else "the given table"
    raise ValueError(
        f"logical axes of {label}: every parameter must match exactly one rule; "
        f"{len(unmatched)} match none, {len(ambiguous)} match several:\n  "
        + "\n  ".join(unmatched + ambiguous))
  return axes


def model_axes(model: nnx.Module, family: str | None = None) -> dict[str, tuple[str | None, ...]]:
  """`param_axes` of a model, its family found from its class unless given."""
  return param_axes(nnx.state(model), family or family_of(model))


WRAPPERS = ("value", "raw_value", "codes")  # Variable payloads; 8-bit Adam's codes


def key_names(path: Sequence[Any]) -> list[str]:
  """Plain names of a jax key path (DictKey, GetAttrKey, SequenceKey) or of nnx path parts."""
  names = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        names.append(str(getattr(key, attribute)))
        break
    else:
      names.append(str(key))
  return names


def lookup(axes: Mapping[str, tuple], path: Sequence[Any], ndim: int
           ) -> tuple[str | None, ...] | None:
  """Logical names for a leaf of a tree that embeds parameter paths: an nnx.State
  (`kernel.value`), an optax state (`0.mu.down_blocks.0....kernel.value`) or 8-bit Adam's codes
  (`....kernel.value.codes`, shaped like the parameter). Trailing payload names are dropped,
  then the longest suffix that names a parameter of the same rank wins; None if there is none
  (8-bit Adam's per-block scales, counters: the caller falls back to the shape rule)."""
  parts = key_names(path)
  while parts and parts[-1] in WRAPPERS:
    parts.pop()
  for start in range(len(parts)):
    names = axes.get(".".join(parts[start:]))
    if names is not None and len(names) == ndim:
      return names
  return None


def tree_axes(node: Any) -> dict[str, tuple[str | None, ...]]:
  """Logical names for every variable of every known-family model inside `node` (a model, a
  tuple `(model, optimizer)`, a task's container module), keyed by the path from `node`: what
  `rules.state_shardings(nnx.state(node), ..., family_axes=...)` needs for a train state such
  as `nnx.split((model, optimizer))`. The outermost model of a known family claims its whole
  subtree (ETHD, not the UNet inside it); variables outside any such model get none (the shape
  rule)."""
  axes: dict[str, tuple[str | None, ...]] = {}
  claimed: list[tuple[Any, ...]] = []
  for path, child in nnx.iter_graph(node):
    if not isinstance(child, nnx.Module) or any(path[:len(p)] == p for p in claimed):
      continue
    try:
      family = family_of(child)
    except ValueError:
      continue
    # iter_graph yields children before parents: a parent found later replaces its children.
    claimed = [p for p in claimed if p[:len(path)] != path] + [tuple(path)]
    prefix = dotted(path)
    axes = {k: v for k, v in axes.items() if not (prefix == "" or k.startswith(prefix + "."))}
    for name, names in param_axes(nnx.state(child), family).items():
      axes[f"{prefix}.{name}" if prefix else name] = names
  return axes
