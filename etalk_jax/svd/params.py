"""diffusers <-> NNX for the SVD UNet and VAE, and `etalk convert svd`.

The tables are derived from our module trees (see etalk_jax/weights.py); all that differs from
diffusers' names is in RENAMES. Legacy VAE checkpoints with `query/key/value/proj_attn` attention
names are read through LEGACY_ALIASES.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etalk_jax import model_io
from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.records import read_json_object
from etalk_jax.svd.config import UNetConfig, VAEConfig
from etalk_jax.svd.unet import UNetSpatioTemporal
from etalk_jax.svd.vae import TemporalVAE
from etalk_jax.weights import (
  AliasedSource,
  ConversionTable,
  atomic_folder,
  export_tensors,
  load_into,
  open_source,
  write_safetensors,
)

# our dotted module path -> diffusers' (applied in order)
RENAMES = (
    (r"(^|\.)to_out$", r"\1to_out.0"),
    (r"(^|\.)(ff|ff_in)\.proj_in$", r"\1\2.net.0.proj"),
    (r"(^|\.)(ff|ff_in)\.proj_out$", r"\1\2.net.2"),
)
LEGACY_ALIASES = (
    (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
)
WEIGHTS_STEM = "diffusion_pytorch_model"

# kind -> (config class, model class, component folder in a pipeline)
KINDS = {
    "unet": (UNetConfig, UNetSpatioTemporal, "unet"),
    "vae": (VAEConfig, TemporalVAE, "vae"),
}
_KIND_OF_CLASS = {config_cls.class_name: kind for kind, (config_cls, _, _) in KINDS.items()}


def abstract_model(kind: str, config, compute: Compute = FP32) -> nnx.Module:
  """The model's structure with shapes only (no weights allocated)."""
  model_cls = KINDS[kind][1]
  return model_io.abstract(lambda rngs: model_cls(config, compute=compute, rngs=rngs))


def conversion_table(model: nnx.Module) -> ConversionTable:
  return ConversionTable.build(model, renames=RENAMES)


def _config_of(kind: str, src: Any, config):
  config_cls = KINDS[kind][0]
  if config is not None:
    return config if isinstance(config, config_cls) else config_cls.from_dict(config)
  if hasattr(src, "config") and hasattr(src, "state_dict"):  # a live diffusers model
    return config_cls.from_dict(dict(src.config))
  if isinstance(src, (str, Path)) and Path(src).is_dir():
    return config_cls.from_file(Path(src) / "config.json")
  raise ValueError(f"no config for {kind}: pass config= with a state dict or a weight file")


def _from_diffusers(kind: str, src: Any, *, config=None, compute: Compute = FP32,
                    variant: str | None = None, dtype=None, progress: bool = False):
  config = _config_of(kind, src, config)
  model = abstract_model(kind, config, compute)
  source = open_source(src, stems=(WEIGHTS_STEM,), variant=variant)
  if kind == "vae":
    source = AliasedSource(source, LEGACY_ALIASES)
  try:
    return load_into(model, source, conversion_table(model), dtype=dtype, progress=progress)
  finally:
    source.close()


def unet_from_diffusers(src: Any, **options) -> UNetSpatioTemporal:
  """A diffusers UNetSpatioTemporalConditionModel, its state dict (with `config=`), a weight
  file (with `config=`) or a diffusers folder (config.json + safetensors / sharded / fp16 / .bin).

  options: config, compute (Compute), variant ("fp16"), dtype (of the loaded leaves), progress.
  """
  return _from_diffusers("unet", src, **options)


def vae_from_diffusers(src: Any, **options) -> TemporalVAE:
  """As `unet_from_diffusers`, for AutoencoderKLTemporalDecoder."""
  return _from_diffusers("vae", src, **options)


def to_diffusers(model: nnx.Module, dtype=None) -> dict[str, np.ndarray]:
  """diffusers-named numpy state dict of a UNet or VAE."""
  return dict(export_tensors(model, conversion_table(model), dtype=dtype))


def _kind_of(model: nnx.Module) -> str:
  for kind, (_, model_cls, _) in KINDS.items():
    if isinstance(model, model_cls):
      return kind
  raise TypeError(f"not an SVD model: {type(model).__name__}")


def export_diffusers(model: nnx.Module, folder: str | Path, *, dtype=None,
                     overwrite: bool = False) -> Path:
  """Writes config.json + diffusion_pytorch_model.safetensors that diffusers' from_pretrained
  loads."""
  config = dict(model.config.to_dict(), _diffusers_version="0.35.0")
  with atomic_folder(Path(folder), overwrite=overwrite) as tmp:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(tmp / f"{WEIGHTS_STEM}.safetensors",
                      export_tensors(model, conversion_table(model), dtype=dtype))
  return Path(folder)


def save_svd_model(model: nnx.Module, folder: str | Path, *, overwrite: bool = False) -> Path:
  """A UNet or VAE in our format: config.json (diffusers fields) + Orbax state."""
  return model_io.save_model(model, folder, model.config.to_dict(), overwrite=overwrite)


def _load(kind: str, folder: str | Path, compute: Compute = FP32):
  config_cls = KINDS[kind][0]
  fields = model_io.read_config(folder)
  if fields.get("_class_name") not in (None, config_cls.class_name):
    raise UserError(f"{folder} holds a {fields['_class_name']}, not a {config_cls.class_name}")
  config = config_cls.from_dict(fields)
  return model_io.restore_model(folder, lambda: abstract_model(kind, config, compute))


def load_unet(folder: str | Path, compute: Compute = FP32) -> UNetSpatioTemporal:
  return _load("unet", folder, compute)


def load_vae(folder: str | Path, compute: Compute = FP32) -> TemporalVAE:
  return _load("vae", folder, compute)


# ----------------------------------------------------------------------------------------------
# `etalk convert svd`
# ----------------------------------------------------------------------------------------------

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _read_component_config(path: Path) -> dict[str, Any]:
  """A component's config.json as a dict; one UserError naming it when it does not parse."""
  return read_json_object(path, what="a diffusers config",
                          fix="restore the config.json the model was released with.")


def _components(src: Path) -> dict[str, Path]:
  """kind -> folder: a pipeline folder's unet/ and vae/, or a single component folder. Every
  config.json found is parsed here, before anything is converted or written."""
  config = src / "config.json"
  if config.is_file():
    name = _read_component_config(config).get("_class_name")
    if name not in _KIND_OF_CLASS:
      raise UserError(f"{config} describes a {name!r}; expected one of "
                      f"{', '.join(_KIND_OF_CLASS)}")
    return {_KIND_OF_CLASS[name]: src}
  found = {kind: src / sub for kind, (_, _, sub) in KINDS.items()
           if (src / sub / "config.json").is_file()}
  if not found:
    raise UserError(f"{src} is neither an SVD pipeline folder (with unet/ and vae/) nor a "
                    "UNet or VAE folder with config.json")
  for folder in found.values():
    _read_component_config(folder / "config.json")
  return found


def convert_svd_command(src: str, dst: str, to: str = "ours", overwrite: bool = False,
                        dtype: str = "float32", variant: str | None = None,
                        progress: bool = True) -> dict[str, Any]:
  """diffusers folder -> our folder (to="ours"), or our folder -> diffusers folder."""
  if dtype not in _DTYPES:
    raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
  src_path, dst_path = Path(src), Path(dst)
  if not src_path.is_dir():
    raise InputNotFound(f"--src {src}: no such folder")
  components = _components(src_path)
  single = (src_path / "config.json").is_file()
  started = time.perf_counter()
  summary: dict[str, Any] = {"components": {}}
  with atomic_folder(dst_path, overwrite=overwrite) as tmp:
    for kind, folder in components.items():
      out = tmp if single else tmp / KINDS[kind][2]
      if to == "ours":
        model = _from_diffusers(kind, folder, variant=variant, dtype=_DTYPES[dtype],
                                progress=progress)
        save_svd_model(model, out, overwrite=True)
      elif to == "diffusers":
        model = _load(kind, folder)
        export_diffusers(model, out, dtype=_DTYPES[dtype], overwrite=True)
      else:
        raise UserError(f"--to {to!r}: choose 'ours' or 'diffusers'")
      leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
      summary["components"][kind] = {
          "tensors": len(leaves),
          "parameters": sum(int(np.prod(x.shape)) for x in leaves),
          "bytes": sum(int(x.nbytes) for x in leaves),
      }
      del model
  summary["seconds"] = round(time.perf_counter() - started, 2)
  summary["dst"] = str(dst_path)
  return summary
