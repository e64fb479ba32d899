"""Synthetic talking faces: procedural, deterministic clips with exact per-frame ground truth.

Every clip is a function of (seed, identity, emotion, level, number of frames, resolution):
- identities differ in face shape, skin, hair (colour and style), eyes, lips, background and voice;
- speech-like audio: syllables of voiced harmonics shaped by vowel formants, consonant closures and
  noise bursts, amplitude envelopes, pauses between phrases; prosody (pitch, range, rate, energy,
  tremor, brightness) depends on the emotion, so speech emotion is learnable too;
- the mouth opening follows the articulation that made the sound (vowel openness while voicing,
  closed on plosives and nasals, shut in pauses), so lip sync is exact by construction;
- each of the eight emotions moves brows, eye opening, mouth corners and width, upper lip and jaw,
  scaled by the MEAD-like intensity level 1..3 (alpha 0.5, 1.0, 1.5);
- blinks and a small head sway (yaw, pitch, roll, translation, scale) with nods on stressed syllables.

Faces are drawn from MediaPipe's 478-point mesh (a frontal template, symmetrised), deformed by those
parameters and projected, so the stored landmarks are exactly the ones the renderer drew: masks,
crops and mouth measurements work as on real data, with no detector. Ground truth per frame:
`mouth_open` (0 shut .. 1 wide), `eye_open` (0 shut .. ~1.6 wide), `pose` (yaw, pitch, roll in degrees,
tx, ty in crop fractions, scale); per clip: emotion and level.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline import EMOTIONS, FPS, NUM_LANDMARKS, SAMPLE_RATE, SAMPLES_PER_FRAME
from data_pipeline import faces

# MediaPipe's face mesh of the public-domain portrait skimage.data.astronaut(), refined (478 points):
# pixels / face height (forehead top 10 to chin 152), origin between the eye corners, eye line
# levelled, left/right symmetrised by averaging each point with its mirror partner. float16 (478, 3).
_TEMPLATE_F16_B64 = (
  "AACaNTSvAAAGNLSzAABjNFqwO6g9L12yAADDMhy0AAD8MNyzAAAvJeKwXrSIGhYcAAC2rDmwAADRr5qwAADNtPqvAADGNb6u"
  "AADuNQOuAAAENgqtAAAON0WrAAA9Nx6sAAB3N7WsAAC8N2WsAAAuOM2oAABONAOzsKkpNN2xcLadsEUxULFWKAWogbKlKGmn"
  "pLNOKPGkl7TcIq4hTbDWJkSnF7OprKmqrLFPrISqMLQ4rBepmrRsqgmmCrUFKBso+7CYOOkmlbQzoAEk2LbYIC00sLVXHk8s"
  "nbKpMUer6KtzNf+uUqviNROtVq+INfOs27CENdionK7FNWmrb7CvNZGmsrJUNiYpdaj7M5iz9Ki2Mgq0UrX7rGelcq/ELXys"
  "XrDUMomwZbASMjCwKbUhMdOenKgQMXmz2rM2r76twbSNrrOr5bWSslctVq3trLOvd7BGquSozrOINVEpU7bQNXM1+q6cM/qv"
  "zKwFNBKwc7KPNWIpI7KeNXMoC7Xtr6apiLAfM5OvpLHQrhevzLFFsNuvELONtJasgrVTsfshXbLbslCuqLUBrrUgE7aBr1gt"
  "06upNXau/K6qNWyspLCcNRyoc67DM3OvSrKWNc8onrEfNv8kEbKhNV0oV62sM82xV7C3NfKlba7QNYKqGqvuNZesJKwfOB2o"
  "3KuhNwCsr6tcNz2sWasjNzmr3Kr4NleqQLBzNlSeerCANiqivbCcNvej67DCNiifPbLRNICo2bZlMd80I4piNNSwDrEfNiUl"
  "WbEaNnIkvqtBNASwNLCtM4ytUqwlNBmwEbHHLgirNbP2L4WpyLBlMoSt/rQQtFkUmbRqshCqG7RxsIWtjbEaN9IkBK7Cr3iw"
  "yq7jsg6wr6/EtESvULTdJoWbq7WsKisrPa8EJTmmILVDqH4goa2CLIyt367AMtOxXbbpLHwuRbXULEkmgrSkLYqgv7J5LQin"
  "ErHCLLuopK/BK1qqqag7J1mwbLa+MFkujLUCqUcmHqdHNBeyl68gMGWt5rbyHS01vq20KWyr2rBYMjGs0rQ7n+sl5a7NMWex"
  "rbY7NNk1K68zIAGklKxYMbGyNLVYNyoxELUTOEEz4LZNMYwz87V2NkgybbZ2q9kwLLH8OFwqJKVPNBSyBrHOMFGsMrZWIcQu"
  "kLNEJGKkibLtJLCm1bErNrQmdbY1M8gvg62DOWErorLuOFUwIrSPOLAxAADTslqwAACZOfYphbFYJC6njrCEIuqlz6+eIR+k"
  "9rUlquUrw7CRptWnzrFOqfGo4bLOqcyo8rP2qCanSrTappqjwbYArQY0IbRtIRCeAACzNKivzrCfNI6s7a6VM0CwMqymNFSv"
  "AAAzpxawUbQlOEUw+LKQOBQuoq1EOakhwLUhN5M07K++nKClBKyxLYSwAABdOT4Y4rBFObQtxLb/M6wzPa7ANsGnr67eNqyo"
  "Ca8NN0epPK9LN2ioEbDJN22gZLGiNVsfmrGUNVAeyrGFNe0dW7MXNWQdxrXOM/Ep0asWKvGud60tpdKp8a5DpJ+nSbGoNXYg"
  "3bVzNacvgaqWpVauh7A0OCohAAD5Ls6yeqilLHqxAAA8LMuxAq6lMFywAAD9OISlAACLOFGnrKx5OLWkfbOyNoUr6LExM2Oq"
  "JrKiN/MoaLTsMmKoL7MiNJKn/7RZNMAhV63mOIihwq8aMcCuL7RkN9YtsbIqODQsUrTENbsqW7awNJ8wEbUUNl0tfbZINYEz"
  "L7SxNPUXtq37LhGvHK5uMxKy/a9XM6ewyKzBMgizV6/eqoSrorEcrVisY7N/rTesaLQGrWSq5rTQq4WmLrW8ivgo47ajLaQ0"
  "ubTsKXMjG7RAK46fpbJ3K8ulKbGwKqGnArBzKUqoZq4vKL2o4baZLcU1CrB4MwCwFawOMG6xOazNM7ayyKkjNHKyQKzeM2ay"
  "ia+4Mw2vKKkzNAWyZKhANAGyXa6uIJKlIq22I7upT6wYJaqsdbRcpEqX17Tup8SROyg9L12yXjSIGhYcKCkzNAWycDadsEUx"
  "UDFWKAWogTKlKGmnpDNOKPGklzTcIq4hTTDWJkSnFzOprKmqrDFPrISqMDQ4rBepmjRsqgmmCjUFKBso+zCYOOkmlTQzoAEk"
  "xjZiImIysDVXHk8snTKpMUer6CtzNf+uhyvVNY+thS91NTet9jB4NRGp/C6qNWyspDCcNRyosjJUNiYpdSj7M5iz9Ci2Mgq0"
  "UjX7rGelci/ELXysXjDUMomwZTASMjCwKTUhMdOenCgQMXmz2jM2r76twTSNrrOr5TWSslctVi3trLOvdzBGquSozjOINVEp"
  "UzbQNXM17S6VM0CwzCwFNBKwiDKLNa4pSjKWNc8oCzXtr6apiDAfM5OvpDHQrhevzDFFsNuvEDONtJasgjVTsfshXTLbslCu"
  "qDUBrrUgEzaBr1gt0yupNXauVi+INfOs2zCENdiocy7DM3OvczKPNWIpnjEfNv8kIzKeNXMoVy2sM82xbzCvNZGmnC7FNWmr"
  "UiviNROtJCwfOB2o3CuhNwCsrytcNz2sWSsjNzmr3Cr4NleqQDBzNlSeejCANiqivTCcNvej6zDCNiifPTLRNICo0zaCMfY1"
  "DjEfNiUlWTEaNnIkvitBNASwNDCtM4ytUiwlNBmwETHHLgirNTP2L4WpsjBxMteu/jQQtFkUmTRqshCqGzRxsIWtjTEaN9Ik"
  "BC7Cr3iwyi7jsg6wry/EtESvUDTdJoWbqzWsKisrPS8EJTmmIDVDqH4goS2CLIyt3y7AMtOxXTbpLHwuRTXULEkmgjSkLYqg"
  "vzJ5LQinEjHCLLuopC/BK1qqqSg7J1mwbDa+MFkujDUCqUcmJCVPNBSyly8gMGWt2DbYIC00vi20KWyr2jBYMjGs0jQ7n+sl"
  "5S7NMWexrTY7NNk1Ky8zIAGklCxYMbGyNDVYNyoxEDUTOEEz4DZNMYwz8zV2NkgybTZ2q9kwLDH8OFwqqSRZNDixBjHOMFGs"
  "MjZWIcQukDNEJGKkiTLtJLCm1TErNrQmdTY1M8gvgy2DOWErojLuOFUwIjSPOLAxhTFYJC6njjCEIuqlzy+eIR+k9jUlquUr"
  "wzCRptWnzjFOqfGo4TLOqcyo8jP2qCanSjTappqjwTYArQY0ITRtIRCezjCfNI6s3C6NM4OwMiymNFSvUTQlOEUw+DKQOBQu"
  "oi1EOakhwDUhN5M07C++nKClBCyxLYSw4jBFObQtxDb/M6wzPS7ANsGnry7eNqyoCS8NN0epPC9LN2ioETDJN22gmjGUNVAe"
  "yjGFNe0d4jF9NRYdWzMXNWQdxjXOM/Ep0SsWKvGudy0tpdKp8S5DpJ+nZDGiNVsf3TVzNacvgSqWpVauhzA0OCoheiilLHqx"
  "Ai6lMFywrCx5OLWkfTOyNoUr6DExM2OqJjKiN/MoaDTsMmKoLzMiNJKn/zRZNMAhVy3mOIihwi8aMcCuLzRkN9YtsTIqODQs"
  "UjTENbsqWzawNJ8wETUUNl0tfTZINYEzLzSxNPUXti37LhGvHC5uMxKy/S9XM6ewyCzBMgizVy/eqoSrojEcrVisYzN/rTes"
  "aDQGrWSq5jTQq4WmLjW8ivgo4zakLQszuTTsKXMjGzRAK46fpTJ3K8ulKTGwKqGnAjBzKUqoZi4vKL2o4zajLaQ0CjB4MwCw"
  "FSwOMG6xKiy8MwazsCkpNN2xQCzeM2ayiS+4Mw2vZChANAGyHidHNBeyXS6uIJKlIi22I7upTywYJaqsdTRcpEqX1zTup8SR"
  "hrKdoZKkSbF7oZKkwrLEqRWnx7PLoZKkjrIjJaOlhjKdoZKkxzPLoZKkgjJ8qZKkSTF7oZKkhjIhJZ+l"
)

LEVEL_ALPHA = {1: 0.5, 2: 1.0, 3: 1.5}  # MEAD's intensity levels -> expression scale


@dataclasses.dataclass(frozen=True)
class ExpressionShape:
  """Facial action of one emotion at alpha 1 (units: face heights, or factors)."""
  brow_raise: float = 0.0  # whole brow up (+) / down (-)
  brow_inner: float = 0.0  # inner ends up (+, sad/worried) / down (-, angry)
  eye_open: float = 0.0  # wider (+) / narrower (-)
  mouth_corner: float = 0.0  # smile (+) / frown (-)
  mouth_width: float = 0.0  # stretched (+) / pursed (-)
  upper_lip: float = 0.0  # upper lip raised (disgust)
  jaw: float = 0.0  # extra mouth opening held through the clip (surprise)


EXPRESSIONS = {
  "happy": ExpressionShape(brow_raise=0.2, eye_open=-0.35, mouth_corner=1.0, mouth_width=0.6, jaw=0.05),
  "angry": ExpressionShape(brow_raise=-0.6, brow_inner=-1.0, eye_open=-0.3, mouth_corner=-0.4, mouth_width=-0.3),
  "sad": ExpressionShape(brow_raise=-0.1, brow_inner=1.0, eye_open=-0.35, mouth_corner=-0.9, mouth_width=-0.1),
  "surprised": ExpressionShape(brow_raise=1.0, brow_inner=0.2, eye_open=0.8, mouth_width=-0.3, jaw=0.3),
  "fearful": ExpressionShape(brow_raise=0.6, brow_inner=0.8, eye_open=0.6, mouth_corner=-0.3, mouth_width=0.6,
                             jaw=0.1),
  "disgusted": ExpressionShape(brow_raise=-0.4, brow_inner=-0.4, eye_open=-0.45, mouth_corner=-0.5, upper_lip=1.0),
  "worried": ExpressionShape(brow_raise=0.3, brow_inner=1.0, eye_open=0.1, mouth_corner=-0.4, mouth_width=-0.1),
  "neutral": ExpressionShape(),
}


@dataclasses.dataclass(frozen=True)
class Prosody:
  """Voice of one emotion at alpha 1, relative to the speaker's neutral voice."""
  pitch: float = 1.0  # f0 factor
  pitch_range: float = 1.0  # intonation range factor
  rate: float = 1.0  # syllables per second factor
  energy: float = 1.0  # loudness factor
  tremor: float = 0.0  # vibrato depth (fraction of f0) at 6 Hz
  tilt: float = 1.0  # spectral tilt factor (< 1 brighter / tenser voice)
  motion: float = 1.0  # head motion amplitude factor
  head_pitch: float = 0.0  # held head pitch in degrees (+ = down)


PROSODY = {
  "happy": Prosody(pitch=1.15, pitch_range=1.6, rate=1.1, energy=1.15, tilt=0.8, motion=1.3),
  "angry": Prosody(pitch=1.1, pitch_range=1.3, rate=1.15, energy=1.5, tilt=0.6, motion=1.2, head_pitch=2.0),
  "sad": Prosody(pitch=0.9, pitch_range=0.5, rate=0.8, energy=0.65, tilt=1.4, motion=0.6, head_pitch=4.0),
  "surprised": Prosody(pitch=1.25, pitch_range=1.9, energy=1.2, tilt=0.9, motion=1.1, head_pitch=-3.0),
  "fearful": Prosody(pitch=1.2, pitch_range=1.1, rate=1.2, energy=0.9, tremor=0.03, tilt=1.1, motion=0.8),
  "disgusted": Prosody(pitch=0.95, pitch_range=0.8, rate=0.9, tilt=1.0, motion=0.9, head_pitch=-1.0),
  "worried": Prosody(pitch=1.05, pitch_range=0.7, rate=0.95, energy=0.85, tremor=0.02, tilt=1.2, motion=0.8,
                     head_pitch=1.5),
  "neutral": Prosody(),
}

# Vowels: (F1, F2, F3) in Hz and jaw openness in [0, 1].
VOWELS = (((800, 1200, 2500), 1.0), ((500, 1900, 2600), 0.6), ((300, 2300, 3000), 0.25),
          ((500, 900, 2400), 0.7), ((320, 800, 2300), 0.3), ((650, 1700, 2500), 0.8))


# ------------------------------------------------------------------------------------------- template

@functools.lru_cache(maxsize=1)
def template_landmarks() -> np.ndarray:
  """The neutral face (478, 3) in face units. The portrait smiles with parted lips, so the mouth is
  closed (the lower inner lip put onto the upper one, the jaw following by the same field that opens
  it) and the mouth corners are lowered onto the mouth line."""
  raw = np.frombuffer(base64.b64decode(_TEMPLATE_F16_B64), np.float16).reshape(NUM_LANDMARKS, 3)
  points = raw.astype(np.float64)
  gap = points[_INNER_LOWER, 1] - points[_INNER_UPPER, 1]
  weights = _jaw_weights(points)
  points[:, 1] -= weights * float(gap[len(gap) // 2])
  points[_INNER_LOWER, 1] = points[_INNER_UPPER, 1]
  cx, _, half_width = _mouth_frame(points)
  points[_LIPS, 1] += 0.05 * np.clip(np.abs(points[_LIPS, 0] - cx) / half_width, 0.0, 1.0) ** 2
  return points


# Inner lip contour halves, paired from corner to corner (78 .. 308).
_INNER_UPPER = [191, 80, 81, 82, 13, 312, 311, 310, 415]
_INNER_LOWER = [95, 88, 178, 87, 14, 317, 402, 318, 324]
_OUTER_UPPER = [185, 40, 39, 37, 0, 267, 269, 270, 409]
_OUTER_LOWER = [146, 91, 181, 84, 17, 314, 405, 321, 375]
_CORNERS = [61, 291, 78, 308]
_LIPS = sorted(set(faces.LIPS_OUTER) | set(faces.LIPS_INNER))
_UPPER_LIPS = _INNER_UPPER + _OUTER_UPPER


def _mouth_frame(points: np.ndarray) -> tuple[float, float, float]:
  """(centre x, mouth-line y, half width) of the mouth."""
  corners = points[[61, 291]]
  return float(corners[:, 0].mean()), float(points[[13, 14], 1].mean()), float(abs(corners[1, 0] - corners[0, 0]) / 2)


def _jaw_weights(points: np.ndarray) -> np.ndarray:
  """How much each point follows the jaw when the mouth opens: 1 for the lower lip (tapering to 0.5
  at the corners) and the chin, less towards the ears, 0 above the mouth."""
  cx, mouth_y, half_width = _mouth_frame(points)
  lateral = np.clip((np.abs(points[:, 0] - cx) - 0.15) / 0.3, 0.0, 1.0)
  weights = np.clip((points[:, 1] - mouth_y) / 0.08, 0.0, 1.0) * (1.0 - 0.6 * lateral)
  lower = _INNER_LOWER + _OUTER_LOWER
  taper = np.clip(np.abs(points[lower, 0] - cx) / half_width, 0.0, 1.0)
  weights[lower] = 1.0 - 0.5 * taper ** 2
  weights[_CORNERS] = 0.5
  weights[_UPPER_LIPS] = 0.0
  return weights


# ------------------------------------------------------------------------------------------ identities

SKIN_TONES = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 99), (161, 102, 70), (110, 70, 50))
HAIR_COLOURS = ((30, 22, 18), (70, 45, 30), (120, 80, 45), (190, 150, 90), (150, 150, 150), (140, 50, 30))
IRIS_COLOURS = ((70, 45, 25), (40, 90, 150), (60, 110, 70), (100, 80, 50))


@dataclasses.dataclass(frozen=True)
class Identity:
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
  lips = tuple(int(c) for c in np.clip(np.array(skin) * np.array([0.85, 0.55, 0.55]) + [20, 0, 0], 0, 255))
  background = rng.uniform(40, 220, size=3)
  return Identity(
    index=index, skin=skin, hair=_colour(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 10),
    hair_style=int(rng.integers(3)), iris=_colour(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 10),
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


# ---------------------------------------------------------------------------------------------- speech

def _scaled(value: float, alpha: float) -> float:
  """An emotion factor at intensity alpha (1 = neutral)."""
  return 1.0 + (value - 1.0) * alpha


def synthesize_speech(rng: np.random.Generator, num_frames: int, identity: Identity, emotion: str,
                      alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Speech-like audio for `num_frames` video frames.

  Returns (audio int16 (num_frames * 640,), mouth opening per frame (num_frames,) in [0, 1],
  stress per frame (num_frames,) in [0, 1], which drives nods). The mouth opening of frame i is the
  mean articulatory opening over its 40 ms, the interval whose audio is samples [640 i, 640 (i+1)).
  """
  prosody = PROSODY[emotion]
  rate = _scaled(prosody.rate, alpha)
  num_samples = num_frames * SAMPLES_PER_FRAME
  control_rate = 400  # Hz: articulation parameters are piecewise-smooth at this rate
  hop = SAMPLE_RATE // control_rate
  steps = num_samples // hop + 1
  voicing = np.zeros(steps)  # voiced amplitude envelope
  opening = np.zeros(steps)  # jaw/lip opening
  noise = np.zeros(steps)  # frication / burst envelope
  formants = np.tile(np.array([500.0, 1500.0, 2500.0]), (steps, 1))
  accent = np.zeros(steps)  # pitch accents / stress
  phrase_position = np.zeros(steps)  # 0 .. 1 through each phrase (declination)

  def span(start: float, duration: float) -> slice:
    return slice(int(start * control_rate), min(steps, int((start + duration) * control_rate)))

  time = rng.uniform(0.05, 0.3)
  end = num_samples / SAMPLE_RATE
  while time < end - 0.2:
    phrase_start, syllables = time, int(rng.integers(3, 9))
    for _ in range(syllables):
      kind = rng.choice(["none", "fricative", "plosive", "nasal"], p=[0.35, 0.25, 0.25, 0.15])
      if kind == "fricative":
        duration = rng.uniform(0.04, 0.07) / rate
        noise[span(time, duration)] = 0.35
        opening[span(time, duration)] = 0.12
        time += duration
      elif kind == "plosive":
        duration = rng.uniform(0.03, 0.05) / rate  # closure: lips shut, silence
        time += duration
        noise[span(time, 0.012)] = 0.6  # release burst
        opening[span(time, 0.012)] = 0.2
        time += 0.012
      elif kind == "nasal":
        duration = rng.uniform(0.04, 0.07) / rate  # voiced, lips closed
        voicing[span(time, duration)] = 0.3
        formants[span(time, duration)] = (250, 1200, 2300)
        time += duration
      (f1, f2, f3), openness = VOWELS[rng.integers(len(VOWELS))]
      duration = rng.uniform(0.12, 0.26) / rate
      vowel = span(time, duration)
      length = vowel.stop - vowel.start
      if length > 0:
        shape = np.sin(np.linspace(0, np.pi, length)) ** 0.6  # rise and fall of the syllable
        voicing[vowel] = np.maximum(voicing[vowel], shape * (0.55 + 0.45 * openness))
        opening[vowel] = np.maximum(opening[vowel], shape * openness)
        formants[vowel] = (f1, f2, f3)
        accent[vowel] = rng.uniform(-1, 1) if rng.random() < 0.4 else 0.0
      time += duration + rng.uniform(0.0, 0.04) / rate
      if time >= end - 0.2:
        break
    phrase = span(phrase_start, time - phrase_start)
    phrase_position[phrase] = np.linspace(0, 1, phrase.stop - phrase.start)
    time += rng.uniform(0.25, 0.6) / rate  # pause between phrases: mouth at rest

  # Articulators move smoothly: 25 ms moving average on every control track.
  kernel = np.ones(10) / 10
  smooth = lambda x: np.convolve(x, kernel, mode="same")  # noqa: E731
  voicing, opening, noise, accent = smooth(voicing), smooth(opening), smooth(noise), smooth(accent)
  formants = np.stack([smooth(formants[:, k]) for k in range(3)], axis=1)

  # Pitch: declination over each phrase, accents, tremor, slow drift.
  pitch_range = 0.12 * _scaled(prosody.pitch_range, alpha)
  f0 = identity.f0 * _scaled(prosody.pitch, alpha) * (
    1 + pitch_range * (0.5 - phrase_position) + pitch_range * 0.8 * accent)
  control_time = np.arange(steps) / control_rate
  f0 *= 1 + prosody.tremor * alpha * np.sin(2 * np.pi * 6.0 * control_time)
  f0 *= 1 + 0.01 * np.sin(2 * np.pi * 0.7 * control_time + rng.uniform(0, 6.3))

  sample_time = np.arange(num_samples) / SAMPLE_RATE
  at_samples = lambda x: np.interp(sample_time, control_time, x)  # noqa: E731
  f0_s = at_samples(f0)
  phase = 2 * np.pi * np.cumsum(f0_s) / SAMPLE_RATE
  harmonics = int(min(48, 4000 // identity.f0))
  tilt = _scaled(prosody.tilt, alpha)
  # Harmonic amplitudes at control rate: formant resonances (Lorentzian peaks) times spectral tilt.
  frequencies = f0[:, None] * np.arange(1, harmonics + 1)[None, :]
  envelope = sum(gain / (1 + ((frequencies - formants[:, k:k + 1]) / bandwidth) ** 2)
                 for k, (gain, bandwidth) in enumerate(((1.0, 90.0), (0.6, 110.0), (0.3, 150.0))))
  envelope = envelope * (frequencies / 100.0) ** (-0.6 * tilt) * voicing[:, None]
  voiced = np.zeros(num_samples, np.float32)
  for k in range(harmonics):
    voiced += (at_samples(envelope[:, k]) * np.sin((k + 1) * phase)).astype(np.float32)
  hiss = np.diff(rng.standard_normal(num_samples + 1)).astype(np.float32)  # white noise tilted upwards
  breath = 0.04 * max(tilt - 1.0, 0.0) * at_samples(voicing)  # breathy voice (sad, worried)
  signal = voiced + hiss * (0.25 * at_samples(noise) + breath)
  energy = _scaled(prosody.energy, alpha)
  audio = np.clip(signal * 5000.0 * energy, -32767, 32767).astype(np.int16)

  per_frame = lambda x: at_samples(x).reshape(num_frames, SAMPLES_PER_FRAME).mean(axis=1)  # noqa: E731
  return audio, np.clip(per_frame(opening), 0.0, 1.0), np.clip(per_frame(np.abs(accent) * voicing), 0.0, 1.0)


# ------------------------------------------------------------------------------------ motion and blinks

def head_motion(rng: np.random.Generator, num_frames: int, stress: np.ndarray, emotion: str,
                alpha: float, scale: float = 1.0) -> np.ndarray:
  """Pose per frame (num_frames, 6): yaw, pitch, roll (degrees), tx, ty (crop fractions), scale.
  `scale` multiplies the movement (sway, nods, drift, zoom), not the emotion's held head pitch."""
  prosody = PROSODY[emotion]
  amplitude = _scaled(prosody.motion, alpha) * scale
  time = np.arange(num_frames) / FPS
  pose = np.zeros((num_frames, 6))
  for axis, degrees in enumerate((4.0, 2.5, 2.0)):
    for frequency in rng.uniform(0.08, 0.5, size=3):
      pose[:, axis] += amplitude * degrees / 2 * np.sin(2 * np.pi * frequency * time + rng.uniform(0, 2 * np.pi))
  kernel = np.exp(-0.5 * (np.arange(-6, 7) / 3.0) ** 2)
  pose[:, 1] += 3.0 * amplitude * np.convolve(stress, kernel / kernel.sum(), mode="same")  # nods on stress
  pose[:, 1] += prosody.head_pitch * alpha
  for axis, size in ((3, 0.012), (4, 0.008)):
    pose[:, axis] = amplitude * size * np.sin(2 * np.pi * rng.uniform(0.05, 0.2) * time + rng.uniform(0, 6.3))
  pose[:, 5] = 1.0 + 0.01 * scale * np.sin(2 * np.pi * rng.uniform(0.05, 0.15) * time + rng.uniform(0, 6.3))
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


# -------------------------------------------------------------------------------------------- geometry

def face_points(identity: Identity, expression: ExpressionShape, alpha: float, mouth_open: float,
                lid: float) -> tuple[np.ndarray, float]:
  """The identity's face with an expression, mouth opening and eyelids, in face units (478, 3);
  also the eye-opening factor applied (ground truth `eye_open`)."""
  points = template_landmarks().copy()
  cx, mouth_y, half_width = _mouth_frame(points)
  # Identity shape.
  points[:, 0] *= identity.face_width
  below_mouth = np.clip((points[:, 1] - mouth_y) / 0.25, 0.0, 1.0)
  points[:, 0] *= 1.0 + (identity.jaw_width - 1.0) * below_mouth
  lips = _LIPS
  points[lips, 0] = cx + (points[lips, 0] - cx) * identity.mouth_width * (1 + 0.12 * expression.mouth_width * alpha)
  # Brows: raise, and inner ends up/down (weight 1 at the inner end, 0 at the outer end).
  for brow in (faces.RIGHT_BROW, faces.LEFT_BROW):
    index = list(brow)
    inner = 1.0 - np.clip((np.abs(points[index, 0]) - 0.05) / 0.3, 0.0, 1.0)
    points[index, 1] -= (0.035 * expression.brow_raise + 0.03 * expression.brow_inner * inner) * alpha
  # Eyes: scale about each eye's centre; the upper lid closes more than the lower rises.
  eye_open = float(np.clip(1.0 + 0.45 * expression.eye_open * alpha, 0.2, 1.6) * lid)
  for eye, iris in ((faces.RIGHT_EYE, faces.RIGHT_IRIS), (faces.LEFT_EYE, faces.LEFT_IRIS)):
    index = list(eye) + list(iris)
    centre = points[list(eye), :2].mean(axis=0)
    points[index, :2] = centre + (points[index, :2] - centre) * identity.eye_size
    contour = np.array(eye)
    upper = contour[points[contour, 1] < centre[1]]
    lower = contour[points[contour, 1] >= centre[1]]
    points[upper, 1] = centre[1] + (points[upper, 1] - centre[1]) * eye_open
    points[lower, 1] = centre[1] + (points[lower, 1] - centre[1]) * (0.6 + 0.4 * min(eye_open, 1.0))
  # Mouth corners and upper lip, tapering from the corners / centre.
  spread = np.clip(np.abs(points[lips, 0] - cx) / (half_width * identity.mouth_width), 0.0, 1.0)
  points[lips, 1] -= 0.025 * expression.mouth_corner * alpha * spread ** 2
  upper = _UPPER_LIPS
  points[upper, 1] -= 0.015 * expression.upper_lip * alpha * (1 - np.clip(
    np.abs(points[upper, 0] - cx) / (half_width * identity.mouth_width), 0.0, 1.0) ** 2)
  # Jaw: the lower lip and chin follow the opening.
  points[:, 1] += 0.10 * mouth_open * _jaw_weights(template_landmarks())
  points[:, 1] *= identity.face_length
  return points, eye_open


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
  y, p, r = np.radians([yaw, pitch, roll])
  yaw_m = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
  pitch_m = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
  roll_m = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
  return roll_m @ pitch_m @ yaw_m


_HEAD_CENTRE = np.array([0.0, 0.25, 0.45])  # rotation pivot, face units (behind the face)
# Face units -> crop: the crop is what `faces.clip_crop_box` takes around a real face (face size
# x1.9, centre shifted down by 5%), so synthetic frames look like prepared real ones.
_CROP_SCALE = 1.0 / faces.CropConfig().enlarge
_CROP_CENTRE = np.array([0.5, 0.5 - faces.CropConfig().shift_down])
_FACE_BOX_CENTRE_Y = 0.2  # the template's landmark box centre (forehead -0.3 .. chin 0.7)


def project(points: np.ndarray, pose: np.ndarray, identity: Identity, face_scale: float = 1.0
            ) -> np.ndarray:
  """Face-unit points (N, 3) -> crop coordinates in [0, 1] (N, 2) under a pose row (6,);
  `face_scale` > 1 frames the face tighter than the training crop (a closer camera)."""
  yaw, pitch, roll, tx, ty, scale = pose
  rotated = (points - _HEAD_CENTRE) @ _rotation(yaw, pitch, roll).T + _HEAD_CENTRE
  xy = rotated[:, :2] - [0.0, _FACE_BOX_CENTRE_Y]
  return _CROP_CENTRE + [tx, ty] + xy * _CROP_SCALE * identity.head_scale * scale * face_scale


def _hair_points(points: np.ndarray, identity: Identity) -> tuple[np.ndarray, np.ndarray]:
  """(back hair outline, fringe outline) in face units (N, 3), from the face oval."""
  oval = points[list(faces.FACE_OVAL)]
  centre = np.array([0.0, 0.18, 0.0])
  volume = 1.12 if identity.hair_style != 2 else 1.04
  back = centre + (oval - centre) * [volume, volume, 1.0]
  back[:, 2] += 0.05
  if identity.hair_style == 1:  # long hair falls to the shoulders beside the face, not under the chin
    low = back[:, 1] > 0.2
    lateral = np.clip((np.abs(back[low, 0]) - 0.2) / 0.25, 0.0, 1.0)
    back[low, 1] = 0.2 + (back[low, 1] + 0.45 - 0.2) * lateral
    back[low, 0] *= 1.15
  hairline_y = -identity.hairline - 0.05 * (identity.hair_style == 2)
  top = back[back[:, 1] < hairline_y + 0.06]
  arc_x = np.linspace(top[:, 0].max(), top[:, 0].min(), 9)
  arc = np.stack([arc_x, hairline_y + 0.10 * (arc_x / max(abs(arc_x).max(), 1e-6)) ** 2, np.full(9, -0.1)], 1)
  fringe = np.concatenate([top[np.argsort(np.arctan2(top[:, 1] - 0.18, top[:, 0]))], arc[::-1]])
  return back, fringe


# ---------------------------------------------------------------------------------------------- render

def _supersampling(resolution: int) -> int:
  return 4 if resolution <= 128 else 2 if resolution <= 384 else 1


class Renderer:
  """Draws one identity's frames at one resolution (the static background is drawn once)."""

  def __init__(self, identity: Identity, resolution: int, face_scale: float = 1.0):
    self.identity = identity
    self.resolution = resolution
    self.face_scale = face_scale
    self.size = resolution * _supersampling(resolution)
    size = self.size
    ramp = np.linspace(0, 1, size)[:, None, None]
    background = (1 - ramp) * np.array(identity.background_top) + ramp * np.array(identity.background_bottom)
    image = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # Shoulders and neck do not follow the head's sway: the body stays put as in real footage.
    neck = project(np.array([[-0.17, 0.45, 0.2], [0.17, 0.45, 0.2], [0.2, 1.3, 0.2], [-0.2, 1.3, 0.2]]),
                   np.array([0, 0, 0, 0, 0, 1.0]), identity, face_scale) * size
    draw.ellipse((size * -0.05, size * 0.86, size * 1.05, size * 1.6), fill=identity.shirt)
    shade = tuple(int(c * 0.85) for c in identity.skin)
    draw.polygon([tuple(p) for p in neck], fill=shade)
    self.background = image

  def __call__(self, points_3d: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame (R, R, 3) uint8 and its landmarks (478, 2) in [0, 1] crop coordinates."""
    identity, size = self.identity, self.size
    landmarks = project(points_3d, pose, identity, self.face_scale)
    pixels = landmarks * size
    polygon = lambda index: [tuple(p) for p in pixels[list(index)]]  # noqa: E731
    back_hair, fringe = (project(p, pose, identity, self.face_scale) * size
                         for p in _hair_points(points_3d, identity))
    image = self.background.copy()
    draw = ImageDraw.Draw(image)
    draw.polygon([tuple(p) for p in back_hair], fill=identity.hair)
    draw.polygon(polygon(faces.FACE_OVAL), fill=identity.skin)
    draw.polygon([tuple(p) for p in fringe], fill=identity.hair)
    height = np.linalg.norm(pixels[faces.CHIN] - pixels[faces.FOREHEAD_TOP])
    brow_colour = tuple(int(c * 0.7) for c in identity.hair)
    for brow in (faces.RIGHT_BROW, faces.LEFT_BROW):
      draw.polygon(polygon(brow), fill=brow_colour)
      draw.line(polygon(brow) + polygon(brow)[:1], fill=brow_colour,
                width=max(1, int(0.012 * height * identity.brow_thickness)))
    nose_colour = tuple(int(c * 0.78) for c in identity.skin)
    draw.line([tuple(pixels[i]) for i in (168, 197, 5, 4)], fill=tuple(int(c * 0.9) for c in identity.skin),
              width=max(1, int(0.015 * height)))
    for nostril in (98, 327):
      x, y = pixels[nostril]
      r = 0.018 * height
      draw.ellipse((x - r, y - r * 0.6, x + r, y + r * 0.6), fill=nose_colour)
    # Eyes: white, then iris and pupil clipped to the eye opening.
    eye_mask = Image.new("L", (size, size), 0)
    mask_draw = ImageDraw.Draw(eye_mask)
    for eye in (faces.RIGHT_EYE, faces.LEFT_EYE):
      draw.polygon(polygon(eye), fill=(245, 245, 240))
      mask_draw.polygon(polygon(eye), fill=255)
    irises = image.copy()
    iris_draw = ImageDraw.Draw(irises)
    for eye, iris in ((faces.RIGHT_EYE, faces.RIGHT_IRIS), (faces.LEFT_EYE, faces.LEFT_IRIS)):
      x, y = pixels[iris[0]]
      r = 0.3 * np.ptp(pixels[list(eye), 0])
      iris_draw.ellipse((x - r, y - r, x + r, y + r), fill=identity.iris)
      iris_draw.ellipse((x - r * 0.45, y - r * 0.45, x + r * 0.45, y + r * 0.45), fill=(10, 10, 10))
    image.paste(irises, mask=eye_mask)
    for eye in (faces.RIGHT_EYE, faces.LEFT_EYE):
      draw.line(polygon(eye) + polygon(eye)[:1], fill=(40, 30, 30), width=max(1, int(0.008 * height)))
    # Mouth: lips, then the dark opening with upper teeth clipped to it.
    draw.polygon(polygon(faces.LIPS_OUTER), fill=identity.lips)
    inner = polygon(faces.LIPS_INNER)
    if np.ptp(pixels[list(faces.LIPS_INNER), 1]) > 0.5:
      mouth_mask = Image.new("L", (size, size), 0)
      ImageDraw.Draw(mouth_mask).polygon(inner, fill=255)
      cavity = image.copy()
      cavity_draw = ImageDraw.Draw(cavity)
      cavity_draw.polygon(inner, fill=(70, 20, 25))
      teeth = pixels[_INNER_UPPER]
      teeth_bottom = teeth + [0, 0.03 * height]
      cavity_draw.polygon([tuple(p) for p in np.concatenate([teeth, teeth_bottom[::-1]])], fill=(235, 232, 220))
      image.paste(cavity, mask=mouth_mask)
    frame = image.resize((self.resolution, self.resolution), Image.Resampling.BOX) if size != self.resolution \
      else image
    return np.asarray(frame), landmarks.astype(np.float32)


# ----------------------------------------------------------------------------------------------- clips

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
    points, eye_open[i] = face_points(identity, expression, alpha, float(mouth_open[i]), float(lids[i]))
    frames[i], landmarks[i] = renderer(points, pose[i])
  return SyntheticClip(identity=identity, emotion=emotion, level=level, frames=frames, audio=audio,
                       landmarks=landmarks, mouth_open=mouth_open.astype(np.float32), eye_open=eye_open,
                       pose=pose.astype(np.float32))


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
    per_identity = sum(1 if e == "neutral" else len(self.levels) for e in self.emotions) * self.takes
    return self.identities * per_identity


def write_mead_layout(dst: str | os.PathLike, spec: SyntheticSpec, progress: bool = True) -> list[Path]:
  """Writes the spec's clips as MEAD does: `<speaker>/video/front/<emotion>/level_<k>/NNN.mp4` (video
  with its audio track) and `<speaker>/audio/<emotion>/level_<k>/NNN.m4a`. Returns the mp4 paths.
  MEAD calls fear `fear`, so `fearful` is written under that name (prepare maps it back)."""
  from tqdm import tqdm  # noqa: PLC0415

  from data_pipeline import media  # noqa: PLC0415

  dst = Path(dst)
  written = []
  for identity, emotion, level, take in tqdm(list(spec.clips()), desc="synthetic MEAD", disable=not progress):
    clip = spec.make_clip(identity, emotion, level, take)
    folder = {"fearful": "fear"}.get(emotion, emotion)
    name = f"{take + 1:03d}"
    video = dst / identity.speaker / "video" / "front" / folder / f"level_{level}" / f"{name}.mp4"
    media.write_video_file(video, clip.frames, clip.audio)
    media.write_audio_file(dst / identity.speaker / "audio" / folder / f"level_{level}" / f"{name}.m4a", clip.audio)
    written.append(video)
  return written
