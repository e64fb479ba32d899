"""Our own on-disk format for a model: `config.json` (upstream field names) + an Orbax checkpoint
of its variables. Written into a temporary folder and renamed, so a crash leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.weights import atomic_folder

CONFIG_FILE = "config.json"


class ModelConfig:
  """`from_dict` / `to_dict` for our own frozen-dataclass model configs, stored in config.json
  under their `model_type` (set as a class attribute, as `label` names them in errors)."""

  model_type = ""
  label = "model"

  @classmethod
  def from_dict(cls, config):
    model_type = config.get("model_type", cls.model_type)
    if model_type != cls.model_type:
      raise UserError(f"config.json says model_type {model_type!r}, not {cls.model_type!r}.")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields - {"model_type", "etalk_format"})
    if unknown:
      raise UserError(f"unknown {cls.label} config fields: {', '.join(unknown)}.")
    return cls(**{k: v for k, v in config.items() if k in fields})

  def to_dict(self) -> dict[str, Any]:
    return {"model_type": self.model_type, **dataclasses.asdict(self)}
STATE_DIR = "state"


class KeyStream:
  """Stands in for `nnx.Rngs` while a model is built under a trace (`eval_shape`, `jit`).

  Inside a trace, every `nnx.Rngs` draw stores a traced counter, and jax 0.10 builds an error
  message that walks the whole graph on each store: quadratic, ~15 s for a tiny UNet. A Python
  counter avoids it (0.5 s for the full SVD-XT UNet). Only the `params` stream is drawn by our
  constructors.
  """

  def __init__(self, seed: int = 0):
    self._key = jax.random.key(seed)
    self._count = 0

  def params(self) -> jax.Array:
    self._count += 1
    return jax.random.fold_in(self._key, self._count)


def _dotted(key_path) -> str:
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in key_path]
  return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def abstract(build: Callable[[Any], nnx.Module]) -> nnx.Module:
  """`build(rngs)`'s structure with `ShapeDtypeStruct` leaves: no weights allocated."""
  return nnx.eval_shape(lambda: build(KeyStream()))


def _checkpointer() -> ocp.Checkpointer:
  # At most 1 GB in flight each way: with Orbax's default (96 GB) saving the 6 GB SVD-XT UNet
  # peaked at 1.67x its size, with 1 GB at 1.10x. No zstd: weights barely compress and it
  # tripled the save time (25 s vs 8 s for SVD-XT on 2 cores).
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
      save_concurrent_gb=1, restore_concurrent_gb=1, use_compression=False))


def save_model(model: nnx.Module, folder: str | Path, config: dict[str, Any], *,
               overwrite: bool = False) -> Path:
  folder = Path(folder).absolute()
  with atomic_folder(folder, overwrite=overwrite) as tmp:
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with _checkpointer() as checkpointer:
      checkpointer.save(tmp / STATE_DIR, args=ocp.args.PyTreeSave(nnx.state(model)))
  return folder


def read_config(folder: str | Path) -> dict[str, Any]:
  path = Path(folder) / CONFIG_FILE
  if not path.is_file():
    raise InputNotFound(f"{folder} is not a saved etalk-jax model: {CONFIG_FILE} is missing. "
                        "Convert weights with `etalk convert` first.")
  return json.loads(path.read_text())


def restore_model(folder: str | Path, build_abstract: Callable[[], nnx.Module]) -> nnx.Module:
  """Restores into the structure `build_abstract()` returns (an `nnx.eval_shape` model)."""
  folder = Path(folder).absolute()
  state_dir = folder / STATE_DIR
  if not state_dir.is_dir():
    raise InputNotFound(f"{folder} holds no model state ({STATE_DIR}/ is missing).")
  graphdef, abstract_state = nnx.split(build_abstract())
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
  with _checkpointer() as checkpointer:
    try:
      state = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=abstract_state, restore_args=restore_args))
    except (ValueError, KeyError) as error:
      raise UserError(f"{folder}: the saved state does not match its config.json ({error})"
                      ) from error
  # Orbax restores a leaf with its saved shape even when the target differs: check every one.
  mismatched = [
      f"{_dotted(path)}: saved {tuple(got.shape)}, config.json needs "
      f"{tuple(want.shape)}"
      for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(abstract_state),
                                   jax.tree.leaves(state))
      if tuple(got.shape) != tuple(want.shape)]
  if mismatched:
    raise UserError(f"{folder}: the saved state does not match its config.json "
                    f"({len(mismatched)} tensors):\n  " + "\n  ".join(mismatched))
  return nnx.merge(graphdef, state)


def load_model(folder: str | Path, config_class, model_class, compute) -> nnx.Module:
  """A folder saved with `save_model(model, folder, model.config.to_dict())` of a model whose
  config is a `ModelConfig`: `model_class(config, compute=compute, rngs=...)` restored."""
  try:
    config = config_class.from_dict(read_config(folder))
  except InputNotFound:  # no model here at all: the message already names the folder and the fix
    raise
  except ValueError as error:  # another model's folder, or fields this code does not know
    raise UserError(f"{folder} does not hold a {config_class.label}: {error}") from error
  return restore_model(folder, lambda: abstract(
      lambda rngs: model_class(config, compute=compute, rngs=rngs)))
