"""Stable Video Diffusion: the spatio-temporal UNet, the temporal VAE and their converters."""

from etalk_jax.svd.config import UNetConfig, VAEConfig
from etalk_jax.svd.params import (
  export_diffusers,
  load_unet,
  load_vae,
  save_svd_model,
  to_diffusers,
  unet_from_diffusers,
  vae_from_diffusers,
)
from etalk_jax.svd.unet import UNetSpatioTemporal
from etalk_jax.svd.vae import DiagonalGaussian, TemporalVAE, decode_in_chunks

__all__ = [
    "UNetConfig", "VAEConfig", "UNetSpatioTemporal", "TemporalVAE", "DiagonalGaussian",
    "decode_in_chunks", "unet_from_diffusers", "vae_from_diffusers", "to_diffusers",
    "save_svd_model", "export_diffusers", "load_unet", "load_vae",
]
