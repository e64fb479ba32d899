"""EDI (expression decoupling injection) and the ETHD transformer blocks that carry it.

docs/ARCHITECTURE.md §3.5. In every spatial transformer block, after the lip cross-attention (the
paper's Fig. 2(c) order: lip CA, then EDI on its output):

    h ← h + CA_lip(norm2(h), L)
    Δ = CA(norm2(h), E_dri) − CA(norm2(h), E_ref),    h ← h + face_mask · Δ

with ONE cross-attention shared by both terms (so Δ = 0 whenever the driving expression equals
the reference one) whose output projection starts at zero. Its queries are the lip-conditioned
stream normalised by the block's `norm2` (shared with the lip CA: no extra norm, as the paper's
1.58 G parameters leave room for the shared CA alone, and checkpoints keep their shapes).
In every temporal block, each frame cross-attends to the driving expression tokens of its own
±2-frame window (a banded mask) inside the face mask; outside it the block adds what SVD's
temporal cross-attention gives for SVD's unconditional (zero) context, so expression has no say
there and SVD's behaviour without an image embedding is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax.layers.attention import Attention
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.transformer import BasicTransformerBlock, TemporalBasicTransformerBlock
from etalk_jax.svd.unet import TransformerSpatioTemporalModel


def zero_linear(linear: nnx.Linear) -> None:
  """Zero a Linear's kernel and bias: a new residual branch that starts as the identity."""
  linear.kernel.set_value(jnp.zeros_like(linear.kernel.get_value()))
  if linear.bias is not None:
    linear.bias.set_value(jnp.zeros_like(linear.bias.get_value()))


class SpatialBlockWithEDI(BasicTransformerBlock):
  """SVD's per-frame block (self-attention, lip cross-attention, GEGLU) with EDI after attn2."""

  def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int | None, *,
               compute: Compute = FP32, rngs: nnx.Rngs):
    super().__init__(dim, heads, head_dim, cross_attention_dim, compute=compute, rngs=rngs)
    self.edi = Attention(dim, heads=heads, dim_head=head_dim,
                         cross_attention_dim=cross_attention_dim, compute=compute, rngs=rngs)
    zero_linear(self.edi.to_out)

  def __call__(self, x: jax.Array, context: jax.Array, *, driving: jax.Array,
               driving_mask: jax.Array, reference: jax.Array, face_mask: jax.Array
               ) -> jax.Array:
    """x: `(batch * frames, tokens, dim)`; context: lip tokens `(batch * frames, 5, ctx)`;
    driving: `(batch * frames, 5, ctx)` with driving_mask `(batch * frames, 1, 1, 5)`;
    reference: `(batch * frames, 1, ctx)`; face_mask: `(batch * frames, tokens, 1)`."""
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    lip_conditioned = self.norm2(x)  # EDI reads the lip CA's output stream (Fig. 2(c))
    delta = (self.edi(lip_conditioned, driving, mask=driving_mask)
             - self.edi(lip_conditioned, reference))
    x = x + face_mask * delta
    return x + self.ff(self.norm3(x))


def attention_to_zero_context(attention: Attention, dtype) -> jax.Array:
  """`(1, dim)`: what `attention` outputs for a context of zero tokens, whatever the queries:
  every key is the same, so the softmax is uniform and the output is to_out(to_v(0)) (with
  SVD's bias-free to_v, to_out's bias)."""
  zero = jnp.zeros((1, attention.to_v.in_features), dtype)
  return attention.to_out(attention.to_v(zero))


class TemporalBlockWithExpression(TemporalBasicTransformerBlock):
  """SVD's temporal block whose cross-attention reads each frame's expression-token window
  inside the face mask, and SVD's zero-context cross-attention outside it."""

  def cross_attention(self, normed: jax.Array, batch: int, tokens: int, num_frames: int,
                      context: jax.Array, *, context_mask: jax.Array, face_mask: jax.Array
                      ) -> jax.Array:
    """normed: `(batch * tokens, frames, dim)`; context `(batch * frames, 5, ctx)` with
    context_mask `(batch * frames, 1, 1, 5)`; face_mask `(batch * frames, tokens, 1)`.

    A frame's queries at every position share that frame's window, so the frames become the
    attention batch and the positions its queries: no copy of the tokens per position.
    """
    per_frame = normed.reshape(batch, tokens, num_frames, -1).swapaxes(1, 2)
    queries = per_frame.reshape(batch * num_frames, tokens, -1)
    outside = attention_to_zero_context(self.attn2, queries.dtype)
    out = self.attn2(queries, context, mask=context_mask) * face_mask + outside * (1 - face_mask)
    return out.reshape(batch, num_frames, tokens, -1).swapaxes(1, 2).reshape(normed.shape)


def area_downsample(mask: jax.Array, height: int, width: int) -> jax.Array:
  """`(batch, H, W)` -> `(batch, height, width)` by averaging (H, W multiples of the target)."""
  batch, full_height, full_width = mask.shape
  if full_height % height or full_width % width:
    raise ValueError(f"face mask of {full_height}x{full_width} does not divide into "
                     f"{height}x{width}; give it at the latent size or a multiple of it")
  fy, fx = full_height // height, full_width // width
  return mask.reshape(batch, height, fy, width, fx).mean(axis=(2, 4))


class ETHDTransformer(TransformerSpatioTemporalModel):
  """TransformerSpatioTemporalModel with EDI in the spatial blocks and per-frame expression
  windows in the temporal blocks; reads ETHD's `conditions` (see `ETHD.conditions_for`)."""

  spatial_block_cls = SpatialBlockWithEDI
  temporal_block_cls = TemporalBlockWithExpression

  def block_inputs(self, x, context, image_only_indicator, conditions):
    batch, frames = image_only_indicator.shape
    _, height, width, _ = x.shape
    face = area_downsample(conditions["face_mask"], height, width).astype(x.dtype)
    face = jnp.repeat(face.reshape(batch, 1, height * width, 1), frames, axis=1)
    face = face.reshape(batch * frames, height * width, 1)
    spatial = dict(driving=conditions["expression_tokens"],
                   driving_mask=conditions["expression_mask"],
                   reference=conditions["reference_tokens"], face_mask=face)
    temporal = dict(context=conditions["expression_tokens"],
                    context_mask=conditions["expression_mask"], face_mask=face)
    return spatial, temporal
