"""ETHD, EmotiveTalk's talking-head diffusion backbone on SVD's spatio-temporal UNet."""

from etalk_jax.ethd.edi import ETHDTransformer, SpatialBlockWithEDI, TemporalBlockWithExpression
from etalk_jax.ethd.model import (
  ETHD,
  ETHDConfig,
  ethd_from_diffusers,
  ethd_from_svd,
  frame_windows,
  load_ethd,
  save_ethd,
)

__all__ = ["ETHD", "ETHDConfig", "ETHDTransformer", "SpatialBlockWithEDI",
           "TemporalBlockWithExpression", "ethd_from_diffusers", "ethd_from_svd",
           "frame_windows", "load_ethd", "save_ethd"]
