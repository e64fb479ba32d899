"""Our own on-disk format for a model: `config.json` (upstream field names) + an Orbax checkpoint
of its variables. Written into a temporary folder and renamed, so a crash leaves nothing behind."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.records import read_json_object
from etalk_jax.weights import WEIGHT_VARIABLES, ConversionError, atomic_folder

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


def read_state_tree(state_dir: str | Path) -> dict[str, Any]:
  """A saved model's Orbax state as it is on disk: nested dicts of numpy arrays, no model built
  (what `etalk_jax.demo.shipped` packs into safetensors)."""
  with _checkpointer() as checkpointer:
    tree = checkpointer.restore(Path(state_dir).absolute())
  return jax.tree.map(np.asarray, tree)


def write_state_tree(tree: dict[str, Any], state_dir: str | Path) -> None:
  """`read_state_tree`'s inverse: the same nested dicts written as a model's Orbax state, which
  `restore_model` reads into the model its config.json describes."""
  with _checkpointer() as checkpointer:
    checkpointer.save(Path(state_dir).absolute(), args=ocp.args.PyTreeSave(tree))


def save_model(model: nnx.Module, folder: str | Path, config: dict[str, Any], *,
               overwrite: bool = False) -> Path:
  folder = Path(folder).absolute()
  with atomic_folder(folder, overwrite=overwrite) as tmp:
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with _checkpointer() as checkpointer:
      checkpointer.save(tmp / STATE_DIR, args=ocp.args.PyTreeSave(nnx.state(model)))
  return folder


def read_config(folder: str | Path) -> dict[str, Any]:
  """A saved model's config.json as a dict; a missing, unparsable or non-object file raises
  one UserError naming it."""
  path = Path(folder) / CONFIG_FILE
  if not path.is_file():
    raise InputNotFound(f"{folder} is not a saved etalk-jax model: {CONFIG_FILE} is missing. "
                        "Convert weights with `etalk convert` first.")
  return read_json_object(path, what="a model config", fix="the saved model is damaged. Write "
                          "it again (`etalk convert`, or the stage's export).")


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


# ----------------------------------------------------------------------------------------------
# Models converted from one upstream file (PD-FGC, the evaluation networks)
# ----------------------------------------------------------------------------------------------


def parameter_count(model: nnx.Module) -> int:
  """Trainable parameters (nnx.Param leaves); BatchNorm statistics are not counted."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def weights_summary(model: nnx.Module) -> dict[str, int]:
  """{tensors, parameters, bytes}: tensors and bytes count everything saved (parameters and
  BatchNorm running statistics), parameters the trainable ones only."""
  saved = jax.tree.leaves(nnx.state(model, WEIGHT_VARIABLES))
  return {"tensors": len(saved), "parameters": parameter_count(model),
          "bytes": sum(int(x.size * x.dtype.itemsize) for x in saved)}


@dataclasses.dataclass(frozen=True)
class ConvertedFormat:
  """Our format for a model converted from one upstream weight file: config.json (the model
  config's fields + an "etalk_format" record {"model": name, "version": version}) and the Orbax
  state; saving, loading with checks that name the folder and the command that makes one, and
  the `etalk convert` command's body."""
  name: str  # the record's model name, e.g. "face3d"
  label: str  # what a folder holds, e.g. "a converted Deep3DFaceRecon regressor"
  command: str  # the command that writes one, e.g. "etalk convert face3d --src epoch_20.pth ..."
  upstream: str  # the file --src takes, e.g. "Deep3DFaceRecon's epoch_20.pth"
  version: int = 1

  def save(self, model: nnx.Module, dst: str | Path, *, overwrite: bool = False
           ) -> dict[str, int]:
    """model (its `config` a ModelConfig) -> dst; returns `weights_summary(model)`."""
    config = model.config.to_dict()
    config["etalk_format"] = {"model": self.name, "version": self.version}
    save_model(model, dst, config, overwrite=overwrite)
    return weights_summary(model)

  def load(self, folder: str | Path, config_class,
           build_abstract: Callable[[Any], nnx.Module]) -> nnx.Module:
    """A folder `save` wrote -> the model `build_abstract(config)` describes, restored."""
    folder = Path(folder)
    hint = f"run `{self.command}` first."
    if not folder.is_dir():
      raise ConversionError(f"{folder} is not a folder; give the folder written by "
                            f"`{self.command.split(' --')[0]}`.")
    try:
      fields = dict(read_config(folder))
    except (FileNotFoundError, ValueError) as error:  # no config.json, or not JSON
      raise ConversionError(f"{folder} does not hold {self.label} ({error}); {hint}") from error
    record = fields.pop("etalk_format", None)
    if not isinstance(record, Mapping) or record.get("model") != self.name:
      raise ConversionError(f"{folder} does not hold {self.label}; {hint}")
    if record.get("version") != self.version:
      raise ConversionError(f"{folder} was written in format version {record.get('version')}; "
                            f"this code reads version {self.version}. Convert it again.")
    try:
      config = config_class.from_dict(fields)
      return restore_model(folder, lambda: build_abstract(config))
    except (ValueError, FileNotFoundError) as error:
      raise ConversionError(f"{error} Convert the model again.") from error

  def convert_file(self, src: str | Path, dst: str | Path,
                   convert: Callable[[Path], nnx.Module], *, overwrite: bool = False
                   ) -> dict[str, Any]:
    """`etalk convert`'s body: `convert(src)` saved at dst; returns {tensors, parameters,
    bytes, seconds, dst}."""
    start = time.perf_counter()
    src_path = Path(src)
    if not src_path.is_file():
      raise ConversionError(f"--src {src} is not a file; give {self.upstream}.")
    summary: dict[str, Any] = self.save(convert(src_path), dst, overwrite=overwrite)
    summary.update(seconds=round(time.perf_counter() - start, 3), dst=str(dst))
    return summary
