"""SVD's VAE: a per-image KL encoder and a temporal decoder (diffusers'
AutoencoderKLTemporalDecoder).

`vae.encode(images)` takes `(n, height, width, 3)` in [-1, 1] and returns a DiagonalGaussian over
`(n, height / 8, width / 8, latent_channels)`; `vae.decode(latents, num_frames)` takes
`(batch * num_frames, h, w, latent_channels)` (unscaled: divide by `scaling_factor` first) and
returns `(batch * num_frames, 8h, 8w, 3)`. `decode_in_chunks` bounds memory for long videos.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from etalk_jax.layers.attention import Attention
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.logical_axes import register_family
from etalk_jax.layers.norm import group_norm
from etalk_jax.layers.resnet import (
  SPATIO_TEMPORAL_AXES,
  Downsample2D,
  ResnetBlock2D,
  SpatioTemporalResBlock,
  Upsample2D,
  conv,
)
from etalk_jax.svd.config import VAEConfig


@struct.dataclass
class DiagonalGaussian:
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)


def _mid_attention(channels: int, compute: Compute, rngs: nnx.Rngs) -> Attention:
  # One head over all channels, GroupNorm in front, residual: diffusers' VAE attention.
  return Attention(channels, heads=1, dim_head=channels, qkv_bias=True, norm_num_groups=32,
                   norm_eps=1e-6, residual_connection=True, compute=compute, rngs=rngs)


class DownEncoderBlock2D(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, num_layers: int, *,
               add_downsample: bool, compute: Compute = FP32, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, eps=1e-6,
                      compute=compute, rngs=rngs) for i in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=0, compute=compute,
                                                rngs=rngs)]) if add_downsample else None)

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UNetMidBlock2D(nnx.Module):
  def __init__(self, channels: int, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, eps=1e-6, compute=compute,
                                           rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([_mid_attention(channels, compute, rngs)])

  def __call__(self, x):
    x = self.resnets[0](x)
    x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  def __init__(self, config: VAEConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    channels = config.block_out_channels
    common = dict(compute=compute, rngs=rngs)
    self.conv_in = conv(config.in_channels, channels[0], **common)
    blocks = []
    out_ch = channels[0]
    for i in range(len(channels)):
      in_ch, out_ch = out_ch, channels[i]
      blocks.append(DownEncoderBlock2D(in_ch, out_ch, config.layers_per_block,
                                       add_downsample=i < len(channels) - 1, **common))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = UNetMidBlock2D(channels[-1], **common)
    self.conv_norm_out = group_norm(channels[-1], 1e-6, **common)
    self.conv_out = conv(channels[-1], 2 * config.latent_channels, **common)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


def _decoder_res_block(in_channels: int, out_channels: int, compute: Compute, rngs: nnx.Rngs
                       ) -> SpatioTemporalResBlock:
  # No timestep; the temporal path is mixed in by a learned alpha that starts at 0.5.
  return SpatioTemporalResBlock(in_channels, out_channels, None, eps=1e-6, temporal_eps=1e-5,
                                merge_factor=0.0, merge_strategy="learned",
                                switch_spatial_to_temporal_mix=True, compute=compute, rngs=rngs)


class MidBlockTemporalDecoder(nnx.Module):
  def __init__(self, channels: int, num_layers: int, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([_decoder_res_block(channels, channels, compute, rngs)
                             for _ in range(num_layers)])
    self.attentions = nnx.List([_mid_attention(channels, compute, rngs)])

  def __call__(self, x, image_only_indicator):
    x = self.resnets[0](x, None, image_only_indicator)
    for resnet, attention in zip(self.resnets[1:], self.attentions):
      x = attention(x)
      x = resnet(x, None, image_only_indicator)
    return x


class UpBlockTemporalDecoder(nnx.Module):
  def __init__(self, in_channels: int, out_channels: int, num_layers: int, *,
               add_upsample: bool, compute: Compute = FP32, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        _decoder_res_block(in_channels if i == 0 else out_channels, out_channels, compute, rngs)
        for i in range(num_layers)])
    self.upsamplers = (nnx.List([Upsample2D(out_channels, compute=compute, rngs=rngs)])
                       if add_upsample else None)

  def __call__(self, x, image_only_indicator):
    for resnet in self.resnets:
      x = resnet(x, None, image_only_indicator)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class TemporalDecoder(nnx.Module):
  def __init__(self, config: VAEConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    channels = config.block_out_channels
    common = dict(compute=compute, rngs=rngs)
    self.conv_in = conv(config.latent_channels, channels[-1], **common)
    self.mid_block = MidBlockTemporalDecoder(channels[-1], config.layers_per_block, **common)
    rev = tuple(reversed(channels))
    blocks = []
    out_ch = rev[0]
    for i in range(len(channels)):
      prev_ch, out_ch = out_ch, rev[i]
      blocks.append(UpBlockTemporalDecoder(prev_ch, out_ch, config.layers_per_block + 1,
                                           add_upsample=i < len(channels) - 1, **common))
    self.up_blocks = nnx.List(blocks)
    self.conv_norm_out = group_norm(channels[0], 1e-6, **common)
    self.conv_out = conv(channels[0], config.out_channels, **common)
    self.time_conv_out = conv(config.out_channels, config.out_channels, (3, 1, 1), **common)

  def __call__(self, z, num_frames: int):
    batch = z.shape[0] // num_frames
    image_only_indicator = jnp.zeros((batch, num_frames), z.dtype)
    x = self.conv_in(z)
    x = self.mid_block(x, image_only_indicator)
    for block in self.up_blocks:
      x = block(x, image_only_indicator)
    x = self.conv_out(nnx.silu(self.conv_norm_out(x)))
    clips = self.time_conv_out(x.reshape(batch, num_frames, *x.shape[1:]))
    return clips.reshape(x.shape)


class TemporalVAE(nnx.Module):
  logical_family = register_family("vae", SPATIO_TEMPORAL_AXES)

  def __init__(self, config: VAEConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.config = config
    self.compute_dtype = compute.dtype
    self.encoder = Encoder(config, compute=compute, rngs=rngs)
    self.quant_conv = conv(2 * config.latent_channels, 2 * config.latent_channels, (1, 1),
                           compute=compute, rngs=rngs)
    self.decoder = TemporalDecoder(config, compute=compute, rngs=rngs)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    moments = self.quant_conv(self.encoder(images.astype(self.compute_dtype)))
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, latents: jax.Array, num_frames: int) -> jax.Array:
    if latents.shape[0] % num_frames:
      raise ValueError(f"{latents.shape[0]} latents do not split into clips of {num_frames} "
                       "frames")
    return self.decoder(latents.astype(self.compute_dtype), num_frames).astype(jnp.float32)


_decode_jit = nnx.jit(TemporalVAE.decode, static_argnames="num_frames")


def decode_in_chunks(vae: TemporalVAE, latents: jax.Array, chunk_size: int) -> jax.Array:
  """Decodes `(frames, h, w, c)` latents of one clip `chunk_size` frames at a time.

  Each chunk is decoded as a clip of its own, as diffusers' SVD pipeline does with
  `decode_chunk_size`; at most two shapes are compiled (full chunks and the last one).
  """
  frames = latents.shape[0]
  chunks = [_decode_jit(vae, latents[start:start + chunk_size],
                        num_frames=min(chunk_size, frames - start))
            for start in range(0, frames, chunk_size)]
  return jnp.concatenate(chunks, axis=0)
