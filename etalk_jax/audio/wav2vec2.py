"""wav2vec2 in Flax NNX: all of transformers' `Wav2Vec2Model`, both variants.

- base (`feat_extract_norm="group"`, `do_stable_layer_norm=False`): GroupNorm on the first conv
  layer only, post-LayerNorm transformer, LayerNorm right after the positional convolution;
- large / lv60 (`feat_extract_norm="layer"`, `do_stable_layer_norm=True`): LayerNorm on every conv
  layer, pre-LayerNorm transformer, LayerNorm after the last layer.

Parameter names mirror transformers' module names (`feature_extractor.conv_layers.0.conv`,
`encoder.layers.3.attention.q_proj`, ...), so the converter in `audio/params.py` derives every
PyTorch key from our module tree. Channels-last throughout: audio is `(batch, samples)`, features
are `(batch, frames, channels)`.

`hidden_states` follows transformers 5 exactly: the input of the first transformer layer followed by
each layer's output. In the stable variant the last entry is the last layer's output *before* the
final LayerNorm (transformers 4 returned it after); `last_hidden_state` is after it.

The blocks here (feature encoder, projection, positional convolution, feed-forward, adapter) are
shared with `audio/wavlm.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax.errors import UserError
from etalk_jax.layers.attention import dot_product_attention
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.logical_axes import (
  COMMON,
  CONV_IN,
  CONV_OUT,
  CONV_W,
  EMBED,
  SCALAR,
  Rule,
  parameter_of,
  register_family,
)

TORCH_NORM_EPS = 1e-5  # torch.nn.LayerNorm / GroupNorm default, used where transformers gives none


# ----------------------------------------------------------------------------------------------
# Activations (transformers' ACT2FN names)
# ----------------------------------------------------------------------------------------------


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the erf form
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise UserError(f"activation {name!r} is not supported; use one of "
                    f"{', '.join(sorted(ACTIVATIONS))}.")
  return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
  """The fields of transformers' `Wav2Vec2Config` that shape the encoder; defaults = wav2vec2-base.

  Dropout, SpecAugment lengths, CTC, quantizer and head fields do not change the encoder's
  inference and are ignored by `from_dict`.
  """

  model_type: ClassVar[str] = "wav2vec2"

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  feat_extract_norm: str = "group"
  feat_extract_activation: str = "gelu"
  conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_bias: bool = False
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False
  # SpecAugment: only whether `masked_spec_embed` exists (and may be applied) matters here.
  apply_spec_augment: bool = True
  mask_time_prob: float = 0.05
  mask_feature_prob: float = 0.0
  # The optional output adapter (a strided conv stack) and MMS attention adapters.
  add_adapter: bool = False
  output_hidden_size: int | None = None
  num_adapter_layers: int = 3
  adapter_stride: int = 2
  adapter_kernel_size: int = 3
  adapter_attn_dim: int | None = None

  def __post_init__(self):
    for name in ("conv_dim", "conv_stride", "conv_kernel"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if self.output_hidden_size is None:
      object.__setattr__(self, "output_hidden_size", self.hidden_size)
    self.validate()

  def validate(self) -> None:
    problems = []
    if not (len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel)):
      problems.append(f"conv_dim, conv_stride and conv_kernel must have the same length (got "
                      f"{len(self.conv_dim)}, {len(self.conv_stride)}, {len(self.conv_kernel)})")
    if self.hidden_size % self.num_attention_heads:
      problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                      f"{self.num_attention_heads}")
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      problems.append(f"hidden_size {self.hidden_size} is not divisible by "
                      f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")
    if self.feat_extract_norm not in ("group", "layer"):
      problems.append(f"feat_extract_norm is {self.feat_extract_norm!r}; use 'group' or 'layer'")
    for name in ("hidden_act", "feat_extract_activation"):
      if getattr(self, name) not in ACTIVATIONS:
        problems.append(f"{name} {getattr(self, name)!r} is not supported (known: "
                        f"{', '.join(sorted(ACTIVATIONS))})")
    if problems:
      raise UserError(f"invalid {type(self).__name__}: " + "; ".join(problems) + ".")

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "Wav2Vec2Config":
    """From transformers' config.json contents; fields that do not shape the encoder are ignored."""
    model_type = config.get("model_type")
    if model_type is not None and model_type != cls.model_type:
      raise UserError(f"config.json says model_type {model_type!r}, but a {cls.model_type!r} "
                      f"config is needed; point to the {cls.model_type} model's folder.")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in config.items() if k in fields}
    layers = config.get("num_feat_extract_layers")
    conv_dim = values.get("conv_dim", cls.conv_dim)
    if layers is not None and layers != len(conv_dim):
      raise UserError(f"config.json has num_feat_extract_layers={layers} but {len(conv_dim)} "
                      "conv_dim entries; fix one of them.")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    """transformers-compatible config.json contents (loadable by `<Model>Config(**d)`)."""
    out = {"model_type": self.model_type}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    out["num_feat_extract_layers"] = len(self.conv_dim)
    return out

  @property
  def has_masked_spec_embed(self) -> bool:
    return self.mask_time_prob > 0.0 or self.mask_feature_prob > 0.0

  def feature_lengths(self, sample_lengths, add_adapter: bool = False):
    """transformers' `_get_feat_extract_output_lengths`: conv frames for each sample count."""
    lengths = sample_lengths
    for kernel, stride in zip(self.conv_kernel, self.conv_stride):
      lengths = (lengths - kernel) // stride + 1
    if add_adapter and self.add_adapter:
      for _ in range(self.num_adapter_layers):
        lengths = (lengths - 1) // self.adapter_stride + 1
    return lengths


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


class AudioEncoderOutput(NamedTuple):
  last_hidden_state: jax.Array   # (batch, frames', output_hidden_size), after adapter if any
  extract_features: jax.Array    # (batch, frames, conv_dim[-1]): feature projection's LayerNorm
  hidden_states: tuple           # num_hidden_layers + 1 arrays of (batch, frames, hidden_size)


# ----------------------------------------------------------------------------------------------
# Feature encoder
# ----------------------------------------------------------------------------------------------


def _conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, stride: int = 1,
            padding: tuple[int, int] = (0, 0), groups: int = 1) -> jax.Array:
  """1-D convolution on (batch, length, channels) with a (k, in/groups, out) kernel."""
  out = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(stride,), padding=(padding,),
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
      precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    out = out + bias.astype(x.dtype)
  return out


class FeatureConvLayer(nnx.Module):
  """One conv layer of the feature encoder: conv, optional norm, activation.

  norm: None, "group" (GroupNorm with one group per channel: each channel normalised over time,
  the base variant's first layer) or "layer" (LayerNorm over channels at each step).
  """

  def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int, *,
               use_bias: bool, norm: str | None, act: str, compute: Compute = FP32,
               rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.kernel_size, self.stride = kernel_size, stride
    self.act = act
    self.conv = nnx.Conv(in_dim, out_dim, kernel_size=(kernel_size,), strides=(stride,),
                         padding="VALID", use_bias=use_bias, rngs=rngs,
                         precision=jax.lax.Precision.HIGHEST, **kw)
    if norm == "group":
      self.layer_norm = nnx.GroupNorm(out_dim, num_groups=out_dim, epsilon=TORCH_NORM_EPS,
                                      use_fast_variance=False, rngs=rngs, **kw)
    elif norm == "layer":
      self.layer_norm = nnx.LayerNorm(out_dim, epsilon=TORCH_NORM_EPS, use_fast_variance=False,
                                      rngs=rngs, **kw)
    else:
      self.layer_norm = None

  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """x: (batch, length, in). valid: optional (batch, frames) bool of this layer's output frames
    whose statistics a GroupNorm may use (padding excluded); None = all, as transformers does."""
    x = self.conv(x)
    if isinstance(self.layer_norm, nnx.GroupNorm):
      mask = None if valid is None else jnp.broadcast_to(valid[..., None], x.shape)
      x = self.layer_norm(x, mask=mask)
    elif self.layer_norm is not None:
      x = self.layer_norm(x)
    return activation(self.act)(x)


class FeatureEncoder(nnx.Module):
  """The strided conv stack: raw audio (batch, samples) -> (batch, frames, conv_dim[-1])."""

  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.config = config
    layers = []
    for i, (dim, kernel, stride) in enumerate(zip(config.conv_dim, config.conv_kernel,
                                                   config.conv_stride)):
      in_dim = config.conv_dim[i - 1] if i else 1
      if config.feat_extract_norm == "layer":
        norm = "layer"
      else:
        norm = "group" if i == 0 else None
      layers.append(FeatureConvLayer(in_dim, dim, kernel, stride, use_bias=config.conv_bias,
                                     norm=norm, act=config.feat_extract_activation,
                                     compute=compute, rngs=rngs))
    self.conv_layers = nnx.List(layers)

  def __call__(self, input_values: jax.Array, sample_lengths: jax.Array | None = None
               ) -> jax.Array:
    """sample_lengths: (batch,) valid samples per row. When given, the GroupNorm statistics skip
    the padding, so a padded row gives the same features as the unpadded one (transformers
    normalises over the padding too; pass None to match it)."""
    x = input_values[..., None]
    lengths = sample_lengths
    for layer in self.conv_layers:
      valid = None
      if lengths is not None:
        lengths = (lengths - layer.kernel_size) // layer.stride + 1
        frames = (x.shape[1] - layer.kernel_size) // layer.stride + 1
        valid = jnp.arange(frames)[None, :] < lengths[:, None]
      x = layer(x, valid)
    return x


class FeatureProjection(nnx.Module):
  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.layer_norm = nnx.LayerNorm(config.conv_dim[-1], epsilon=config.layer_norm_eps,
                                    use_fast_variance=False, rngs=rngs, **kw)
    self.projection = nnx.Linear(config.conv_dim[-1], config.hidden_size, rngs=rngs, **kw)

  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    normed = self.layer_norm(features)
    return self.projection(normed), normed


# ----------------------------------------------------------------------------------------------
# Transformer encoder
# ----------------------------------------------------------------------------------------------


class WeightNormConv1d(nnx.Module):
  """A Conv1d under `weight_norm(dim=2)`: weight = g * v / ||v||, the norm taken per kernel tap.

  Stored as PyTorch stores it (g and v, our layout (k, in/groups, out) for v and (k, 1, 1) for g),
  so export gives the same tensors back and the parametrisation stays trainable.
  """

  def __init__(self, channels: int, kernel_size: int, groups: int, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    pdt = compute.param_dtype
    self.groups = groups
    self.kernel_size = kernel_size
    self.compute_dtype = compute.dtype
    fan_in = kernel_size * channels // groups
    v = jax.random.normal(rngs.params(), (kernel_size, channels // groups, channels), pdt)
    v = v * (2.0 * math.sqrt(1.0 / fan_in))  # transformers' init std for this conv
    self.weight_v = nnx.Param(v)
    self.weight_g = nnx.Param(jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True)))
    self.bias = nnx.Param(jnp.zeros((channels,), pdt))

  def weight(self) -> jax.Array:
    v = self.weight_v[...].astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True))
    return self.weight_g[...].astype(jnp.float32) * v / norm

  def __call__(self, x: jax.Array) -> jax.Array:
    # torch pads k//2 on both sides; for an even kernel transformers then drops the last step.
    left = self.kernel_size // 2
    right = left - 1 if self.kernel_size % 2 == 0 else left
    return _conv1d(x.astype(self.compute_dtype), self.weight(), self.bias[...],
                   padding=(left, right), groups=self.groups)


class PositionalConvEmbedding(nnx.Module):
  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.act = config.feat_extract_activation
    self.conv = WeightNormConv1d(config.hidden_size, config.num_conv_pos_embeddings,
                                 config.num_conv_pos_embedding_groups, compute=compute, rngs=rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return activation(self.act)(self.conv(hidden))


class SelfAttention(nnx.Module):
  """Multi-head self-attention with transformers' names (q_proj, k_proj, v_proj, out_proj)."""

  def __init__(self, dim: int, heads: int, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.heads = heads
    self.implementation = compute.attention
    self.q_proj = nnx.Linear(dim, dim, rngs=rngs, **kw)
    self.k_proj = nnx.Linear(dim, dim, rngs=rngs, **kw)
    self.v_proj = nnx.Linear(dim, dim, rngs=rngs, **kw)
    self.out_proj = nnx.Linear(dim, dim, rngs=rngs, **kw)

  def split_heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.heads, -1)

  def __call__(self, hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    query = self.split_heads(self.q_proj(hidden))
    key = self.split_heads(self.k_proj(hidden))
    value = self.split_heads(self.v_proj(hidden))
    out = dot_product_attention(query, key, value, mask=mask, implementation=self.implementation)
    return self.out_proj(out.reshape(*out.shape[:-2], -1))


class FeedForward(nnx.Module):
  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.act = config.hidden_act
    self.intermediate_dense = nnx.Linear(config.hidden_size, config.intermediate_size,
                                         rngs=rngs, **kw)
    self.output_dense = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs, **kw)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return self.output_dense(activation(self.act)(self.intermediate_dense(hidden)))


class AttnAdapterLayer(nnx.Module):
  """MMS's per-layer bottleneck adapter (only in the stable variant, when adapter_attn_dim set)."""

  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.norm = nnx.LayerNorm(config.hidden_size, epsilon=TORCH_NORM_EPS,
                              use_fast_variance=False, rngs=rngs, **kw)
    self.linear_1 = nnx.Linear(config.hidden_size, config.adapter_attn_dim, rngs=rngs, **kw)
    self.linear_2 = nnx.Linear(config.adapter_attn_dim, config.hidden_size, rngs=rngs, **kw)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.relu(self.linear_1(self.norm(hidden))))


class EncoderLayer(nnx.Module):
  """One transformer layer; post-LayerNorm (base) or pre-LayerNorm (`do_stable_layer_norm`)."""

  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.stable = config.do_stable_layer_norm
    self.attention = SelfAttention(config.hidden_size, config.num_attention_heads,
                                   compute=compute, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                    use_fast_variance=False, rngs=rngs, **kw)
    self.feed_forward = FeedForward(config, compute=compute, rngs=rngs)
    self.final_layer_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                          use_fast_variance=False, rngs=rngs, **kw)
    self.adapter_layer = (AttnAdapterLayer(config, compute=compute, rngs=rngs)
                          if self.stable and config.adapter_attn_dim is not None else None)

  def __call__(self, hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if self.stable:
      hidden = hidden + self.attention(self.layer_norm(hidden), mask)
      hidden = hidden + self.feed_forward(self.final_layer_norm(hidden))
      if self.adapter_layer is not None:
        hidden = hidden + self.adapter_layer(hidden)
      return hidden
    hidden = self.layer_norm(hidden + self.attention(hidden, mask))
    return self.final_layer_norm(hidden + self.feed_forward(hidden))


def key_mask(frame_mask: jax.Array | None) -> jax.Array | None:
  """(batch, frames) bool -> (batch, 1, 1, frames): every query may attend to the valid keys."""
  return None if frame_mask is None else frame_mask[:, None, None, :]


class Encoder(nnx.Module):
  """Positional conv, LayerNorm (before the layers, or after them in the stable variant), layers.

  WavLM's encoder differs only in its layers (`make_layers` / `run_layers`).
  """

  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.stable = config.do_stable_layer_norm
    self.pos_conv_embed = PositionalConvEmbedding(config, compute=compute, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                                    use_fast_variance=False, rngs=rngs, **kw)
    self.layers = self.make_layers(config, compute, rngs)

  def make_layers(self, config, compute: Compute, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([EncoderLayer(config, compute=compute, rngs=rngs)
                     for _ in range(config.num_hidden_layers)])

  def run_layers(self, hidden: jax.Array, mask) -> list[jax.Array]:
    """Every layer's output, in order."""
    states = []
    for layer in self.layers:
      hidden = layer(hidden, mask)
      states.append(hidden)
    return states

  def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None = None
               ) -> tuple[jax.Array, tuple]:
    """Returns (last_hidden_state, hidden_states)."""
    if frame_mask is not None:
      hidden = jnp.where(frame_mask[..., None], hidden, 0)  # padded frames read as silence
    hidden = hidden + self.pos_conv_embed(hidden)
    if not self.stable:
      hidden = self.layer_norm(hidden)
    states = [hidden] + self.run_layers(hidden, key_mask(frame_mask))
    hidden = states[-1]
    if self.stable:
      hidden = self.layer_norm(hidden)
    return hidden, tuple(states)


class AdapterLayer(nnx.Module):
  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    dim = config.output_hidden_size
    self.conv = nnx.Conv(dim, 2 * dim, kernel_size=(config.adapter_kernel_size,),
                         strides=(config.adapter_stride,), padding=[(1, 1)], rngs=rngs,
                         precision=jax.lax.Precision.HIGHEST, **compute.dense_kwargs())

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return jax.nn.glu(self.conv(hidden), axis=-1)


class Adapter(nnx.Module):
  """The optional strided conv adapter after the encoder (`add_adapter`)."""

  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    if config.output_hidden_size != config.hidden_size:
      self.proj = nnx.Linear(config.hidden_size, config.output_hidden_size, rngs=rngs, **kw)
      self.proj_layer_norm = nnx.LayerNorm(config.output_hidden_size, epsilon=TORCH_NORM_EPS,
                                           use_fast_variance=False, rngs=rngs, **kw)
    else:
      self.proj = self.proj_layer_norm = None
    self.layers = nnx.List([AdapterLayer(config, compute=compute, rngs=rngs)
                            for _ in range(config.num_adapter_layers)])

  def __call__(self, hidden: jax.Array) -> jax.Array:
    if self.proj is not None:
      hidden = self.proj_layer_norm(self.proj(hidden))
    for layer in self.layers:
      hidden = layer(hidden)
    return hidden


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def frame_mask_from_lengths(lengths: jax.Array, frames: int) -> jax.Array:
  return jnp.arange(frames)[None, :] < lengths[:, None]


class SpeechEncoderBase(nnx.Module):
  """What wav2vec2 and WavLM share around their transformer: features, projection, masking.

  Subclasses name their transformer stack in `encoder_class`: called as
  `encoder(hidden, frame_mask) -> (last_hidden_state, hidden_states)`.
  """

  encoder_class: type

  def __init__(self, config: Wav2Vec2Config, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.config = config
    self.feature_extractor = FeatureEncoder(config, compute=compute, rngs=rngs)
    self.feature_projection = FeatureProjection(config, compute=compute, rngs=rngs)
    self.masked_spec_embed = (
        nnx.Param(jax.random.uniform(rngs.params(), (config.hidden_size,), compute.param_dtype))
        if config.has_masked_spec_embed else None)
    self.adapter = Adapter(config, compute=compute, rngs=rngs) if config.add_adapter else None
    self.encoder = self.encoder_class(config, compute=compute, rngs=rngs)

  def __call__(self, input_values: jax.Array, attention_mask: jax.Array | None = None,
               mask_time_indices: jax.Array | None = None) -> AudioEncoderOutput:
    """Like transformers' `forward`: input_values (batch, samples), attention_mask (batch, samples)
    with 1 for real samples (reduced to frames as transformers does), mask_time_indices
    (batch, frames) bool to replace frames by `masked_spec_embed`."""
    features = self.feature_extractor(input_values)
    frame_mask = None
    if attention_mask is not None:
      lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
      frame_mask = frame_mask_from_lengths(self.config.feature_lengths(lengths),
                                           features.shape[1])
    return self.project_and_encode(features, frame_mask, mask_time_indices)

  def project_and_encode(self, features: jax.Array, frame_mask: jax.Array | None = None,
                         mask_time_indices: jax.Array | None = None) -> AudioEncoderOutput:
    """From conv features (batch, frames, conv_dim[-1]) on: projection, transformer, adapter."""
    hidden, extract_features = self.feature_projection(features)
    if mask_time_indices is not None:
      if self.masked_spec_embed is None:
        raise ValueError("mask_time_indices given, but this config has no masked_spec_embed "
                         "(mask_time_prob and mask_feature_prob are 0).")
      if self.config.apply_spec_augment:
        embed = self.masked_spec_embed[...].astype(hidden.dtype)
        hidden = jnp.where(mask_time_indices[..., None], embed, hidden)
    last, states = self.encoder(hidden, frame_mask)
    if self.adapter is not None:
      last = self.adapter(last)
    return AudioEncoderOutput(last, extract_features, states)


# Logical-axis table of the speech encoders (wav2vec2, and WavLM's with its own extras).
SPEECH_AXES = COMMON + (
    Rule("masked_spec_embed", 1, (EMBED,)),
    # Weight-normed grouped positional conv: v (taps, in per group, out), g one norm per tap.
    Rule(parameter_of("conv", "weight_v"), 3, (CONV_W, CONV_IN, CONV_OUT)),
    Rule(parameter_of("conv", "weight_g"), 3, (CONV_W, SCALAR, SCALAR)),
)


class Wav2Vec2(SpeechEncoderBase):
  """transformers' `Wav2Vec2Model` (inference: dropout, layer drop and random masking off)."""

  encoder_class = Encoder
  logical_family = register_family("wav2vec2", SPEECH_AXES)
