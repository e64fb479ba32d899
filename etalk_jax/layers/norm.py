"""Normalisation layers as PyTorch computes them (two-pass variance), fast on XLA:CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax.layers.compute import FP32, Compute


class GroupNorm(nnx.GroupNorm):
  """nnx.GroupNorm over channels-last input of any rank, statistics per example (all positions
  and frames of it) and per group, with a two-pass variance as PyTorch computes it.

  Computed as per-channel sums folded into groups: XLA:CPU reduces `(batch, positions, ch)` over
  positions ~5x faster than flax's reduction over `(batch, ..., groups, ch / group)` (0.5 ms vs
  2.7 ms on (8, 32, 32, 64)), and the UNet has a GroupNorm in front of every conv pair.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, channels = x.shape[0], x.shape[-1]
    per_group = channels // self.num_groups
    flat = x.reshape(batch, -1, channels).astype(jnp.float32)
    count = flat.shape[1] * per_group

    def group_mean(values):  # (batch, positions, ch) -> (batch, 1, ch): each channel's group mean
      sums = values.sum(axis=1).reshape(batch, self.num_groups, per_group).sum(axis=-1)
      return jnp.repeat(sums / count, per_group, axis=-1)[:, None, :]

    centered = flat - group_mean(flat)
    inverse_std = jax.lax.rsqrt(group_mean(jnp.square(centered)) + self.epsilon)
    out = centered * (inverse_std * self.scale[...].astype(jnp.float32))
    out = out + self.bias[...].astype(jnp.float32)
    return out.reshape(x.shape).astype(self.dtype or x.dtype)


def group_norm(channels: int, eps: float, *, groups: int = 32, compute: Compute = FP32,
               rngs: nnx.Rngs) -> GroupNorm:
  return GroupNorm(channels, num_groups=groups, epsilon=eps, rngs=rngs, **compute.dense_kwargs())


def layer_norm(dim: int, *, eps: float = 1e-5, compute: Compute = FP32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs,
                       **compute.dense_kwargs())
