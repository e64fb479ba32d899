"""Speech -> frame-aligned wav2vec2 features `A_w` of shape (frames, window, layers, hidden).

1. `load_speech`: wav / flac / mp3 / m4a / mp4 (anything FFmpeg reads, through PyAV), downmixed to
   mono, resampled to 16 kHz with a polyphase filter (`scipy.signal.resample_poly`).
2. `normalize`: zero mean, unit variance over the utterance, as `Wav2Vec2FeatureExtractor` does.
3. `AudioFeatures`: for a video of `n` frames at `fps`, the audio is cut or padded with silence to
   exactly `n` frames; the conv features are linearly interpolated (align_corners, as Hallo does)
   to `n` steps before the transformer, and the hidden states of every transformer layer are kept:
   `(n, layers, hidden)`. Each frame then gets the window of its +-2 neighbours (edge frames
   repeated): `A_w`, a zero-copy view of shape `(n, 5, layers, hidden)`.

Long audio runs in fixed windows of `chunk_frames` frames that overlap by `context_frames` on each
side (each window keeps only its middle), and audio shorter than one window is padded up to one of
a few bucket lengths. Every call therefore runs one of `len(bucket_frames)` compiled shapes: a new
length never compiles again, and memory stays bounded by one window plus the output. Padding is
invisible to the result: GroupNorm statistics, interpolation positions and attention all use only
the valid part, so a clip gives the same features whatever bucket it lands in.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import av
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.signal import resample_poly

from data_pipeline.media import speech_stats
from etalk_jax.audio.wav2vec2 import SpeechEncoderBase, frame_mask_from_lengths
from etalk_jax.errors import UserError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000


class AudioError(UserError):
  """Speech input that cannot be used; the message names the input and what to do."""


# ----------------------------------------------------------------------------------------------
# Reading and preparing speech
# ----------------------------------------------------------------------------------------------


def decode_audio(path: str | Path) -> tuple[np.ndarray, int]:
  """The first audio track of a media file -> (float32 (channels, samples), sample rate)."""
  path = Path(path)
  if path.is_dir():
    raise AudioError(f"{path} is a folder; give a wav, flac, mp3, m4a or mp4 file.")
  if not path.is_file():
    raise AudioError(f"{path} does not exist; give a wav, flac, mp3, m4a or mp4 file.")
  if path.stat().st_size == 0:
    raise AudioError(f"{path} is empty (0 bytes); give a file that holds speech.")
  chunks: list[np.ndarray] = []
  try:
    with av.open(str(path)) as container:
      if not container.streams.audio:
        raise AudioError(f"{path} has no audio track; give a file with speech in it.")
      stream = container.streams.audio[0]
      rate = stream.rate or stream.codec_context.sample_rate
      resampler = av.AudioResampler(format="fltp")  # float planar; rate and channels unchanged
      for frame in container.decode(stream):
        for out in resampler.resample(frame):
          chunks.append(out.to_ndarray())
      for out in resampler.resample(None):
        chunks.append(out.to_ndarray())
  except AudioError:
    raise
  except (av.FFmpegError, UnicodeDecodeError, ValueError) as error:
    # FFmpeg's own words without its errno and the path (the message names the path already).
    reason = getattr(error, "strerror", None) or str(error)
    raise AudioError(f"{path} could not be decoded as audio ({reason}); it is damaged or not "
                     "audio. Give a wav, flac, mp3, m4a or mp4 file that plays.") from error
  if not chunks or sum(c.shape[-1] for c in chunks) == 0:
    raise AudioError(f"{path} holds no audio samples; give a file that holds speech.")
  samples = np.concatenate([c.reshape(c.shape[0] if c.ndim == 2 else 1, -1) for c in chunks],
                           axis=-1)
  return samples.astype(np.float32, copy=False), int(rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
  """(channels, samples) or (samples,) -> (samples,) by averaging the channels."""
  samples = np.asarray(samples)
  return samples if samples.ndim == 1 else samples.mean(axis=0, dtype=np.float64)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
  """Polyphase resampling (Kaiser-windowed FIR, scipy's default) from `rate` to `target`."""
  if rate == target:
    return np.asarray(samples, dtype=np.float32)
  ratio = Fraction(int(target), int(rate))
  out = resample_poly(np.asarray(samples, dtype=np.float64), ratio.numerator, ratio.denominator)
  return out.astype(np.float32)


def normalize(samples: np.ndarray, stats: np.ndarray | None = None) -> np.ndarray:
  """Zero mean, unit variance over the whole utterance (`Wav2Vec2FeatureExtractor`). `stats`:
  the utterance's (mean, std) when `samples` is only a window of it (the loader's
  `utterance_stats`)."""
  x = np.asarray(samples, dtype=np.float32)
  mean, std = speech_stats(x) if stats is None else stats
  return ((x - mean) / std).astype(np.float32)


def load_speech(source: Any, what: str | None = None) -> np.ndarray:
  """A path, or a `(samples, sample_rate)` pair, -> float32 mono 16 kHz samples (unnormalised).

  samples may be (samples,) or (channels, samples). Stereo is downmixed, any rate resampled.
  """
  if isinstance(source, (str, Path)):
    what = what or str(source)
    samples, rate = decode_audio(source)
  elif isinstance(source, tuple) and len(source) == 2:
    samples, rate = np.asarray(source[0]), int(source[1])
    what = what or "the speech array"
    if samples.ndim == 2 and samples.shape[0] > samples.shape[1]:
      raise AudioError(f"{what} has shape {samples.shape}; give (channels, samples), not "
                       "(samples, channels).")
  else:
    raise AudioError(f"speech input of type {type(source).__name__} is not understood; give a "
                     "file path or a (samples, sample_rate) pair.")
  if samples.size == 0:
    raise AudioError(f"{what} holds no samples; give audio that holds speech.")
  if not np.isfinite(samples).all():
    raise AudioError(f"{what} contains NaN or infinite samples; the file is damaged or was "
                     "written from invalid data. Re-export the audio.")
  if rate <= 0:
    raise AudioError(f"{what} has an invalid sample rate {rate}.")
  return resample(to_mono(samples), rate)


# ----------------------------------------------------------------------------------------------
# Windows over frames
# ----------------------------------------------------------------------------------------------


def frame_windows(padded_states: np.ndarray, window: int) -> np.ndarray:
  """(n + window - 1, ...) edge-padded per-frame states -> read-only (n, window, ...) view.

  Frame i's window is frames i - window//2 ... i + window//2 (clamped at the ends). Nothing is
  copied: slice it and convert slices to device arrays as they are needed.
  """
  view = np.lib.stride_tricks.sliding_window_view(padded_states, window, axis=0)
  return np.moveaxis(view, -1, 1)


def pad_edges(states: np.ndarray, window: int) -> np.ndarray:
  """Repeats the first and last frame window//2 times (for `frame_windows`)."""
  half = window // 2
  return np.concatenate([np.repeat(states[:1], half, 0), states,
                         np.repeat(states[-1:], half, 0)], axis=0)


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One transformer window: frames [start, start + frames) computed, [keep_from, keep_to) kept."""
  start: int
  frames: int          # valid frames in this window
  bucket: int          # the padded (compiled) length
  keep_from: int
  keep_to: int


def plan_chunks(num_frames: int, chunk_frames: int, context_frames: int,
                bucket_frames: Sequence[int]) -> list[Chunk]:
  """Windows covering [0, num_frames): every frame kept exactly once, with at least
  `context_frames` of context on each side unless it is that close to an end of the audio."""
  if num_frames <= chunk_frames:
    bucket = min(b for b in bucket_frames if b >= num_frames)
    return [Chunk(0, num_frames, bucket, 0, num_frames)]
  step = chunk_frames - 2 * context_frames
  chunks, kept = [], 0
  start = 0
  while kept < num_frames:
    start = min(start, num_frames - chunk_frames)  # the last window ends at the audio's end
    keep_to = num_frames if start + chunk_frames >= num_frames else start + chunk_frames - \
        context_frames
    chunks.append(Chunk(start, chunk_frames, chunk_frames, kept, keep_to))
    kept = keep_to
    start += step
  return chunks


# ----------------------------------------------------------------------------------------------
# The featurizer
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  fps: float = 25.0
  window: int = 5                 # frames per A_w window (+-2)
  chunk_frames: int = 500         # transformer window for long audio: 20 s at 25 fps
  context_frames: int = 50        # frames on each side a window computes but does not keep
  bucket_frames: tuple[int, ...] = (50, 100, 200, 350, 500)  # padded lengths of short audio
  include_embeddings: bool = False  # keep hidden_states[0] (the transformer's input) too

  def __post_init__(self):
    object.__setattr__(self, "bucket_frames", tuple(sorted(int(b) for b in self.bucket_frames)))
    problems = []
    if self.window < 1 or self.window % 2 == 0:
      problems.append(f"window must be odd and positive (got {self.window})")
    if self.fps <= 0:
      problems.append(f"fps must be positive (got {self.fps})")
    if not self.bucket_frames or self.bucket_frames[-1] != self.chunk_frames:
      problems.append(f"the largest bucket must equal chunk_frames ({self.chunk_frames}); "
                      f"got bucket_frames={self.bucket_frames}")
    if self.chunk_frames - 2 * self.context_frames < 1 or self.context_frames < 0:
      problems.append(f"chunk_frames {self.chunk_frames} must exceed 2 * context_frames "
                      f"{self.context_frames}")
    if problems:
      raise UserError("invalid FeatureConfig: " + "; ".join(problems) + ".")

  @property
  def samples_per_frame(self) -> float:
    return SAMPLE_RATE / self.fps


def _interpolate_frames(features: jax.Array, valid_features: jax.Array, valid_frames: jax.Array,
                        frames: int) -> jax.Array:
  """Linear interpolation (align_corners=True) of the first `valid_features` steps onto
  `valid_frames` steps, per row; rows padded to `frames`. (batch, T, C) -> (batch, frames, C)."""
  scale = (valid_features - 1).astype(jnp.float32) / jnp.maximum(valid_frames - 1, 1).astype(
      jnp.float32)
  position = jnp.arange(frames, dtype=jnp.float32)[None, :] * scale[:, None]
  low = jnp.floor(position).astype(jnp.int32)
  low = jnp.clip(low, 0, features.shape[1] - 1)
  high = jnp.minimum(low + 1, (valid_features - 1)[:, None])
  high = jnp.clip(high, 0, features.shape[1] - 1)
  weight = (position - low.astype(jnp.float32))[..., None]
  take = jax.vmap(lambda f, i: f[i])
  low_values, high_values = take(features, low), take(features, high)
  return low_values * (1.0 - weight).astype(features.dtype) + high_values * weight.astype(
      features.dtype)


class AudioFeatures:
  """A frozen wav2vec2 (or WavLM) turned into per-frame windows `A_w`.

  >>> featurize = AudioFeatures(wav2vec2_model)
  >>> a_w = featurize("speech.wav", num_frames=120)   # (120, 5, 12, 768) read-only view
  """

  def __init__(self, model: SpeechEncoderBase, config: FeatureConfig = FeatureConfig()):
    self.model_config = model.config
    self.config = config
    graphdef, self.state = nnx.split(model)
    keep_first = 0 if config.include_embeddings else 1
    model_config = model.config

    def window_states(state, samples, valid_samples, valid_frames, frames):
      encoder = nnx.merge(graphdef, state)
      features = encoder.feature_extractor(samples, valid_samples)
      valid_features = model_config.feature_lengths(valid_samples)
      aligned = _interpolate_frames(features, valid_features, valid_frames, frames)
      out = encoder.project_and_encode(aligned, frame_mask_from_lengths(valid_frames, frames))
      return jnp.stack(out.hidden_states[keep_first:], axis=2)  # (batch, frames, layers, hidden)

    # One compiled program per (samples buffer, frames) bucket; `state` is an argument so the
    # weights are not baked into the program as constants.
    self._window_states = jax.jit(window_states, static_argnames=("frames",))

  @property
  def num_layers(self) -> int:
    return self.model_config.num_hidden_layers + int(self.config.include_embeddings)

  def compiled_shapes(self) -> int:
    """How many programs have been compiled so far (one per bucket used)."""
    return self._window_states._cache_size()

  def num_frames_for(self, num_samples: int) -> int:
    return math.ceil(num_samples / self.config.samples_per_frame)

  def _sample_index(self, frame: int) -> int:
    return int(round(frame * self.config.samples_per_frame))

  def frame_states(self, samples: np.ndarray, num_frames: int | None = None, *,
                   what: str = "the speech") -> np.ndarray:
    """Normalised 16 kHz mono samples -> (n, layers, hidden) float32, hidden states per frame.

    The result is the middle of an edge-padded buffer, so `windows` needs no copy.
    """
    return self._padded_states(samples, num_frames, what)[0]

  def _padded_states(self, samples, num_frames, what):
    cfg = self.config
    samples = np.asarray(samples, dtype=np.float32)
    spf = cfg.samples_per_frame
    min_samples = max(math.ceil(spf), self._min_samples())
    if samples.ndim != 1:
      raise AudioError(f"{what} must be mono (samples,), got shape {samples.shape}; use "
                       "load_speech to downmix.")
    if samples.shape[0] < min_samples:
      raise AudioError(f"{what} is {1000 * samples.shape[0] / SAMPLE_RATE:.1f} ms long, shorter "
                       f"than one video frame ({1000 * min_samples / SAMPLE_RATE:.0f} ms at "
                       f"{cfg.fps:g} fps); give at least one frame of speech.")
    if not np.isfinite(samples).all():
      raise AudioError(f"{what} contains NaN or infinite samples; re-export the audio.")
    n = self.num_frames_for(samples.shape[0]) if num_frames is None else int(num_frames)
    if n < 1:
      raise AudioError(f"num_frames is {num_frames}; a video has at least one frame.")
    total = self._sample_index(n)
    if abs(total - samples.shape[0]) > SAMPLE_RATE:
      log.warning("%s lasts %.2f s but %d frames at %g fps last %.2f s; the audio is %s.", what,
                  samples.shape[0] / SAMPLE_RATE, n, cfg.fps, n / cfg.fps,
                  "cut" if total < samples.shape[0] else "padded with silence")
    audio = np.zeros(total, np.float32)  # cut or padded with silence to exactly n frames
    audio[:min(total, samples.shape[0])] = samples[:total]

    half = cfg.window // 2
    out = np.empty((n + 2 * half, self.num_layers, self.model_config.hidden_size), np.float32)
    for chunk in plan_chunks(n, cfg.chunk_frames, cfg.context_frames, cfg.bucket_frames):
      first, last = self._sample_index(chunk.start), self._sample_index(chunk.start + chunk.frames)
      buffer = np.zeros((1, math.ceil(chunk.bucket * spf)), np.float32)
      buffer[0, :last - first] = audio[first:last]
      states = self._window_states(self.state, buffer, np.asarray([last - first], np.int32),
                                   np.asarray([chunk.frames], np.int32), frames=chunk.bucket)
      offset = chunk.keep_from - chunk.start
      states = np.asarray(states)  # slice on the host: slicing on device compiles per size
      out[half + chunk.keep_from:half + chunk.keep_to] = states[
          0, offset:offset + chunk.keep_to - chunk.keep_from]
    out[:half] = out[half]
    out[half + n:] = out[half + n - 1]
    return out[half:half + n], out

  def _min_samples(self) -> int:
    """Fewest samples that give one conv feature (the receptive field, 400 for the base stack)."""
    length = 1
    for kernel, stride in reversed(list(zip(self.model_config.conv_kernel,
                                            self.model_config.conv_stride))):
      length = (length - 1) * stride + kernel
    return length

  def windows(self, samples: np.ndarray, num_frames: int | None = None, *,
              what: str = "the speech") -> np.ndarray:
    """Normalised 16 kHz mono samples -> A_w, a read-only (n, window, layers, hidden) view."""
    _, padded = self._padded_states(samples, num_frames, what)
    return frame_windows(padded, self.config.window)

  def __call__(self, speech: Any, num_frames: int | None = None) -> np.ndarray:
    """A path or (samples, sample_rate) -> A_w of shape (n, window, layers, hidden).

    n = num_frames (the video's frame count) or, if None, the speech's length in frames (rounded
    up). The audio is cut or padded with silence to exactly n frames.
    """
    what = str(speech) if isinstance(speech, (str, Path)) else "the speech array"
    samples = normalize(load_speech(speech, what))
    return self.windows(samples, num_frames, what=what)
