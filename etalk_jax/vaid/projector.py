"""The audio-lip projector of V-AID: a Perceiver that turns each frame's window of wav2vec2 hidden
states `A_w` into a lip latent `l_a` in PD-FGC's mouth-feature space (docs/ARCHITECTURE.md §3.3).

Per frame: the window x layers audio vectors, plus a learned position embedding over (window
position, layer), projected to `dim`, are the tokens. One learned query per frame runs through
`num_blocks` Perceiver blocks (pre-LayerNorm on the query and on the tokens, attention whose
keys / values are concat(query, tokens), feed-forward x4 with GELU, a residual after each); frames
are a batch axis, so a frame only ever attends to its own window. A linear layer maps the query to
`output_dim` = 512 = `l_a`.

Training: L1 pull of `l_a` to `l_v` (the lip encoder's output on the ground-truth frame) and, off
by default, a push that decorrelates `l_a` from the audio expression `e_a` of Di-CTE.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax import model_io
from etalk_jax.errors import UserError
from etalk_jax.layers.attention import Attention
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.logical_axes import COMMON, EMBED, POSITION, SCALAR, Rule, register_family
from etalk_jax.layers.norm import layer_norm

STANDARDISE_EPS = 1e-5  # keeps a constant feature's z-score finite (it becomes 0)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig(model_io.ModelConfig):
  """Sizes of the audio-lip projector; defaults = the full model of §3.3."""

  model_type = "vaid_projector"
  label = "V-AID projector"

  window: int = 5            # audio frames per video frame (A_w's axis 1)
  audio_layers: int = 12     # wav2vec2 hidden states kept (A_w's axis 2)
  audio_dim: int = 768       # wav2vec2 hidden size (A_w's axis 3)
  dim: int = 768             # Perceiver width
  num_blocks: int = 4
  num_heads: int = 8
  ff_mult: int = 4
  output_dim: int = 512      # = PD-FGC's lip feature l_v
  use_push: bool = False     # decorrelation from e_a: off until an ablation shows it helps
  push_weight: float = 0.1

  def __post_init__(self):
    if self.dim % self.num_heads:
      raise UserError(f"ProjectorConfig.dim={self.dim} must be a multiple of "
                      f"num_heads={self.num_heads}.")
    for name in ("window", "audio_layers", "audio_dim", "dim", "num_blocks", "num_heads",
                 "ff_mult", "output_dim"):
      if getattr(self, name) < 1:
        raise UserError(f"ProjectorConfig.{name}={getattr(self, name)} must be at least 1.")

  @property
  def tokens_per_frame(self) -> int:
    return self.window * self.audio_layers

  @classmethod
  def tiny(cls) -> "ProjectorConfig":
    """Tests: every part of the full model, at widths a CPU trains in seconds."""
    return cls(window=5, audio_layers=3, audio_dim=16, dim=32, num_blocks=2, num_heads=4,
               output_dim=16)



PROJECTOR_FULL = ProjectorConfig()
PROJECTOR_TINY = ProjectorConfig.tiny()


class GeluFeedForward(nnx.Module):
  """Linear to mult x dim, GELU, linear back (the projector's and Di-CTE's feed-forward)."""

  def __init__(self, dim: int, mult: int, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.proj_in = nnx.Linear(dim, dim * mult, rngs=rngs, **kw)
    self.proj_out = nnx.Linear(dim * mult, dim, rngs=rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=False))


class PerceiverBlock(nnx.Module):
  """query <- query + Attn(LN(query), concat(LN(query), LN(tokens)));
  query <- query + FF(LN(query))."""

  def __init__(self, config: ProjectorConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    dim = config.dim
    self.query_norm = layer_norm(dim, compute=compute, rngs=rngs)
    self.token_norm = layer_norm(dim, compute=compute, rngs=rngs)
    self.attention = Attention(dim, heads=config.num_heads, dim_head=dim // config.num_heads,
                               compute=compute, rngs=rngs)
    self.ff_norm = layer_norm(dim, compute=compute, rngs=rngs)
    self.ff = GeluFeedForward(dim, config.ff_mult, compute=compute, rngs=rngs)

  def __call__(self, query: jax.Array, tokens: jax.Array) -> jax.Array:
    """query: `(n, 1, dim)`; tokens: `(n, tokens_per_frame, dim)`, n = frames of all clips."""
    normed_query = self.query_norm(query)
    keys_values = jnp.concatenate([normed_query, self.token_norm(tokens)], axis=1)
    query = query + self.attention(normed_query, keys_values)
    return query + self.ff(self.ff_norm(query))


class AudioLipProjector(nnx.Module):
  """`A_w` of shape `(..., window, layers, audio_dim)` -> `l_a` of shape `(..., output_dim)`."""

  logical_family = register_family("projector", COMMON + (
      Rule("position_embedding", 3, (POSITION, SCALAR, EMBED)),  # (window, layers, dim)
      Rule("query", 3, (SCALAR, SCALAR, EMBED)),
  ))

  def __init__(self, config: ProjectorConfig = PROJECTOR_FULL, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.config = config
    self.compute = compute
    kw = compute.dense_kwargs()
    self.position_embedding = nnx.Param(0.02 * jax.random.normal(
        rngs.params(), (config.window, config.audio_layers, config.audio_dim),
        compute.param_dtype))
    self.token_proj = nnx.Linear(config.audio_dim, config.dim, rngs=rngs, **kw)
    self.query = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, config.dim),
                                                    compute.param_dtype))
    self.blocks = nnx.List([PerceiverBlock(config, compute=compute, rngs=rngs)
                            for _ in range(config.num_blocks)])
    # The pre-LN residual stream is never normalised inside a block: normalise once before the
    # output projection, as pre-LN transformers do.
    self.output_norm = layer_norm(config.dim, compute=compute, rngs=rngs)
    self.output_proj = nnx.Linear(config.dim, config.output_dim, rngs=rngs, **kw)

  def __call__(self, audio_windows: jax.Array) -> jax.Array:
    config = self.config
    expected = (config.window, config.audio_layers, config.audio_dim)
    if audio_windows.ndim < 3 or tuple(audio_windows.shape[-3:]) != expected:
      raise ValueError(f"the projector needs audio windows of shape (..., {expected[0]}, "
                       f"{expected[1]}, {expected[2]}) (window, layers, hidden); got "
                       f"{tuple(audio_windows.shape)}.")
    leading = audio_windows.shape[:-3]
    dtype = self.compute.dtype
    tokens = audio_windows.astype(dtype) + self.position_embedding[...].astype(dtype)
    tokens = self.token_proj(tokens.reshape(-1, config.tokens_per_frame, config.audio_dim))
    query = jnp.broadcast_to(self.query[...].astype(dtype), (tokens.shape[0], 1, config.dim))
    for block in self.blocks:
      query = block(query, tokens)
    lip = self.output_proj(self.output_norm(query[:, 0]))
    return lip.reshape(*leading, config.output_dim)


def pull_loss(lip_audio: jax.Array, lip_vision: jax.Array) -> jax.Array:
  """L1 between `l_a` and `l_v`, averaged over every element."""
  if lip_audio.shape != lip_vision.shape:
    raise ValueError(f"l_a {tuple(lip_audio.shape)} and l_v {tuple(lip_vision.shape)} must have "
                     "the same shape.")
  return jnp.mean(jnp.abs(lip_audio.astype(jnp.float32) - lip_vision.astype(jnp.float32)))


def standardise(features: jax.Array) -> jax.Array:
  """`(frames, dim)` -> each column at zero mean, unit (population) variance over the frames."""
  features = features.astype(jnp.float32)
  centred = features - features.mean(axis=0, keepdims=True)
  return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=0, keepdims=True)
                                 + STANDARDISE_EPS)


def push_loss(lip_audio: jax.Array, expression_audio: jax.Array) -> jax.Array:
  """Mean squared cross-correlation between the standardised `l_a` and `e_a` features over the
  frames of a batch: 0 when every lip feature is uncorrelated with every expression feature."""
  lip = lip_audio.reshape(-1, lip_audio.shape[-1])
  expression = expression_audio.reshape(-1, expression_audio.shape[-1])
  if lip.shape[0] != expression.shape[0]:
    raise ValueError(f"l_a has {lip.shape[0]} frames and e_a {expression.shape[0]}; the push "
                     "loss pairs them frame by frame.")
  if lip.shape[0] < 2:
    raise ValueError("the push loss needs at least 2 frames to standardise over.")
  correlation = standardise(lip).T @ standardise(expression) / lip.shape[0]
  return jnp.mean(jnp.square(correlation))


def projector_loss(config: ProjectorConfig, lip_audio: jax.Array, lip_vision: jax.Array,
                   expression_audio: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Pull, plus `push_weight` x push when `config.use_push`; returns (total, parts)."""
  parts = {"pull": pull_loss(lip_audio, lip_vision)}
  total = parts["pull"]
  if config.use_push:
    if expression_audio is None:
      raise ValueError("ProjectorConfig.use_push is on: pass e_a (Di-CTE's expression) too.")
    parts["push"] = push_loss(lip_audio, expression_audio)
    total = total + config.push_weight * parts["push"]
  return total, parts
