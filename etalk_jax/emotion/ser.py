"""The speech-emotion head: frozen WavLM hidden states -> one of the eight emotion keywords.

EmotiveTalk can take its emotion from an emotional utterance (docs/ARCHITECTURE.md §3.10): the
speech goes through a frozen WavLM, this head names the emotion keyword, and the codebook turns the
keyword into Di-CTE's condition. The head trains as its own stage, on labelled speech (MEAD's
clips), with the WavLM untouched.

Features: `speech_states` runs the WavLM through `AudioFeatures.frame_states`, the same code path
as V-AID's audio windows, so the hidden states of every layer arrive per video frame (25 fps)
and long audio is chunked and bucketed there. A batch of utterances is `(batch, time, layers,
hidden)` plus a `(batch, time)` validity mask (`pad_utterances`).

The head (SUPERB-style): a learned softmax weighting of the layers (initialised equal), each
layer first standardised over its hidden axis (parameter-free, so layers of different scales
weigh alike); Linear + GELU to `head_dim`; masked mean and standard deviation over the valid
frames (padding never changes the result); an MLP (Linear, GELU, dropout, Linear) to the
logits of `EMOTIONS`. Dropout is on only when the call is given a random key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data_pipeline import EMOTIONS
from etalk_jax import model_io
from etalk_jax.audio.features import AudioFeatures, load_speech, normalize
from etalk_jax.errors import UserError
from etalk_jax.layers.compute import FP32, Compute

STANDARDISE_EPS = 1e-5  # keeps a constant hidden vector's z-score finite
POOL_VARIANCE_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SERConfig(model_io.ModelConfig):
  """Sizes of the speech-emotion head; defaults read WavLM base (12 layers of 768)."""

  model_type = "speech_emotion_head"
  label = "speech-emotion head"

  num_layers: int = 12      # WavLM hidden-state layers read (AudioFeatures.num_layers)
  hidden_size: int = 768    # WavLM hidden size
  head_dim: int = 256
  num_classes: int = len(EMOTIONS)
  dropout: float = 0.1

  def __post_init__(self):
    for name in ("num_layers", "hidden_size", "head_dim"):
      if getattr(self, name) < 1:
        raise UserError(f"SERConfig.{name}={getattr(self, name)} must be at least 1.")
    if self.num_classes != len(EMOTIONS):
      raise UserError(f"SERConfig.num_classes={self.num_classes} must be {len(EMOTIONS)}, one "
                      f"per emotion keyword ({', '.join(EMOTIONS)}).")
    if not 0.0 <= self.dropout < 1.0:
      raise UserError(f"SERConfig.dropout={self.dropout} must be in [0, 1).")

  @classmethod
  def for_audio(cls, audio: AudioFeatures, **sizes: Any) -> "SERConfig":
    """The config whose input sizes match `audio`'s speech encoder."""
    return cls(num_layers=audio.num_layers, hidden_size=audio.model_config.hidden_size, **sizes)

  @classmethod
  def tiny(cls) -> "SERConfig":
    """Tests: the full structure at CPU-friendly widths."""
    return cls(num_layers=3, hidden_size=16, head_dim=32, dropout=0.1)


SER_BASE = SERConfig()
SER_TINY = SERConfig.tiny()


def _masked_mean_std(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x `(batch, time, dim)`, mask `(batch, time)` -> mean and std `(batch, dim)` over valid time."""
  weight = mask.astype(x.dtype)[..., None]
  x = jnp.where(weight > 0, x, 0)  # padding may hold anything, NaN included
  count = jnp.maximum(weight.sum(axis=1), 1.0)
  mean = x.sum(axis=1) / count
  variance = (weight * (x - mean[:, None]) ** 2).sum(axis=1) / count
  return mean, jnp.sqrt(variance + POOL_VARIANCE_EPS)


class SpeechEmotionHead(nnx.Module):
  """WavLM hidden states `(batch, time, layers, hidden)` + mask `(batch, time)` -> logits
  `(batch, len(EMOTIONS))` in `EMOTIONS` order."""

  def __init__(self, config: SERConfig = SER_BASE, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.config = config
    kw = compute.dense_kwargs()
    self.layer_logits = nnx.Param(jnp.zeros((config.num_layers,), compute.param_dtype))
    self.projection = nnx.Linear(config.hidden_size, config.head_dim, rngs=rngs, **kw)
    self.classifier_in = nnx.Linear(2 * config.head_dim, config.head_dim, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(config.dropout)
    self.classifier_out = nnx.Linear(config.head_dim, config.num_classes, rngs=rngs, **kw)

  def layer_weights(self) -> jax.Array:
    return jax.nn.softmax(self.layer_logits[...])

  def __call__(self, states: jax.Array, mask: jax.Array, *,
               dropout_key: jax.Array | None = None) -> jax.Array:
    config = self.config
    if states.ndim != 4 or states.shape[2:] != (config.num_layers, config.hidden_size):
      raise ValueError(f"the speech-emotion head reads WavLM states (batch, time, "
                       f"{config.num_layers}, {config.hidden_size}); got {states.shape}. Build the "
                       "head with SERConfig.for_audio(audio_features).")
    mean = states.mean(axis=-1, keepdims=True)
    standardised = (states - mean) * jax.lax.rsqrt(
        states.var(axis=-1, keepdims=True) + STANDARDISE_EPS)
    combined = jnp.einsum("btlh,l->bth", standardised, self.layer_weights().astype(states.dtype))
    frames = jax.nn.gelu(self.projection(combined), approximate=False)
    pooled = jnp.concatenate(_masked_mean_std(frames, mask), axis=-1)
    hidden = jax.nn.gelu(self.classifier_in(pooled), approximate=False)
    hidden = self.dropout(hidden, deterministic=dropout_key is None, rngs=dropout_key)
    return self.classifier_out(hidden)


def ser_loss(head: SpeechEmotionHead, states: jax.Array, mask: jax.Array, labels: jax.Array, *,
             dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy of `labels` (indices into `EMOTIONS`, `(batch,)`)."""
  logits = head(states, mask, dropout_key=dropout_key).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = (logits.argmax(axis=-1) == labels).mean()
  return loss, accuracy


def predict_keyword(head: SpeechEmotionHead, states: jax.Array, mask: jax.Array
                    ) -> tuple[list[str], np.ndarray]:
  """-> (one keyword per utterance, probabilities `(batch, len(EMOTIONS))` in `EMOTIONS` order)."""
  probabilities = np.asarray(jax.nn.softmax(head(states, mask).astype(jnp.float32), axis=-1))
  return [EMOTIONS[i] for i in probabilities.argmax(axis=-1)], probabilities


# ----------------------------------------------------------------------------------------------
# From speech
# ----------------------------------------------------------------------------------------------


def speech_states(audio: AudioFeatures, speech: Any, *, what: str | None = None) -> np.ndarray:
  """An utterance -> its WavLM hidden states per 25 fps frame, `(frames, layers, hidden)`.

  speech: float 16 kHz mono samples (a 1-d array), a file path, or a `(samples, sample_rate)`
  pair (decoded, downmixed and resampled by `load_speech`). Normalised as the encoder expects.
  """
  if isinstance(speech, np.ndarray):
    what = what or "the speech array"
    samples = load_speech((speech, 16_000), what)
  else:
    what = what or (str(speech) if isinstance(speech, (str, Path)) else "the speech array")
    samples = load_speech(speech, what)
  return audio.frame_states(normalize(samples), what=what)


def pad_utterances(states: list[np.ndarray], length: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Utterances `(frames_i, layers, hidden)` -> batch `(n, length, layers, hidden)` zero-padded,
  and the validity mask `(n, length)` bool; `length` defaults to the longest (longer ones are
  cut)."""
  if not states:
    raise ValueError("pad_utterances needs at least one utterance.")
  length = max(s.shape[0] for s in states) if length is None else int(length)
  batch = np.zeros((len(states), length) + states[0].shape[1:], np.float32)
  mask = np.zeros((len(states), length), bool)
  for row, utterance in enumerate(states):
    frames = min(utterance.shape[0], length)
    batch[row, :frames] = utterance[:frames]
    mask[row, :frames] = True
  return batch, mask


def keyword_from_speech(head: SpeechEmotionHead, audio: AudioFeatures, speech: Any
                        ) -> tuple[str, dict[str, float]]:
  """An emotional utterance -> (its keyword, probability per keyword)."""
  if (head.config.num_layers, head.config.hidden_size) != (
      audio.num_layers, audio.model_config.hidden_size):
    raise UserError(f"the speech-emotion head reads {head.config.num_layers} layers of "
                    f"{head.config.hidden_size}, but the speech encoder gives "
                    f"{audio.num_layers} of {audio.model_config.hidden_size}; use the WavLM "
                    "the head was trained on.")
  batch, mask = pad_utterances([speech_states(audio, speech)])
  keywords, probabilities = predict_keyword(head, batch, mask)
  return keywords[0], dict(zip(EMOTIONS, probabilities[0].tolist()))


# ----------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------


def save_ser(head: SpeechEmotionHead, folder: str | Path, *, overwrite: bool = False) -> Path:
  """The head -> `folder` (config.json + Orbax state, `model_io`)."""
  return model_io.save_model(head, folder, head.config.to_dict(), overwrite=overwrite)


def load_ser(folder: str | Path, compute: Compute = FP32) -> SpeechEmotionHead:
  return model_io.load_model(folder, SERConfig, SpeechEmotionHead, compute)
