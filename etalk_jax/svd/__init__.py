"""Stable Video Diffusion: the spatio-temporal UNet, the temporal VAE and their converters."""

from etalk_jax.svd.config import UNetConfig, VAEConfig
from etalk_jax.svd.params import (load_unet, load_vae, save, save_diffusers, to_diffusers,
                                  unet_from_diffusers, unet_to_diffusers, vae_from_diffusers,
                                  vae_to_diffusers)
from etalk_jax.svd.unet import UNetSpatioTemporal
from etalk_jax.svd.vae import DiagonalGaussian, TemporalVAE, decode_in_chunks

__all__ = [
    "UNetConfig", "VAEConfig", "UNetSpatioTemporal", "TemporalVAE", "DiagonalGaussian",
    "decode_in_chunks", "unet_from_diffusers", "vae_from_diffusers", "unet_to_diffusers",
    "vae_to_diffusers", "to_diffusers", "save", "save_diffusers", "load_unet", "load_vae",
]
