"""Residual blocks, resampling and the spatial/temporal blender shared by the SVD UNet and VAE.

Layouts: spatial blocks see frames folded into the batch, `(batch * frames, height, width, ch)`;
temporal blocks see `(batch, frames, height, width, ch)`. Parameter names follow diffusers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.logical_axes import COMMON, SCALAR, Rule, parameter_of
from etalk_jax.layers.norm import group_norm


def conv(in_channels: int, out_channels: int, kernel_size: tuple[int, ...] = (3, 3), *,
         stride: int = 1, padding: tuple[tuple[int, int], ...] | None = None,
         compute: Compute = FP32, rngs: nnx.Rngs) -> nnx.Conv:
  """A conv with PyTorch's symmetric `k // 2` padding unless `padding` says otherwise."""
  if padding is None:
    padding = tuple((k // 2, k // 2) for k in kernel_size)
  return nnx.Conv(in_channels, out_channels, kernel_size, strides=stride, padding=padding,
                  rngs=rngs, **compute.dense_kwargs())


class ResnetBlock2D(nnx.Module):
  """GroupNorm-SiLU-conv twice, timestep added in between, 1x1 shortcut when widths differ."""

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, *,
               eps: float = 1e-6, groups: int = 32, compute: Compute = FP32, rngs: nnx.Rngs):
    self.norm1 = group_norm(in_channels, eps, groups=groups, compute=compute, rngs=rngs)
    self.conv1 = conv(in_channels, out_channels, compute=compute, rngs=rngs)
    self.time_emb_proj = (nnx.Linear(temb_channels, out_channels, rngs=rngs,
                                     **compute.dense_kwargs()) if temb_channels else None)
    self.norm2 = group_norm(out_channels, eps, groups=groups, compute=compute, rngs=rngs)
    self.conv2 = conv(out_channels, out_channels, compute=compute, rngs=rngs)
    self.conv_shortcut = (conv(in_channels, out_channels, (1, 1), compute=compute, rngs=rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    if self.time_emb_proj is not None and temb is not None:
      h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class TemporalResnetBlock(nnx.Module):
  """ResnetBlock2D's twin along time: (3, 1, 1) convs over `(batch, frames, h, w, ch)`.

  Its GroupNorm pools statistics over all frames of a clip, as diffusers' 5-D GroupNorm does.
  """

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, *,
               eps: float = 1e-6, compute: Compute = FP32, rngs: nnx.Rngs):
    kernel = (3, 1, 1)
    self.norm1 = group_norm(in_channels, eps, compute=compute, rngs=rngs)
    self.conv1 = conv(in_channels, out_channels, kernel, compute=compute, rngs=rngs)
    self.time_emb_proj = (nnx.Linear(temb_channels, out_channels, rngs=rngs,
                                     **compute.dense_kwargs()) if temb_channels else None)
    self.norm2 = group_norm(out_channels, eps, compute=compute, rngs=rngs)
    self.conv2 = conv(out_channels, out_channels, kernel, compute=compute, rngs=rngs)
    self.conv_shortcut = (conv(in_channels, out_channels, (1, 1, 1), compute=compute, rngs=rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    if self.time_emb_proj is not None and temb is not None:  # temb: (batch, frames, ch)
      h = h + self.time_emb_proj(nnx.silu(temb))[:, :, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class AlphaBlender(nnx.Module):
  """Learned mix of a spatial and a temporal path: alpha * spatial + (1 - alpha) * temporal.

  "learned_with_images": alpha = sigmoid(mix_factor), or 1 for frames flagged image-only.
  "learned": alpha = sigmoid(mix_factor). `switch_spatial_to_temporal_mix` uses 1 - alpha.
  """

  STRATEGIES = ("learned", "learned_with_images")

  def __init__(self, alpha: float, merge_strategy: str = "learned_with_images",
               switch_spatial_to_temporal_mix: bool = False, *, compute: Compute = FP32):
    if merge_strategy not in self.STRATEGIES:
      raise ValueError(f"merge_strategy {merge_strategy!r} is not one of {self.STRATEGIES}")
    self.merge_strategy = merge_strategy
    self.switch_spatial_to_temporal_mix = switch_spatial_to_temporal_mix
    self.mix_factor = nnx.Param(jnp.full((1,), alpha, compute.param_dtype))

  def __call__(self, spatial: jax.Array, temporal: jax.Array,
               image_only_indicator: jax.Array | None = None) -> jax.Array:
    """spatial, temporal: `(batch, frames, ...)`; image_only_indicator: `(batch, frames)`."""
    alpha = jax.nn.sigmoid(self.mix_factor[...].astype(jnp.float32))
    if self.merge_strategy == "learned_with_images":
      if image_only_indicator is None:
        raise ValueError("AlphaBlender('learned_with_images') needs image_only_indicator")
      alpha = jnp.where(image_only_indicator.astype(bool), 1.0, alpha)
      alpha = alpha.reshape(alpha.shape + (1,) * (spatial.ndim - 2))
    alpha = alpha.astype(spatial.dtype)
    if self.switch_spatial_to_temporal_mix:
      alpha = 1.0 - alpha
    return alpha * spatial + (1.0 - alpha) * temporal


# Logical-axis table of the models built from these blocks (SVD's UNet and VAE, ETHD): the
# common layers and the blenders' mix factors.
SPATIO_TEMPORAL_AXES = COMMON + (Rule(parameter_of("time_mixer", "mix_factor"), 1, (SCALAR,)),)


class SpatioTemporalResBlock(nnx.Module):
  """A per-frame ResnetBlock2D, then a TemporalResnetBlock, blended by an AlphaBlender."""

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, *,
               eps: float = 1e-6, temporal_eps: float | None = None, merge_factor: float = 0.5,
               merge_strategy: str = "learned_with_images",
               switch_spatial_to_temporal_mix: bool = False, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels, eps=eps,
                                           compute=compute, rngs=rngs)
    self.temporal_res_block = TemporalResnetBlock(
        out_channels, out_channels, temb_channels,
        eps=eps if temporal_eps is None else temporal_eps, compute=compute, rngs=rngs)
    self.time_mixer = AlphaBlender(merge_factor, merge_strategy, switch_spatial_to_temporal_mix,
                                   compute=compute)

  def __call__(self, x: jax.Array, temb: jax.Array | None, image_only_indicator: jax.Array
               ) -> jax.Array:
    """x: `(batch * frames, h, w, ch)`, temb: `(batch * frames, d)`, indicator `(batch, frames)`."""
    batch, frames = image_only_indicator.shape
    spatial = self.spatial_res_block(x, temb)
    spatial = spatial.reshape(batch, frames, *spatial.shape[1:])
    if temb is not None:
      temb = temb.reshape(batch, frames, -1)
    temporal = self.temporal_res_block(spatial, temb)
    mixed = self.time_mixer(spatial, temporal, image_only_indicator)
    return mixed.reshape(batch * frames, *mixed.shape[2:])


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv. padding=1 pads symmetrically; padding=0 pads right/bottom only (VAE)."""

  def __init__(self, channels: int, *, padding: int = 1, compute: Compute = FP32,
               rngs: nnx.Rngs):
    pad = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
    self.conv = conv(channels, channels, stride=2, padding=pad, compute=compute, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, channels: int, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, compute=compute, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)
