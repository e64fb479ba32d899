"""Sinusoidal timestep features and the MLP that embeds them (diffusers' Timesteps /
TimestepEmbedding)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax.layers.compute import FP32, Compute


def timestep_features(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                      downscale_freq_shift: float = 0.0, max_period: float = 10000.0
                      ) -> jax.Array:
  """`(n,)` -> `(n, dim)` sinusoidal features, in float32 as diffusers computes them."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  frequencies = jnp.exp(exponent / (half - downscale_freq_shift))
  angles = timesteps.astype(jnp.float32)[:, None] * frequencies[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  features = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    features = jnp.pad(features, ((0, 0), (0, 1)))
  return features


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2."""

  def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None, *,
               compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.linear_1 = nnx.Linear(in_channels, time_embed_dim, rngs=rngs, **kw)
    self.linear_2 = nnx.Linear(time_embed_dim, out_dim or time_embed_dim, rngs=rngs, **kw)

  def __call__(self, features: jax.Array) -> jax.Array:
    return self.linear_2(nnx.silu(self.linear_1(features)))
