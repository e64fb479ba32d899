"""WavLM in Flax NNX: all of transformers' `WavLMModel`.

WavLM is wav2vec2 (same feature encoder, projection and positional convolution, shared from
`audio/wav2vec2.py`) with a gated relative position bias in every attention layer: the first layer
owns a bucketed relative-position embedding (`rel_attn_embed`, one value per head and bucket);
each layer scales that bias per query by a gate computed from its own input
(`gru_rel_pos_linear`, `gru_rel_pos_const`) and adds it to the attention logits.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etalk_jax.audio.wav2vec2 import (
  SPEECH_AXES,
  Encoder,
  FeedForward,
  SpeechEncoderBase,
  Wav2Vec2Config,
)
from etalk_jax.errors import UserError
from etalk_jax.layers.attention import dot_product_attention
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.logical_axes import (
  HEADS,
  POSITION,
  SCALAR,
  Rule,
  parameter_of,
  register_family,
)


@dataclasses.dataclass(frozen=True)
class WavLMConfig(Wav2Vec2Config):
  """transformers' `WavLMConfig` fields that shape the encoder; defaults = WavLM base."""

  model_type = "wavlm"

  num_buckets: int = 320
  max_bucket_distance: int = 800

  def validate(self) -> None:
    super().validate()
    if self.adapter_attn_dim is not None:
      raise UserError("WavLM has no attention adapters; adapter_attn_dim must be None.")

  def to_dict(self):
    out = super().to_dict()
    out.pop("adapter_attn_dim")  # not a WavLMConfig field
    return out


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(length, length) bucket ids of key - query offsets, computed as transformers does (float32)."""
  context = np.arange(length, dtype=np.int64)[:, None]
  memory = np.arange(length, dtype=np.int64)[None, :]
  relative = memory - context
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  relative = np.abs(relative)
  max_exact = half // 2
  is_small = relative < max_exact
  with np.errstate(divide="ignore"):  # log(0) lands in the unused branch, as in torch
    large = np.log(relative.astype(np.float32) / np.float32(max_exact))
  large = large / np.float32(math.log(max_distance / max_exact))
  large = large * np.float32(half - max_exact)
  large = (np.float32(max_exact) + large)
  large = np.where(is_small, 0, large).astype(np.int64)  # float -> long truncates, like torch
  large = np.minimum(large, half - 1)
  return buckets + np.where(is_small, relative, large)


class WavLMAttention(nnx.Module):
  def __init__(self, config: WavLMConfig, *, has_relative_position_bias: bool,
               compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    dim, heads = config.hidden_size, config.num_attention_heads
    self.heads = heads
    self.num_buckets = config.num_buckets
    self.max_distance = config.max_bucket_distance
    self.implementation = compute.attention
    self.q_proj = nnx.Linear(dim, dim, rngs=rngs, **kw)
    self.k_proj = nnx.Linear(dim, dim, rngs=rngs, **kw)
    self.v_proj = nnx.Linear(dim, dim, rngs=rngs, **kw)
    self.out_proj = nnx.Linear(dim, dim, rngs=rngs, **kw)
    self.gru_rel_pos_const = nnx.Param(jnp.ones((1, heads, 1, 1), compute.param_dtype))
    self.gru_rel_pos_linear = nnx.Linear(dim // heads, 8, rngs=rngs, **kw)
    self.rel_attn_embed = (nnx.Embed(config.num_buckets, heads, rngs=rngs, **kw)
                           if has_relative_position_bias else None)

  def position_bias(self, length: int) -> jax.Array:
    """(heads, length, length) ungated bias; only the first layer has the embedding."""
    buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
    values = self.rel_attn_embed(jnp.asarray(buckets, jnp.int32))  # (q, k, heads)
    return jnp.transpose(values, (2, 0, 1))

  def __call__(self, hidden: jax.Array, mask: jax.Array | None,
               position_bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    batch, length, _ = hidden.shape
    if position_bias is None:
      position_bias = self.position_bias(length)
    split_heads = lambda x: x.reshape(batch, length, self.heads, -1)
    # The gate: per head and query, from this layer's input split into heads.
    projected = self.gru_rel_pos_linear(split_heads(hidden))          # (b, q, heads, 8)
    projected = projected.reshape(batch, length, self.heads, 2, 4).sum(-1)
    gate_a, gate_b = jnp.split(jax.nn.sigmoid(projected), 2, axis=-1)  # (b, q, heads, 1)
    const = self.gru_rel_pos_const[...].reshape(1, 1, self.heads, 1).astype(gate_b.dtype)
    gate = gate_a * (gate_b * const - 1.0) + 2.0
    gated_bias = jnp.transpose(gate, (0, 2, 1, 3)) * position_bias[None].astype(gate.dtype)

    query = split_heads(self.q_proj(hidden))
    key = split_heads(self.k_proj(hidden))
    value = split_heads(self.v_proj(hidden))
    out = dot_product_attention(query, key, value, mask=mask, bias=gated_bias.astype(query.dtype),
                                implementation=self.implementation)
    return self.out_proj(out.reshape(batch, length, -1)), position_bias


class WavLMEncoderLayer(nnx.Module):
  def __init__(self, config: WavLMConfig, *, has_relative_position_bias: bool,
               compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.stable = config.do_stable_layer_norm
    self.attention = WavLMAttention(config, has_relative_position_bias=has_relative_position_bias,
                                    compute=compute, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                    use_fast_variance=False, rngs=rngs, **kw)
    self.feed_forward = FeedForward(config, compute=compute, rngs=rngs)
    self.final_layer_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                          use_fast_variance=False, rngs=rngs, **kw)

  def __call__(self, hidden, mask, position_bias):
    if self.stable:
      attended, position_bias = self.attention(self.layer_norm(hidden), mask, position_bias)
      hidden = hidden + attended
      return hidden + self.feed_forward(self.final_layer_norm(hidden)), position_bias
    attended, position_bias = self.attention(hidden, mask, position_bias)
    hidden = self.layer_norm(hidden + attended)
    return self.final_layer_norm(hidden + self.feed_forward(hidden)), position_bias


class WavLMEncoder(Encoder):
  """wav2vec2's encoder with WavLM layers: the first computes the relative position bias that
  every later layer reuses."""

  def make_layers(self, config, compute: Compute, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([
        WavLMEncoderLayer(config, has_relative_position_bias=(i == 0), compute=compute, rngs=rngs)
        for i in range(config.num_hidden_layers)])

  def run_layers(self, hidden, mask):
    states, position_bias = [], None
    for layer in self.layers:
      hidden, position_bias = layer(hidden, mask, position_bias)
      states.append(hidden)
    return states


WAVLM_AXES = SPEECH_AXES + (
    Rule(parameter_of("attention", "gru_rel_pos_const"), 4, (SCALAR, HEADS, SCALAR, SCALAR)),
    Rule(parameter_of("rel_attn_embed", "embedding"), 2, (POSITION, HEADS)),
)


class WavLM(SpeechEncoderBase):
  """transformers' `WavLMModel` (inference: dropout, layer drop and random masking off)."""

  encoder_class = WavLMEncoder
  logical_family = register_family("wavlm", WAVLM_AXES)


