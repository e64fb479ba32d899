"""Synthetic identities: face shape, skin, hair, eyes, lips, background and voice of one person."""

from __future__ import annotations

import dataclasses

import numpy as np

SKIN_TONES = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 99), (161, 102, 70),
              (110, 70, 50))
HAIR_COLOURS = ((30, 22, 18), (70, 45, 30), (120, 80, 45), (190, 150, 90), (150, 150, 150),
                (140, 50, 30))
IRIS_COLOURS = ((70, 45, 25), (40, 90, 150), (60, 110, 70), (100, 80, 50))


@dataclasses.dataclass(frozen=True)
class Identity:
  """One synthetic person: colours, face proportions, framing and voice pitch."""
  index: int
  skin: tuple[int, int, int]
  hair: tuple[int, int, int]
  hair_style: int  # 0 short, 1 long, 2 very short / receding
  iris: tuple[int, int, int]
  lips: tuple[int, int, int]
  background_top: tuple[int, int, int]
  background_bottom: tuple[int, int, int]
  shirt: tuple[int, int, int]
  face_width: float  # x scale of the whole face
  face_length: float  # y scale
  jaw_width: float  # extra x scale below the mouth
  eye_size: float
  mouth_width: float
  brow_thickness: float
  hairline: float  # forehead height kept free of hair (face units above the eyes)
  head_scale: float  # face size in the frame
  f0: float  # speaking pitch, Hz

  @property
  def speaker(self) -> str:
    return f"synthetic_{self.index:03d}"


def _colour(rng: np.random.Generator, base, jitter: float) -> tuple[int, int, int]:
  return tuple(int(np.clip(c + rng.normal(0, jitter), 0, 255)) for c in base)


def make_identity(index: int, seed: int = 0) -> Identity:
  """Identity `index` of the family `seed` (same arguments, same person)."""
  rng = np.random.default_rng([seed, index, 0x1D])
  skin = _colour(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 8)
  lips = tuple(int(c) for c in np.clip(np.array(skin) * np.array([0.85, 0.55, 0.55]) + [20, 0, 0],
                                       0, 255))
  background = rng.uniform(40, 220, size=3)
  return Identity(
    index=index, skin=skin, hair=_colour(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 10),
    hair_style=int(rng.integers(3)),
    iris=_colour(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 10),
    lips=lips,
    background_top=tuple(int(c) for c in background),
    background_bottom=tuple(int(c) for c in np.clip(background * rng.uniform(0.5, 0.9), 0, 255)),
    shirt=_colour(rng, rng.uniform(30, 220, size=3), 0),
    face_width=float(rng.uniform(0.88, 1.1)), face_length=float(rng.uniform(0.94, 1.06)),
    jaw_width=float(rng.uniform(0.85, 1.08)), eye_size=float(rng.uniform(0.85, 1.2)),
    mouth_width=float(rng.uniform(0.85, 1.15)), brow_thickness=float(rng.uniform(0.7, 1.4)),
    hairline=float(rng.uniform(0.16, 0.24)), head_scale=float(rng.uniform(0.95, 1.05)),
    f0=float(rng.uniform(95, 135) if rng.random() < 0.5 else rng.uniform(175, 235)),
  )
