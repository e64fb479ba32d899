"""Configs of the SVD models, with diffusers' config.json field names, read and written as such."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from etalk_jax.errors import InputNotFound, UserError

log = logging.getLogger(__name__)


def _per_level(value: int | Sequence[int], levels: int, name: str) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * levels
  value = tuple(value)
  if len(value) != levels:
    raise UserError(f"config field {name} has {len(value)} entries for {levels} levels")
  return value


class _DiffusersConfig:
  """from_dict / to_dict / from_file for a frozen dataclass named after a diffusers class."""

  class_name = ""

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in fields if k not in known and not k.startswith("_"))
    if unknown:
      log.info("%s: ignoring config fields that do not change the model: %s", cls.__name__,
               ", ".join(unknown))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known}
    return cls(**values)

  @classmethod
  def from_file(cls, path: str | Path):
    path = Path(path)
    try:
      fields = json.loads(path.read_text())
    except FileNotFoundError as error:
      raise InputNotFound(f"{path} is missing: a diffusers model folder needs its "
                          "config.json beside the weights") from error
    except json.JSONDecodeError as error:
      raise UserError(f"{path} is not valid JSON ({error})") from error
    name = fields.get("_class_name")
    if name and name != cls.class_name:
      raise UserError(f"{path} describes a {name}, not a {cls.class_name}")
    return cls.from_dict(fields)

  def to_dict(self) -> dict[str, Any]:
    fields = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(self).items()}
    return {"_class_name": self.class_name, **fields}


@dataclasses.dataclass(frozen=True)
class UNetConfig(_DiffusersConfig):
  """diffusers' UNetSpatioTemporalConditionModel config; defaults are SVD / SVD-XT's."""

  class_name = "UNetSpatioTemporalConditionModel"

  sample_size: int | None = 96
  in_channels: int = 8
  out_channels: int = 4
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlockSpatioTemporal",) * 3 + (
      "DownBlockSpatioTemporal",)
  up_block_types: tuple[str, ...] = ("UpBlockSpatioTemporal",) + (
      "CrossAttnUpBlockSpatioTemporal",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  addition_time_embed_dim: int = 256
  projection_class_embeddings_input_dim: int = 768
  layers_per_block: int | tuple[int, ...] = 2
  cross_attention_dim: int | tuple[int, ...] = 1024
  transformer_layers_per_block: int | tuple[int, ...] = 1
  num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20)
  num_frames: int = 25

  def __post_init__(self):
    levels = len(self.block_out_channels)
    if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
      raise UserError("down_block_types, up_block_types and block_out_channels must have the "
                      "same length")
    for name in self.down_block_types:
      if name not in ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"):
        raise UserError(f"unknown down block type {name!r}")
    for name in self.up_block_types:
      if name not in ("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"):
        raise UserError(f"unknown up block type {name!r}")
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                 "num_attention_heads"):
      _per_level(getattr(self, name), levels, name)
    if self.projection_class_embeddings_input_dim % self.addition_time_embed_dim:
      raise UserError("projection_class_embeddings_input_dim must be a multiple of "
                      "addition_time_embed_dim (one embedding per added time id)")

  def per_level(self, name: str) -> tuple[int, ...]:
    return _per_level(getattr(self, name), len(self.block_out_channels), name)


@dataclasses.dataclass(frozen=True)
class VAEConfig(_DiffusersConfig):
  """diffusers' AutoencoderKLTemporalDecoder config; defaults are SVD's VAE."""

  class_name = "AutoencoderKLTemporalDecoder"

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  sample_size: int = 768
  scaling_factor: float = 0.18215
  force_upcast: bool = True

  def __post_init__(self):
    if len(self.down_block_types) != len(self.block_out_channels):
      raise UserError("down_block_types and block_out_channels must have the same length")
    for name in self.down_block_types:
      if name != "DownEncoderBlock2D":
        raise UserError(f"unknown VAE down block type {name!r}")
