"""Di-CTE: the diffusion model that turns speech into a sequence of 30-d expression latents `e_a`
in the expression encoder's space (docs/ARCHITECTURE.md §3.4).

A transformer denoiser over the frames of a window. Token of frame i = Linear(noisy e_i)
+ Linear(mean over window and layers of A_w[i]) + IdentityEncoder(x_ref) + position_i. Every
block is a DiT block with AdaLN-zero modulation by SiLU(time embedding ⊕ condition embedding);
the condition is a 30-d expression vector: `e_cond` for utterance sources or `ExpEncoder(x_ref)`
("uncond."). The model predicts x0; the noise follows the cosine schedule over 1000 steps and
sampling is deterministic DDIM (eta = 0, 25 steps by default).

Training windows are 220 frames; with probability 0.8 the first 20 frames are the clean ground
truth and carry no loss. Generation of any length runs window after window, each new window
holding the last 20 generated frames clean. One jitted function holds a window's whole
denoising loop (`lax.fori_loop`); every window has the same shapes and passes its prefix, its
prefix mask and its noise as arrays, so a clip of any length compiles it once.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etalk_jax import model_io
from etalk_jax.errors import UserError
from etalk_jax.layers.attention import Attention
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.embeddings import TimestepEmbedding, timestep_features
from etalk_jax.layers.logical_axes import COMMON, EMBED, POSITION, Rule, register_family
from etalk_jax.vaid.projector import GeluFeedForward


@dataclasses.dataclass(frozen=True)
class DiCTEConfig(model_io.ModelConfig):
  """Sizes, schedule and windowing of Di-CTE; defaults = the full model of §3.4."""

  model_type = "vaid_dicte"
  label = "V-AID Di-CTE"

  expression_dim: int = 30             # e (PD-FGC's expression embedding)
  condition_dim: int = 30              # e_cond or ExpEncoder(x_ref)
  window: int = 5                      # A_w's axes: window, layers, hidden
  audio_layers: int = 12
  audio_dim: int = 768
  dim: int = 512
  num_blocks: int = 8
  num_heads: int = 8
  ff_mult: int = 4
  timestep_features: int = 256         # sinusoidal features before the time MLP
  image_channels: int = 3
  identity_channels: tuple[int, ...] = (32, 64, 128, 256)  # stride-2 convs of the x_ref encoder
  window_frames: int = 220             # frames per training / generation window
  prefix_frames: int = 20              # clean frames carried from one window to the next
  prefix_probability: float = 0.8      # training: how often a window gets its clean prefix
  train_steps: int = 1000
  sample_steps: int = 25
  cosine_offset: float = 0.008         # s of the cosine schedule (Nichol & Dhariwal)
  max_beta: float = 0.999

  def __post_init__(self):
    object.__setattr__(self, "identity_channels", tuple(self.identity_channels))
    if self.dim % self.num_heads:
      raise UserError(f"DiCTEConfig.dim={self.dim} must be a multiple of "
                      f"num_heads={self.num_heads}.")
    if not 0 <= self.prefix_frames < self.window_frames:
      raise UserError(f"DiCTEConfig.prefix_frames={self.prefix_frames} must be at least 0 and "
                      f"less than window_frames={self.window_frames}.")
    if not 0.0 <= self.prefix_probability <= 1.0:
      raise UserError(f"DiCTEConfig.prefix_probability={self.prefix_probability} must lie in "
                      "[0, 1].")
    if not 1 <= self.sample_steps <= self.train_steps:
      raise UserError(f"DiCTEConfig.sample_steps={self.sample_steps} must lie in "
                      f"[1, train_steps={self.train_steps}].")
    if not self.identity_channels:
      raise UserError("DiCTEConfig.identity_channels needs at least one conv width.")

  @classmethod
  def tiny(cls) -> "DiCTEConfig":
    """Tests: short windows (12 frames, 4 held clean) so that 3 windows cover 30 frames."""
    return cls(window=5, audio_layers=3, audio_dim=16, dim=32, num_blocks=2, num_heads=4,
               timestep_features=16, identity_channels=(4, 8), window_frames=12,
               prefix_frames=4, sample_steps=5)



DICTE_FULL = DiCTEConfig()
DICTE_TINY = DiCTEConfig.tiny()


# ---------------------------------------------------------------------------------- schedule


def cosine_alpha_bars(train_steps: int, offset: float = 0.008,
                      max_beta: float = 0.999) -> np.ndarray:
  """ᾱ_t for t = 0 .. train_steps - 1 of the cosine schedule, float64, as diffusers'
  `squaredcos_cap_v2` builds it (betas from ratios of cos², capped at max_beta)."""
  def f(t):
    return math.cos((t / train_steps + offset) / (1 + offset) * math.pi / 2) ** 2
  betas = np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(train_steps)])
  return np.cumprod(1.0 - betas)


def sampling_timesteps(train_steps: int, sample_steps: int) -> np.ndarray:
  """DDIM's "trailing" spacing: from train_steps - 1 down, so the first step sees pure noise
  (int64, descending)."""
  return (np.round(np.arange(train_steps, 0, -train_steps / sample_steps)) - 1).astype(np.int64)


def sampling_schedule(config: DiCTEConfig, sample_steps: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(timesteps, ᾱ_t, ᾱ_prev) of each DDIM step, float32; the last step goes to ᾱ = 1, so the
  loop ends on the model's x0."""
  alpha_bars = cosine_alpha_bars(config.train_steps, config.cosine_offset, config.max_beta)
  timesteps = sampling_timesteps(config.train_steps, sample_steps or config.sample_steps)
  alpha_bar = alpha_bars[timesteps]
  alpha_bar_prev = np.append(alpha_bar[1:], 1.0)
  return (timesteps.astype(np.int32), alpha_bar.astype(np.float32),
          alpha_bar_prev.astype(np.float32))


def ddim_step(noisy: jax.Array, predicted_x0: jax.Array, alpha_bar: jax.Array,
              alpha_bar_prev: jax.Array) -> jax.Array:
  """One deterministic DDIM step (eta = 0) from x_t to x_prev given the model's x0:
  ε̂ = (x_t - √ᾱ_t x̂0) / √(1 - ᾱ_t);  x_prev = √ᾱ_prev x̂0 + √(1 - ᾱ_prev) ε̂."""
  predicted_noise = (noisy - jnp.sqrt(alpha_bar) * predicted_x0) / jnp.sqrt(1.0 - alpha_bar)
  return jnp.sqrt(alpha_bar_prev) * predicted_x0 + jnp.sqrt(1.0 - alpha_bar_prev) * predicted_noise


# ------------------------------------------------------------------------------------- model


def _plain_layer_norm(dim: int, compute: Compute, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm without scale and bias: AdaLN supplies both."""
  return nnx.LayerNorm(dim, epsilon=1e-6, use_scale=False, use_bias=False,
                       use_fast_variance=False, rngs=rngs, **compute.dense_kwargs())


def _zero_linear(in_features: int, out_features: int, compute: Compute,
                 rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, kernel_init=nnx.initializers.zeros_init(),
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs,
                    **compute.dense_kwargs())


class IdentityEncoder(nnx.Module):
  """x_ref `(batch, h, w, channels)` -> `(batch, dim)`: stride-2 3x3 convs with SiLU, a mean over
  the image, a linear layer. Any image size."""

  def __init__(self, config: DiCTEConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    widths = (config.image_channels,) + config.identity_channels
    kw = compute.dense_kwargs()
    self.convs = nnx.List([nnx.Conv(c_in, c_out, (3, 3), strides=2, padding=1, rngs=rngs, **kw)
                           for c_in, c_out in zip(widths[:-1], widths[1:])])
    self.proj = nnx.Linear(widths[-1], config.dim, rngs=rngs, **kw)

  def __call__(self, image: jax.Array) -> jax.Array:
    x = image
    for conv in self.convs:
      x = nnx.silu(conv(x))
    return self.proj(x.mean(axis=(1, 2)))


class DiTBlock(nnx.Module):
  """x += gate1 · Attn(LN(x)(1 + scale1) + shift1); x += gate2 · FF(LN(x)(1 + scale2) + shift2),
  with the six modulations a zero-initialised linear map of the conditioning: the identity at
  initialisation (AdaLN-zero)."""

  def __init__(self, config: DiCTEConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    dim = config.dim
    self.attention_norm = _plain_layer_norm(dim, compute, rngs)
    self.attention = Attention(dim, heads=config.num_heads, dim_head=dim // config.num_heads,
                               qkv_bias=True, compute=compute, rngs=rngs)
    self.ff_norm = _plain_layer_norm(dim, compute, rngs)
    self.ff = GeluFeedForward(dim, config.ff_mult, compute=compute, rngs=rngs)
    self.modulation = _zero_linear(2 * dim, 6 * dim, compute, rngs)

  def __call__(self, x: jax.Array, conditioning: jax.Array) -> jax.Array:
    """x: `(batch, frames, dim)`; conditioning: SiLU(time ⊕ condition), `(batch, 2 dim)`."""
    (attention_shift, attention_scale, attention_gate, ff_shift, ff_scale,
     ff_gate) = jnp.split(self.modulation(conditioning)[:, None], 6, axis=-1)
    h = self.attention_norm(x) * (1 + attention_scale) + attention_shift
    x = x + attention_gate * self.attention(h)
    h = self.ff_norm(x) * (1 + ff_scale) + ff_shift
    return x + ff_gate * self.ff(h)


class DiCTE(nnx.Module):
  """The x0-predicting denoiser. `__call__` = `denoise(noisy, timesteps, context(audio, x_ref),
  condition)`; samplers compute the context once per window."""

  logical_family = register_family("dicte", COMMON + (
      Rule("position_embedding", 2, (POSITION, EMBED)),
  ))

  def __init__(self, config: DiCTEConfig = DICTE_FULL, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.config = config
    self.compute = compute
    dim, kw = config.dim, compute.dense_kwargs()
    self.expression_proj = nnx.Linear(config.expression_dim, dim, rngs=rngs, **kw)
    self.audio_proj = nnx.Linear(config.audio_dim, dim, rngs=rngs, **kw)
    self.identity = IdentityEncoder(config, compute=compute, rngs=rngs)
    self.position_embedding = nnx.Param(0.02 * jax.random.normal(
        rngs.params(), (config.window_frames, dim), compute.param_dtype))
    self.time_embedding = TimestepEmbedding(config.timestep_features, dim, compute=compute,
                                            rngs=rngs)
    # The same linear-SiLU-linear MLP as the time embedding, on the 30-d condition.
    self.condition_embedding = TimestepEmbedding(config.condition_dim, dim, compute=compute,
                                                 rngs=rngs)
    self.blocks = nnx.List([DiTBlock(config, compute=compute, rngs=rngs)
                            for _ in range(config.num_blocks)])
    self.output_norm = _plain_layer_norm(dim, compute, rngs)
    self.output_modulation = _zero_linear(2 * dim, 2 * dim, compute, rngs)
    self.output_proj = nnx.Linear(dim, config.expression_dim, rngs=rngs, **kw)

  def context(self, audio_windows: jax.Array, reference_image: jax.Array) -> jax.Array:
    """Everything of a frame's token but the noisy expression: `(batch, frames, dim)`.

    audio_windows: `A_w` per clip, `(batch, frames, window, layers, audio_dim)`;
    reference_image: x_ref, `(batch, h, w, image_channels)`.
    """
    config = self.config
    expected = (config.window, config.audio_layers, config.audio_dim)
    if audio_windows.ndim != 5 or tuple(audio_windows.shape[2:]) != expected:
      raise ValueError(f"Di-CTE needs audio windows of shape (batch, frames, {expected[0]}, "
                       f"{expected[1]}, {expected[2]}); got {tuple(audio_windows.shape)}.")
    frames = audio_windows.shape[1]
    if frames > config.window_frames:
      raise ValueError(f"Di-CTE denoises at most window_frames={config.window_frames} frames at "
                       f"once; got {frames}. Use generate_expressions for longer clips.")
    if reference_image.ndim != 4 or reference_image.shape[-1] != config.image_channels:
      raise ValueError(f"x_ref must be (batch, h, w, {config.image_channels}); got "
                       f"{tuple(reference_image.shape)}.")
    dtype = self.compute.dtype
    audio = self.audio_proj(audio_windows.astype(dtype).mean(axis=(2, 3)))
    identity = self.identity(reference_image.astype(dtype))[:, None]
    return audio + identity + self.position_embedding[...][:frames].astype(dtype)

  def conditioning(self, timesteps: jax.Array, condition: jax.Array) -> jax.Array:
    """SiLU(time embedding ⊕ condition embedding): `(batch, 2 dim)`."""
    batch = condition.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    time = self.time_embedding(
        timestep_features(timesteps, self.config.timestep_features).astype(self.compute.dtype))
    return nnx.silu(jnp.concatenate(
        [time, self.condition_embedding(condition.astype(self.compute.dtype))], axis=-1))

  def denoise(self, noisy_expression: jax.Array, timesteps: jax.Array, context: jax.Array,
              condition: jax.Array) -> jax.Array:
    """noisy e `(batch, frames, expression_dim)`, t `(batch,)` or scalar, the context, the
    condition `(batch, condition_dim)` -> predicted clean e, same shape as the noisy one."""
    if noisy_expression.shape[:2] != context.shape[:2]:
      raise ValueError(f"noisy expressions {tuple(noisy_expression.shape)} and the context "
                       f"{tuple(context.shape)} must agree on (batch, frames).")
    conditioning = self.conditioning(timesteps, condition)
    x = self.expression_proj(noisy_expression.astype(self.compute.dtype)) + context
    for block in self.blocks:
      x = block(x, conditioning)
    shift, scale = jnp.split(self.output_modulation(conditioning)[:, None], 2, axis=-1)
    return self.output_proj(self.output_norm(x) * (1 + scale) + shift)

  def __call__(self, noisy_expression: jax.Array, timesteps: jax.Array,
               audio_windows: jax.Array, reference_image: jax.Array,
               condition: jax.Array) -> jax.Array:
    return self.denoise(noisy_expression, timesteps,
                        self.context(audio_windows, reference_image), condition)


# ---------------------------------------------------------------------------------- training


def training_inputs(key: jax.Array, expression: jax.Array, config: DiCTEConfig
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Noises a batch of clean windows `(batch, frames, expression_dim)`.

  Returns (noisy, timesteps `(batch,)`, loss_mask `(batch, frames)`): t uniform over the training
  steps; for each window with probability `prefix_probability`, its first `prefix_frames`
  frames are left clean and get loss weight 0.
  """
  batch, frames = expression.shape[:2]
  time_key, noise_key, prefix_key = jax.random.split(key, 3)
  alpha_bars = jnp.asarray(cosine_alpha_bars(config.train_steps, config.cosine_offset,
                                             config.max_beta), jnp.float32)
  timesteps = jax.random.randint(time_key, (batch,), 0, config.train_steps)
  alpha_bar = alpha_bars[timesteps][:, None, None]
  clean = expression.astype(jnp.float32)
  noisy = (jnp.sqrt(alpha_bar) * clean
           + jnp.sqrt(1.0 - alpha_bar) * jax.random.normal(noise_key, clean.shape))
  has_prefix = jax.random.bernoulli(prefix_key, config.prefix_probability, (batch,))
  held_clean = has_prefix[:, None] & (jnp.arange(frames) < config.prefix_frames)[None]
  noisy = jnp.where(held_clean[..., None], clean, noisy)
  return noisy, timesteps, (~held_clean).astype(jnp.float32)


def masked_x0_loss(predicted: jax.Array, target: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean squared error over the frames whose mask is 1 (and every channel of them)."""
  error = jnp.square(predicted.astype(jnp.float32) - target.astype(jnp.float32))
  weight = loss_mask.astype(jnp.float32)[..., None]
  return jnp.sum(weight * error) / jnp.maximum(jnp.sum(weight) * error.shape[-1], 1.0)


def dicte_loss(model: DiCTE, key: jax.Array, expression: jax.Array, audio_windows: jax.Array,
               reference_image: jax.Array, condition: jax.Array, *,
               with_prediction: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The x0 loss of one training batch (ground-truth e `(batch, frames, expression_dim)`); with
  `with_prediction`, (loss, the predicted x0 e_a), which the V-AID stage's push term reads."""
  noisy, timesteps, loss_mask = training_inputs(key, expression, model.config)
  predicted = model(noisy, timesteps, audio_windows, reference_image, condition)
  loss = masked_x0_loss(predicted, expression, loss_mask)
  return (loss, predicted) if with_prediction else loss


# -------------------------------------------------------------------------------- generation


def _denoise_window(graphdef, state, noise, prefix, prefix_mask, audio_windows, reference_image,
                    condition, timesteps, alpha_bar, alpha_bar_prev):
  """Every DDIM step of one window; frames where `prefix_mask` is True stay `prefix`."""
  model = nnx.merge(graphdef, state)
  context = model.context(audio_windows, reference_image)

  def step(i, x):
    x = jnp.where(prefix_mask, prefix, x)
    predicted = model.denoise(x, timesteps[i], context, condition)
    predicted = jnp.where(prefix_mask, prefix, predicted)
    return ddim_step(x, predicted, alpha_bar[i], alpha_bar_prev[i])

  out = jax.lax.fori_loop(0, timesteps.shape[0], step, noise.astype(jnp.float32))
  return jnp.where(prefix_mask, prefix, out)


# The graphdef compares by value: the same model structure reuses the compiled loop.
denoise_window = jax.jit(_denoise_window, static_argnums=0)


def window_count(num_frames: int, config: DiCTEConfig) -> int:
  """Windows that cover `num_frames`: the first gives window_frames new frames, every later one
  window_frames - prefix_frames."""
  if num_frames < 1:
    raise ValueError(f"cannot generate {num_frames} frames.")
  stride = config.window_frames - config.prefix_frames
  return 1 + max(0, -(-(num_frames - config.window_frames) // stride))


def generate_expressions(model: DiCTE, key: jax.Array, audio_windows: jax.Array,
                         reference_image: jax.Array, condition: jax.Array, *,
                         sample_steps: int | None = None) -> jax.Array:
  """Expression latents `(batch, frames, expression_dim)` for audio of any length.

  Windows of `window_frames` frames, each starting from the last `prefix_frames` generated ones
  held clean. The audio is padded at its end up to a whole number of windows by reflecting it
  (those frames are generated and dropped), so every window runs the same executable; reflected
  speech keeps the last window like the training windows, where repeating the last frame gave
  a constant tail the model never saw and a jump at the last boundary.
  """
  config = model.config
  batch, num_frames = audio_windows.shape[:2]
  window, prefix_frames = config.window_frames, config.prefix_frames
  stride = window - prefix_frames
  windows = window_count(num_frames, config)
  covered = window + (windows - 1) * stride
  audio_windows = jnp.asarray(audio_windows)
  if covered > num_frames:
    audio_windows = jnp.pad(audio_windows, ((0, 0), (0, covered - num_frames), (0, 0), (0, 0),
                                            (0, 0)), mode="symmetric")
  timesteps, alpha_bar, alpha_bar_prev = (jnp.asarray(a) for a in
                                          sampling_schedule(config, sample_steps))
  graphdef, state = nnx.split(model)
  shape = (batch, window, config.expression_dim)
  prefix = jnp.zeros(shape, jnp.float32)
  no_prefix = jnp.zeros((1, window, 1), bool)
  held_prefix = (jnp.arange(window) < prefix_frames)[None, :, None]
  pieces = []
  for index in range(windows):
    start = index * stride
    out = denoise_window(
        graphdef, state, jax.random.normal(jax.random.fold_in(key, index), shape), prefix,
        held_prefix if index else no_prefix,
        jax.lax.dynamic_slice_in_dim(audio_windows, start, window, axis=1),
        reference_image, condition, timesteps, alpha_bar, alpha_bar_prev)
    pieces.append(out if index == 0 else out[:, prefix_frames:])
    # The window's last prefix_frames frames come first; the rest is masked out next window.
    prefix = jnp.roll(out, -stride, axis=1)
  return jnp.concatenate(pieces, axis=1)[:, :num_frames]
