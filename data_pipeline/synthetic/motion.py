"""Head motion and blinks of a synthetic clip."""

from __future__ import annotations

import numpy as np

from data_pipeline import FPS
from data_pipeline.synthetic.speech import PROSODY, scaled_by_intensity


def head_motion(rng: np.random.Generator, num_frames: int, stress: np.ndarray, emotion: str,
                alpha: float, scale: float = 1.0) -> np.ndarray:
  """Pose per frame (num_frames, 6): yaw, pitch, roll (degrees), tx, ty (crop fractions), scale.
  `scale` multiplies the movement (sway, nods, drift, zoom), not the emotion's held head pitch."""
  prosody = PROSODY[emotion]
  amplitude = scaled_by_intensity(prosody.motion, alpha) * scale
  time = np.arange(num_frames) / FPS
  pose = np.zeros((num_frames, 6))
  for axis, degrees in enumerate((4.0, 2.5, 2.0)):
    for frequency in rng.uniform(0.08, 0.5, size=3):
      pose[:, axis] += amplitude * degrees / 2 * np.sin(2 * np.pi * frequency * time
                                                        + rng.uniform(0, 2 * np.pi))
  kernel = np.exp(-0.5 * (np.arange(-6, 7) / 3.0) ** 2)
  # Nods on stressed syllables.
  pose[:, 1] += 3.0 * amplitude * np.convolve(stress, kernel / kernel.sum(), mode="same")
  pose[:, 1] += prosody.head_pitch * alpha
  for axis, size in ((3, 0.012), (4, 0.008)):
    pose[:, axis] = amplitude * size * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * time
                                              + rng.uniform(0, 6.3))
  pose[:, 5] = 1.0 + 0.01 * scale * np.sin(2 * np.pi * rng.uniform(0.05, 0.15) * time
                                            + rng.uniform(0, 6.3))
  return pose


def blinks(rng: np.random.Generator, num_frames: int) -> np.ndarray:
  """Eyelid factor per frame: 1 open, 0 shut; a 5-frame blink every 2..5 s."""
  lid = np.ones(num_frames)
  frame = int(rng.integers(10, 60))
  profile = np.array([0.6, 0.15, 0.0, 0.3, 0.75])
  while frame < num_frames:
    stop = min(num_frames, frame + len(profile))
    lid[frame:stop] = profile[:stop - frame]
    frame += int(rng.integers(50, 125))
  return lid
