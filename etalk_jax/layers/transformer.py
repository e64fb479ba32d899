"""Transformer blocks of diffusers' spatio-temporal models: a per-frame block and a temporal
block."""

from __future__ import annotations

import jax
from flax import nnx

from etalk_jax.layers.attention import Attention
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.norm import layer_norm


class FeedForward(nnx.Module):
  """GEGLU feed-forward: proj_in to 2 x inner (value, gate), value * gelu(gate), proj_out.

  diffusers names these `net.0.proj` and `net.2`; the SVD converter renames.
  """

  def __init__(self, dim: int, dim_out: int | None = None, *, mult: int = 4,
               compute: Compute = FP32, rngs: nnx.Rngs):
    inner = dim * mult
    kw = compute.dense_kwargs()
    self.proj_in = nnx.Linear(dim, inner * 2, rngs=rngs, **kw)
    self.proj_out = nnx.Linear(inner, dim_out or dim, rngs=rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jax.numpy.split(self.proj_in(x), 2, axis=-1)
    return self.proj_out(value * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
  """Per-frame block: self-attention, cross-attention to the context, GEGLU; pre-LayerNorm."""

  def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int | None, *,
               compute: Compute = FP32, rngs: nnx.Rngs):
    common = dict(heads=heads, dim_head=head_dim, compute=compute, rngs=rngs)
    self.norm1 = layer_norm(dim, compute=compute, rngs=rngs)
    self.attn1 = Attention(dim, **common)
    self.norm2 = layer_norm(dim, compute=compute, rngs=rngs)
    self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **common)
    self.norm3 = layer_norm(dim, compute=compute, rngs=rngs)
    self.ff = FeedForward(dim, compute=compute, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None = None
               ) -> jax.Array:
    """x: `(batch * frames, tokens, dim)`; context: `(batch * frames, context_len, ctx_dim)`."""
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context, mask=context_mask)
    return x + self.ff(self.norm3(x))


class TemporalBasicTransformerBlock(nnx.Module):
  """Attention along time at each spatial position, cross-attention to a per-clip context."""

  def __init__(self, dim: int, time_mix_inner_dim: int, heads: int, head_dim: int,
               cross_attention_dim: int | None, *, compute: Compute = FP32, rngs: nnx.Rngs):
    common = dict(heads=heads, dim_head=head_dim, compute=compute, rngs=rngs)
    self.is_res = dim == time_mix_inner_dim
    self.norm_in = layer_norm(dim, compute=compute, rngs=rngs)
    self.ff_in = FeedForward(dim, time_mix_inner_dim, compute=compute, rngs=rngs)
    self.norm1 = layer_norm(time_mix_inner_dim, compute=compute, rngs=rngs)
    self.attn1 = Attention(time_mix_inner_dim, **common)
    if cross_attention_dim is not None:
      self.norm2 = layer_norm(time_mix_inner_dim, compute=compute, rngs=rngs)
      self.attn2 = Attention(time_mix_inner_dim, cross_attention_dim=cross_attention_dim,
                             **common)
    else:
      self.norm2 = self.attn2 = None
    self.norm3 = layer_norm(time_mix_inner_dim, compute=compute, rngs=rngs)
    self.ff = FeedForward(time_mix_inner_dim, compute=compute, rngs=rngs)

  def __call__(self, x: jax.Array, num_frames: int, context: jax.Array | None = None,
               **cross_inputs) -> jax.Array:
    """x: `(batch * frames, tokens, dim)`; context: `(batch, context_len, ctx_dim)`, shared by
    every frame and position of a clip (SVD's first-frame `time_context`); cross_inputs go to
    `cross_attention` (a subclass's extras)."""
    batch_frames, tokens, dim = x.shape
    batch = batch_frames // num_frames
    # (batch, frames, tokens, dim) -> (batch * tokens, frames, dim): sequences along time.
    x = x.reshape(batch, num_frames, tokens, dim).swapaxes(1, 2).reshape(-1, num_frames, dim)
    residual = x
    x = self.ff_in(self.norm_in(x))
    if self.is_res:
      x = x + residual
    x = x + self.attn1(self.norm1(x))
    if self.attn2 is not None:
      x = x + self.cross_attention(self.norm2(x), batch, tokens, num_frames, context,
                                   **cross_inputs)
    ff_out = self.ff(self.norm3(x))
    x = ff_out + x if self.is_res else ff_out
    return x.reshape(batch, tokens, num_frames, -1).swapaxes(1, 2).reshape(batch_frames, tokens, -1)

  def cross_attention(self, normed: jax.Array, batch: int, tokens: int, num_frames: int,
                      context: jax.Array) -> jax.Array:
    """normed: `(batch * tokens, frames, dim)`. Every (position, frame) query sees the same clip
    context: fold them into one sequence per clip rather than copying the context to each
    position."""
    queries = normed.reshape(batch, tokens * num_frames, -1)
    return self.attn2(queries, context).reshape(normed.shape)
