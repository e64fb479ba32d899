"""V-AID training examples: talking-head clips -> (A_w, l_v, e_v, x_ref)
(docs/ARCHITECTURE.md §3.3f).

The projector learns `A_w -> l_v` and Di-CTE learns `A_w, x_ref -> e_v`; both targets are outputs of
the lip / expression encoders on the ground-truth frames. `VAIDFeaturizer` holds a frozen speech
encoder (`AudioFeatures`) and the vision encoders (`AdaptedPDFGC` or a bare `PDFGCEncoder`) and
turns either a Grain loader batch (`from_batch`) or a whole synthetic clip (`from_clip`) into
`TrainingExamples`. Every frame reaches the encoder as PD-FGC's own input, aligned on that frame's
landmarks (`etalk_jax.vision.alignment.pdfgc_inputs`), as the pretrained trunk was trained.
`concatenate` batches examples and `random_windows` cuts Di-CTE training windows out of longer
clips.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from data_pipeline import INT16_SCALE, NUM_LANDMARKS, SAMPLES_PER_FRAME
from etalk_jax.audio.features import AudioFeatures, normalize
from etalk_jax.vaid.dicte import DiCTEConfig
from etalk_jax.vaid.projector import ProjectorConfig
from etalk_jax.vision.alignment import pdfgc_inputs
from etalk_jax.vision.pdfgc import AdaptedPDFGC, PDFGCEncoder

VISION_CHUNK_FRAMES = 64    # frames per vision-encoder call: one compiled shape for any clip


class TrainingExamples(NamedTuple):
  """One batch of V-AID training examples, float32 NumPy arrays."""
  audio_windows: np.ndarray         # A_w `(batch, frames, window, layers, hidden)`
  lip: np.ndarray                   # l_v `(batch, frames, lip_dim)`
  expression: np.ndarray            # e_v `(batch, frames, expression_dim)`
  reference: np.ndarray             # x_ref `(batch, h, w, 3)` in [-1, 1]
  reference_expression: np.ndarray  # ExpEncoder(x_ref) `(batch, expression_dim)`: Di-CTE's
  #                                   "uncond." condition


def unit_range_on_host(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 NumPy in [-1, 1], as PD-FGC and Di-CTE's identity encoder read them,
  computed on the host for host batches. Not `svd.codec.to_unit_range`: that one runs in XLA, whose
  division by 127.5 differs from NumPy's in the last bit for some pixel values, and it takes float
  frames as already in [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


class VAIDFeaturizer:
  """Frozen encoders -> `TrainingExamples`.

  >>> featurize = VAIDFeaturizer(AudioFeatures(wav2vec2), AdaptedPDFGC(PDFGC_FULL, rngs=...))
  >>> examples = featurize.from_batch(next(iterator))
  """

  def __init__(self, audio: AudioFeatures, vision: AdaptedPDFGC | PDFGCEncoder):
    self.audio = audio
    self.vision_config = vision.config
    graphdef, self._vision_state = nnx.split(vision)
    size = vision.config.image_size

    def encode(state, frames, landmarks_px):
      codes = nnx.merge(graphdef, state)(pdfgc_inputs(frames, landmarks_px, size))
      return codes.lip, codes.expression

    # The weights are an argument, not constants baked into the program.
    self._encode = jax.jit(encode)

  # Sizes the models must have to read these features.
  @property
  def audio_layers(self) -> int:
    return self.audio.num_layers

  @property
  def audio_dim(self) -> int:
    return self.audio.model_config.hidden_size

  @property
  def lip_dim(self) -> int:
    return self.vision_config.feature_dim

  @property
  def expression_dim(self) -> int:
    return self.vision_config.expression_dim

  def projector_config(self, base: ProjectorConfig) -> ProjectorConfig:
    """`base` with the audio and lip sizes of these encoders."""
    return dataclasses.replace(base, window=self.audio.config.window,
                               audio_layers=self.audio_layers, audio_dim=self.audio_dim,
                               output_dim=self.lip_dim)

  def dicte_config(self, base: DiCTEConfig) -> DiCTEConfig:
    """`base` with the audio and expression sizes of these encoders."""
    return dataclasses.replace(base, window=self.audio.config.window,
                               audio_layers=self.audio_layers, audio_dim=self.audio_dim,
                               expression_dim=self.expression_dim,
                               condition_dim=self.expression_dim)

  def encode_frames(self, frames: np.ndarray, landmarks_px: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames `(n, h, w, 3)` and each frame's own landmarks `(n, 478, 2)` in its pixels ->
    (l_v `(n, lip_dim)`, e_v `(n, expression_dim)`), every frame aligned as PD-FGC reads it."""
    frames = np.asarray(frames)
    count = frames.shape[0]
    if landmarks_px is None or np.shape(landmarks_px) != (count, NUM_LANDMARKS, 2):
      raise ValueError(
          f"the vision encoders need each frame's own landmarks, shape ({count}, {NUM_LANDMARKS}, "
          f"2) in its pixels, to align it as PD-FGC does; got "
          f"{None if landmarks_px is None else np.shape(landmarks_px)}. Pass the record's or the "
          "detector's landmarks (crop coordinates times the frame size).")
    landmarks_px = np.asarray(landmarks_px, np.float32)
    padded = -(-count // VISION_CHUNK_FRAMES) * VISION_CHUNK_FRAMES
    frames = np.concatenate([frames, np.zeros((padded - count,) + frames.shape[1:], frames.dtype)])
    # Padding rows repeat the last landmarks: all-zero ones would make a degenerate alignment.
    landmarks_px = np.pad(landmarks_px, ((0, padded - count), (0, 0), (0, 0)), mode="edge")
    lips, expressions = [], []
    for start in range(0, padded, VISION_CHUNK_FRAMES):
      chunk = slice(start, start + VISION_CHUNK_FRAMES)
      lip, expression = self._encode(self._vision_state, frames[chunk], landmarks_px[chunk])
      lips.append(np.asarray(lip))
      expressions.append(np.asarray(expression))
    return np.concatenate(lips)[:count], np.concatenate(expressions)[:count]

  def _examples(self, audio_windows, frames, landmarks_px, references,
                reference_landmarks_px) -> TrainingExamples:
    batch, num_frames = frames.shape[:2]
    lip, expression = self.encode_frames(
        np.concatenate([frames.reshape(-1, *frames.shape[2:]), references]),
        np.concatenate([np.reshape(landmarks_px, (-1, NUM_LANDMARKS, 2)), reference_landmarks_px]))
    split = batch * num_frames
    return TrainingExamples(
        audio_windows=np.stack(audio_windows).astype(np.float32),
        lip=lip[:split].reshape(batch, num_frames, -1),
        expression=expression[:split].reshape(batch, num_frames, -1),
        reference=unit_range_on_host(references),
        reference_expression=expression[split:])

  def from_batch(self, batch: dict[str, Any], audio_context_frames: int = 2) -> TrainingExamples:
    """A `data_pipeline.loader` batch (`with_frames` and `with_reference` on) -> examples.

    Each row's audio holds `audio_context_frames` frames on each side of the window: A_w is
    computed over the whole span, then cut to the window, so the ±2-frame windows at the edges
    hear real audio. The speech is normalised with the clip's `utterance_stats` (over the span
    itself when a batch lacks them), as inference normalises the whole utterance. Each frame is
    aligned on its own landmarks, the reference on `reference_landmarks`.
    """
    if "reference_landmarks" not in batch:
      raise ValueError("the batch has no reference_landmarks (the reference frame's own "
                       "landmarks, which align it for the expression encoder); read it with "
                       "data_pipeline.loader's WindowSampler and with_reference on.")
    frames, references = batch["frames"], batch["reference"]
    return self._examples(self.audio_windows(batch, audio_context_frames), frames,
                          np.asarray(batch["landmarks"]) * frames.shape[-2], references,
                          np.asarray(batch["reference_landmarks"]) * references.shape[-2])

  def audio_windows(self, batch: dict[str, Any], audio_context_frames: int = 2) -> np.ndarray:
    """A_w `(batch, frames, window, layers, hidden)` of a loader batch (see `from_batch`)."""
    context = audio_context_frames
    num_frames = np.shape(batch["audio"])[1] // SAMPLES_PER_FRAME - 2 * context
    stats = batch.get("utterance_stats", [None] * len(batch["audio"]))
    return np.stack([
        np.asarray(self.audio.windows(normalize(audio, utterance), num_frames + 2 * context,
                                      what=f"clip {clip_id}"))[context:context + num_frames]
        for audio, utterance, clip_id in zip(batch["audio"], stats, batch["clip_id"])]
    ).astype(np.float32)

  def from_clip(self, clip, reference_index: int = 0) -> TrainingExamples:
    """A whole `data_pipeline.synthetic.SyntheticClip` -> examples with batch 1; x_ref is its
    frame `reference_index`."""
    frames = clip.frames
    audio_windows = np.asarray(self.audio.windows(
        normalize(clip.audio.astype(np.float32) / INT16_SCALE), frames.shape[0],
        what=f"clip {clip.clip_id}"))
    landmarks_px = clip.landmarks * frames.shape[-2]  # crop coordinates -> the frames' pixels
    return self._examples([audio_windows], frames[None], landmarks_px[None],
                          frames[reference_index][None], landmarks_px[reference_index][None])


def concatenate(examples: list[TrainingExamples]) -> TrainingExamples:
  """Examples of equal window length -> one batch."""
  return TrainingExamples(*(np.concatenate(parts) for parts in zip(*examples)))


def random_windows(rng: np.random.Generator, examples: TrainingExamples, count: int,
                   frames: int) -> TrainingExamples:
  """`count` random `frames`-long windows of random clips of `examples` (x_ref and the
  condition follow their clip): Di-CTE training windows shorter than the clips."""
  clips = rng.integers(0, examples.lip.shape[0], count)
  starts = rng.integers(0, examples.lip.shape[1] - frames + 1, count)
  window = lambda array: np.stack([array[c, s:s + frames] for c, s in zip(clips, starts)])
  return TrainingExamples(window(examples.audio_windows), window(examples.lip),
                          window(examples.expression), examples.reference[clips],
                          examples.reference_expression[clips])
