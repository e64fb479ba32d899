"""Synthetic clips: one identity speaking with one emotion at one MEAD-like level, and the spec of a
whole synthetic dataset."""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import EMOTIONS, NUM_LANDMARKS
from data_pipeline.synthetic.face_mesh import EXPRESSIONS, face_points
from data_pipeline.synthetic.identity import Identity, make_identity
from data_pipeline.synthetic.motion import blinks, head_motion
from data_pipeline.synthetic.render import Renderer
from data_pipeline.synthetic.speech import synthesize_speech

LEVEL_ALPHA = {1: 0.5, 2: 1.0, 3: 1.5}  # MEAD's intensity levels -> expression scale


@dataclasses.dataclass
class SyntheticClip:
  identity: Identity
  emotion: str
  level: int
  frames: np.ndarray  # (T, R, R, 3) uint8
  audio: np.ndarray  # (T * 640,) int16, 16 kHz
  landmarks: np.ndarray  # (T, 478, 2) float32 in [0, 1] crop coordinates
  mouth_open: np.ndarray  # (T,) float32
  eye_open: np.ndarray  # (T,) float32
  pose: np.ndarray  # (T, 6) float32: yaw, pitch, roll (deg), tx, ty, scale

  @property
  def clip_id(self) -> str:
    return f"{self.identity.speaker}_{self.emotion}_level{self.level}"


def make_clip(identity: Identity, emotion: str, level: int, num_frames: int, resolution: int,
              seed: int = 0, take: int = 0, head_motion_scale: float = 1.0,
              face_scale: float = 1.0) -> SyntheticClip:
  """One clip: `identity` speaking with `emotion` at MEAD-like `level` (1..3); `take` numbers
  different utterances of the same person and emotion; `head_motion_scale` multiplies the head's
  movement; `face_scale` the face's size in the frame (1: the training crop's framing, face
  height ~0.5 of the frame). Same arguments, same bytes."""
  if emotion not in EXPRESSIONS:
    raise ValueError(f"unknown emotion {emotion!r}; use one of {', '.join(EMOTIONS)}")
  if level not in LEVEL_ALPHA:
    raise ValueError(f"level must be 1, 2 or 3, got {level}")
  alpha = LEVEL_ALPHA[level]
  rng = np.random.default_rng([seed, identity.index, EMOTIONS.index(emotion), level, take, 0xC1])
  audio, speech_opening, stress = synthesize_speech(rng, num_frames, identity, emotion, alpha)
  expression = EXPRESSIONS[emotion]
  mouth_open = np.clip(speech_opening + 0.3 * expression.jaw * alpha, 0.0, 1.0)
  pose = head_motion(rng, num_frames, stress, emotion, alpha, head_motion_scale)
  lids = blinks(rng, num_frames)
  renderer = Renderer(identity, resolution, face_scale)
  frames = np.empty((num_frames, resolution, resolution, 3), np.uint8)
  landmarks = np.empty((num_frames, NUM_LANDMARKS, 2), np.float32)
  eye_open = np.empty(num_frames, np.float32)
  for i in range(num_frames):
    points, eye_open[i] = face_points(identity, expression, alpha, float(mouth_open[i]),
                                      float(lids[i]))
    frames[i], landmarks[i] = renderer(points, pose[i])
  return SyntheticClip(identity=identity, emotion=emotion, level=level, frames=frames, audio=audio,
                       landmarks=landmarks, mouth_open=mouth_open.astype(np.float32),
                       eye_open=eye_open, pose=pose.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """What a synthetic dataset holds: every identity says `takes` utterances in every emotion at
  every level (neutral only at level 1, as in MEAD)."""
  identities: int = 8
  emotions: tuple[str, ...] = EMOTIONS
  levels: tuple[int, ...] = (1, 2, 3)
  takes: int = 1
  num_frames: int = 100
  resolution: int = 64
  seed: int = 0
  head_motion: float = 1.0  # multiplies the head's sway, nods, drift and zoom
  face_scale: float = 1.0  # the face's size in the frame (> 1: framed tighter than the crop)

  def clips(self):
    """(identity, emotion, level, take) for every clip, in a fixed order."""
    for index in range(self.identities):
      identity = make_identity(index, self.seed)
      for emotion in self.emotions:
        for level in ((1,) if emotion == "neutral" else self.levels):
          for take in range(self.takes):
            yield identity, emotion, level, take

  def make_clip(self, identity: Identity, emotion: str, level: int, take: int) -> SyntheticClip:
    return make_clip(identity, emotion, level, self.num_frames, self.resolution, self.seed, take,
                     self.head_motion, self.face_scale)

  def __len__(self) -> int:
    per_identity = sum(1 if e == "neutral" else len(self.levels)
                       for e in self.emotions) * self.takes
    return self.identities * per_identity
