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
  return model_io.save_model(model, folder, model.config.to_dict(), overwrite=overwrite)


def load_projector(folder: str | Path, compute: Compute = FP32) -> AudioLipProjector:
  return model_io.load_model(folder, ProjectorConfig, AudioLipProjector, compute)


def load_dicte(folder: str | Path, compute: Compute = FP32) -> DiCTE:
  return model_io.load_model(folder, DiCTEConfig, DiCTE, compute)
