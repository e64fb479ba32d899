"""Saving and loading the V-AID models in our format (config.json + Orbax state, `model_io`)."""

from __future__ import annotations

from pathlib import Path

from etalk_jax import model_io
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.vaid.dicte import DiCTE, DiCTEConfig
from etalk_jax.vaid.projector import AudioLipProjector, ProjectorConfig


def save_vaid_model(model: AudioLipProjector | DiCTE, folder: str | Path, *,
                    overwrite: bool = False) -> Path:
  """The projector or Di-CTE -> `folder` (config.json names its model_type)."""
  return model_io.save_model(folder, model, model.config.to_dict(), overwrite=overwrite)


def _load(folder: str | Path, config_class, model_class, compute: Compute):
  try:
    config = config_class.from_dict(model_io.read_config(folder))
  except ValueError as error:  # another model's folder, or fields this code does not know
    raise ValueError(f"{folder} does not hold a V-AID {config_class.label}: {error}") from error
  return model_io.restore_model(folder, lambda: model_io.abstract(
      lambda rngs: model_class(config, compute=compute, rngs=rngs)))


def load_projector(folder: str | Path, compute: Compute = FP32) -> AudioLipProjector:
  return _load(folder, ProjectorConfig, AudioLipProjector, compute)


def load_dicte(folder: str | Path, compute: Compute = FP32) -> DiCTE:
  return _load(folder, DiCTEConfig, DiCTE, compute)
