"""transformers <-> NNX weights for wav2vec2 and WavLM, and our own saved format.

Import: `wav2vec2_from_transformers(src)` / `wavlm_from_transformers(src)` take a transformers model
object, a state dict (with `config=`), a weight file or a folder with `config.json` plus
`model.safetensors` (sharded or not) or `pytorch_model.bin` (read with `weights_only=True`).
Checkpoints of the task models (`Wav2Vec2ForCTC`, `...ForPreTraining`, `WavLMForXVector`, ...)
work too: the `wav2vec2.` / `wavlm.` prefix is stripped and only their known head tensors are
skipped. The positional convolution's weight norm is read in either layout
(`parametrizations.weight.original0/1` of `torch.nn.utils.parametrizations.weight_norm`, or the
legacy `weight_g/weight_v`), or from a plain fused `weight`. Loading is as strict as every
converter here: one `ConversionError` lists all missing, unexpected and mis-shaped keys.

Export: `to_transformers(model)` gives a state dict that `Wav2Vec2Model` / `WavLMModel` load with
`strict=True`; `export_transformers(model, folder)` writes a folder their `from_pretrained` loads.

Our format (a folder): `config.json` (transformers' field names plus an `etalk_format` record) and
`state/`, an Orbax `StandardCheckpointer` checkpoint of the model's `nnx.state`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from etalk_jax import model_io
from etalk_jax.audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config, WeightNormConv1d
from etalk_jax.audio.wavlm import WavLM, WavLMConfig
from etalk_jax.errors import UserError
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.records import read_json_object
from etalk_jax.weights import (
  CONV,
  ConversionError,
  ConversionTable,
  TensorSource,
  atomic_folder,
  export_tensors,
  load_into,
  open_source,
  write_safetensors,
)

FORMAT_VERSION = 1
WEIGHT_STEMS = ("model", "pytorch_model")

_WEIGHT_NORM_RULES = [
    (WeightNormConv1d, "weight_g", "parametrizations.weight.original0", CONV),
    (WeightNormConv1d, "weight_v", "parametrizations.weight.original1", CONV),
]

# Tensors of transformers' task heads around the base model (only skipped when the checkpoint is
# one of those task models, i.e. its base-model keys carry the prefix).
_HEAD_KEYS = (r"(lm_head|quantizer|project_hid|project_q|projector|classifier|tdnn|"
              r"feature_extractor|objective)\..*", r"layer_weights")


class _Family:
  def __init__(self, name: str, prefix: str, config_cls, model_cls, torch_class: str):
    self.name, self.prefix = name, prefix
    self.config_cls, self.model_cls, self.torch_class = config_cls, model_cls, torch_class


WAV2VEC2 = _Family("wav2vec2", "wav2vec2.", Wav2Vec2Config, Wav2Vec2, "Wav2Vec2Model")
WAVLM = _Family("wavlm", "wavlm.", WavLMConfig, WavLM, "WavLMModel")
_FAMILIES = {f.name: f for f in (WAV2VEC2, WAVLM)}


# ----------------------------------------------------------------------------------------------
# A view of a transformers checkpoint in the names our table expects
# ----------------------------------------------------------------------------------------------


def _weight_norm_g(weight: np.ndarray) -> np.ndarray:
  """g of weight_norm(dim=2) for a fused weight: the norm over all dims but the kernel taps."""
  w = weight.astype(np.float64)
  return np.sqrt(np.sum(w * w, axis=(0, 1), keepdims=True)).astype(weight.dtype)


class TransformersView(TensorSource):
  """A transformers checkpoint renamed to `XModel.state_dict()` names in the current layout.

  - strips the task model's base prefix (`wav2vec2.`, `wavlm.`);
  - maps legacy `weight_g/weight_v` to `parametrizations.weight.original0/1`;
  - turns a fused positional-conv `weight` into g = ||w|| (per tap) and v = w, which give the
    same weight back.
  """

  def __init__(self, source: TensorSource, prefix: str):
    self.source = source
    self.description = source.description
    keys = source.keys()
    self.prefixed = any(k.startswith(prefix) for k in keys)
    self._map: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None,
                               Callable[[tuple], tuple] | None]] = {}
    for key in keys:
      name = key[len(prefix):] if self.prefixed and key.startswith(prefix) else key
      if self.prefixed and not key.startswith(prefix):
        name = "head:" + key  # outside the base model: a task head (ignored) or a stray key
      name = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", name)
      name = re.sub(r"\.weight_v$", ".parametrizations.weight.original1", name)
      if name.endswith("pos_conv_embed.conv.weight"):
        stem = name[:-len("weight")]
        self._map[stem + "parametrizations.weight.original0"] = (
            key, _weight_norm_g, lambda s: (1, 1, s[2]))
        self._map[stem + "parametrizations.weight.original1"] = (key, None, None)
        continue
      if name in self._map:
        raise ConversionError(f"{self.description} holds {key!r} and {self._map[name][0]!r}, "
                              "two layouts of the same tensor; keep one.")
      self._map[name] = (key, None, None)

  def keys(self):
    return list(self._map)

  def shape(self, key):
    their_key, _, shape_fn = self._map[key]
    shape = tuple(self.source.shape(their_key))
    return shape_fn(shape) if shape_fn else shape

  def read(self, key):
    their_key, fn, _ = self._map[key]
    array = self.source.read(their_key)
    return fn(array) if fn else array

  def dtype(self, key):
    return self.source.dtype(self._map[key][0])  # g of a fused weight keeps the weight's dtype

  def close(self):
    self.source.close()


def conversion_table(model: nnx.Module, prefixed: bool = False) -> ConversionTable:
  """Our leaves <-> `Wav2Vec2Model` / `WavLMModel` state-dict names (current weight-norm layout)."""
  ignore = [f"head:{p}" for p in _HEAD_KEYS] if prefixed else []
  return ConversionTable.build(model, ignore=ignore, leaf_rules=_WEIGHT_NORM_RULES)


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def _read_config_json(folder: Path) -> dict:
  path = folder / "config.json"
  if not path.is_file():
    raise ConversionError(f"{folder} has no config.json; a transformers model folder holds "
                          "config.json beside its weights.")
  return read_json_object(path, what="the object of a transformers config",
                          fix="restore the config.json the model was released with.",
                          error=ConversionError)


def _resolve_config(family: _Family, src: Any, config) -> Wav2Vec2Config:
  if isinstance(config, Wav2Vec2Config):
    if not isinstance(config, family.config_cls) or (
        family is WAV2VEC2 and isinstance(config, WavLMConfig)):
      raise ValueError(f"a {type(config).__name__} was given for a {family.name} model.")
    return config
  if isinstance(config, Mapping):
    return family.config_cls.from_dict(config)
  if config is not None:
    raise TypeError(f"config must be a {family.config_cls.__name__} or a dict, not "
                    f"{type(config).__name__}.")
  if hasattr(src, "config") and hasattr(src.config, "to_dict"):
    return family.config_cls.from_dict(src.config.to_dict())
  if isinstance(src, Mapping):
    raise ValueError(f"a state dict carries no config; pass config= (a "
                     f"{family.config_cls.__name__} or the model's config.json contents).")
  path = Path(src)
  folder = path if path.is_dir() else path.parent
  return family.config_cls.from_dict(_read_config_json(folder))


def _from_transformers(family: _Family, src: Any, config=None, *, compute: Compute = FP32,
                       dtype: Any = None, progress: bool = False):
  if not hasattr(src, "state_dict") and not isinstance(src, Mapping):
    if not Path(src).exists():
      raise ConversionError(f"{src} does not exist; give a transformers model folder "
                            "(config.json + weights), a weight file, a model or a state dict.")
  config = _resolve_config(family, src, config)
  model = model_io.abstract(lambda rngs: family.model_cls(config, compute=compute, rngs=rngs))
  source = open_source(src, stems=WEIGHT_STEMS)
  view = TransformersView(source, family.prefix)
  try:
    table = conversion_table(model, prefixed=view.prefixed)
    load_into(model, view, table, dtype=dtype, progress=progress)
  finally:
    view.close()
  return model


def wav2vec2_from_transformers(src: Any, config=None, *, compute: Compute = FP32,
                               dtype: Any = None, progress: bool = False) -> Wav2Vec2:
  """A transformers wav2vec2 (model, state dict + config, file or folder) -> our `Wav2Vec2`."""
  return _from_transformers(WAV2VEC2, src, config, compute=compute, dtype=dtype,
                            progress=progress)


def wavlm_from_transformers(src: Any, config=None, *, compute: Compute = FP32,
                            dtype: Any = None, progress: bool = False) -> WavLM:
  """A transformers WavLM (model, state dict + config, file or folder) -> our `WavLM`."""
  return _from_transformers(WAVLM, src, config, compute=compute, dtype=dtype, progress=progress)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def to_transformers(model: nnx.Module, dtype: Any = None,
                    weight_norm: str = "parametrizations") -> dict[str, np.ndarray]:
  """Our model -> a `Wav2Vec2Model` / `WavLMModel` state dict of numpy arrays.

  weight_norm: "parametrizations" (what transformers 5 saves and loads) or "legacy"
  (`weight_g/weight_v`, for old code).
  """
  if weight_norm not in ("parametrizations", "legacy"):
    raise ValueError(f"weight_norm is {weight_norm!r}; use 'parametrizations' or 'legacy'.")
  out = {}
  for key, array in export_tensors(model, conversion_table(model), dtype=dtype):
    if weight_norm == "legacy":
      key = key.replace("parametrizations.weight.original0", "weight_g")
      key = key.replace("parametrizations.weight.original1", "weight_v")
    out[key] = array
  return out


def _family_of(model: nnx.Module) -> _Family:
  return WAVLM if isinstance(model, WavLM) else WAV2VEC2


def export_transformers(model: nnx.Module, dst: str | Path, *, overwrite: bool = False) -> dict:
  """Writes config.json + model.safetensors that `XModel.from_pretrained(dst)` loads."""
  family = _family_of(model)
  tensors = to_transformers(model)
  with atomic_folder(Path(dst), overwrite=overwrite) as tmp:
    config = model.config.to_dict()
    config["architectures"] = [family.torch_class]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(tmp / "model.safetensors", tensors.items())
  return _summary(tensors.values())


# ----------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------


def save_speech_encoder(model: nnx.Module, dst: str | Path, *, overwrite: bool = False) -> dict:
  """Writes a wav2vec2 or WavLM in our format: config.json + state/ (Orbax). Nothing is left
  half-written."""
  family = _family_of(model)
  config = model.config.to_dict()
  config["etalk_format"] = {"model": family.name, "version": FORMAT_VERSION}
  model_io.save_model(model, dst, config, overwrite=overwrite)
  return _summary(np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _is_ours(folder: Path) -> bool:
  path = folder / "config.json"
  if not path.is_file():
    return False
  try:
    return "etalk_format" in json.loads(path.read_text())
  except json.JSONDecodeError:
    return False


def _load_ours(family: _Family, folder: str | Path, compute: Compute = FP32):
  folder = Path(folder)
  if not folder.is_dir():
    raise ConversionError(f"{folder} is not a folder; give the folder written by "
                          f"`etalk convert {family.name}`.")
  config = _read_config_json(folder)
  record = config.pop("etalk_format", None)
  if record is None:
    raise ConversionError(f"{folder} is not in our format (its config.json has no etalk_format "
                          f"record); convert it first with `etalk convert {family.name} "
                          f"--src {folder} --dst OUT`.")
  if record.get("model") != family.name:
    raise ConversionError(f"{folder} holds a {record.get('model')!r} model, not {family.name}.")
  if record.get("version") != FORMAT_VERSION:
    raise ConversionError(f"{folder} was written in format version {record.get('version')}; "
                          f"this code reads version {FORMAT_VERSION}. Convert it again.")
  if not (folder / "state").is_dir():
    raise ConversionError(f"{folder} has no state/ folder; the conversion did not finish. "
                          "Convert it again.")
  model_config = family.config_cls.from_dict(config)
  try:
    return model_io.restore_model(folder, lambda: model_io.abstract(
        lambda rngs: family.model_cls(model_config, compute=compute, rngs=rngs)))
  except ValueError as error:
    raise ConversionError(f"{error} Convert the model again.") from error


def load_wav2vec2(folder: str | Path, compute: Compute = FP32) -> Wav2Vec2:
  """Our format (written by `save_speech_encoder` / `etalk convert wav2vec2`) -> `Wav2Vec2`."""
  return _load_ours(WAV2VEC2, folder, compute)


def load_wavlm(folder: str | Path, compute: Compute = FP32) -> WavLM:
  """Our format (written by `save_speech_encoder` / `etalk convert wavlm`) -> `WavLM`."""
  return _load_ours(WAVLM, folder, compute)


# ----------------------------------------------------------------------------------------------
# CLI commands
# ----------------------------------------------------------------------------------------------


def _summary(arrays) -> dict:
  tensors = parameters = nbytes = 0
  for array in arrays:
    tensors += 1
    parameters += int(np.prod(array.shape))
    nbytes += int(array.size * array.dtype.itemsize)
  return {"tensors": tensors, "parameters": parameters, "bytes": nbytes}


def _convert_command(family: _Family, src: str, dst: str, to: str, overwrite: bool) -> dict:
  start = time.perf_counter()
  if to not in ("ours", "transformers"):
    raise UserError(f"--to {to!r} is unknown; use 'ours' or 'transformers'.")
  src_path = Path(src)
  if not src_path.exists():
    raise ConversionError(f"--src {src} does not exist.")
  if src_path.is_dir() and _is_ours(src_path):
    model = _load_ours(family, src_path)
  else:
    model = _from_transformers(family, src_path, progress=False)
  summary = (save_speech_encoder(model, dst, overwrite=overwrite) if to == "ours" else
             export_transformers(model, dst, overwrite=overwrite))
  summary.update(model=family.name, src=str(src), dst=str(dst), to=to,
                 seconds=round(time.perf_counter() - start, 3))
  return summary


def convert_wav2vec2_command(src: str, dst: str, to: str = "ours", overwrite: bool = False
                             ) -> dict:
  """`etalk convert wav2vec2 --src DIR --dst DIR [--to ours|transformers] [--overwrite]`.

  src: a transformers folder (config.json + weights) or a folder in our format. to="ours" writes
  our format (config.json + Orbax state/); to="transformers" writes config.json +
  model.safetensors that `Wav2Vec2Model.from_pretrained(dst)` loads. Returns a summary dict
  (model, src, dst, to, tensors, parameters, bytes, seconds).
  """
  return _convert_command(WAV2VEC2, src, dst, to, overwrite)


def convert_wavlm_command(src: str, dst: str, to: str = "ours", overwrite: bool = False
                          ) -> dict:
  """`etalk convert wavlm ...`: as `convert_wav2vec2_command`, for WavLM."""
  return _convert_command(WAVLM, src, dst, to, overwrite)
