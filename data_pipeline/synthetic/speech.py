"""Speech-like audio of a synthetic identity: syllables of voiced harmonics shaped by vowel
formants, consonant closures and noise bursts, with emotion-dependent prosody, and the mouth
opening that made each frame's sound."""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import SAMPLE_RATE, SAMPLES_PER_FRAME
from data_pipeline.synthetic.identity import Identity


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
  "angry": Prosody(pitch=1.1, pitch_range=1.3, rate=1.15, energy=1.5, tilt=0.6, motion=1.2,
                   head_pitch=2.0),
  "sad": Prosody(pitch=0.9, pitch_range=0.5, rate=0.8, energy=0.65, tilt=1.4, motion=0.6,
                 head_pitch=4.0),
  "surprised": Prosody(pitch=1.25, pitch_range=1.9, energy=1.2, tilt=0.9, motion=1.1,
                       head_pitch=-3.0),
  "fearful": Prosody(pitch=1.2, pitch_range=1.1, rate=1.2, energy=0.9, tremor=0.03, tilt=1.1,
                     motion=0.8),
  "disgusted": Prosody(pitch=0.95, pitch_range=0.8, rate=0.9, tilt=1.0, motion=0.9,
                       head_pitch=-1.0),
  "worried": Prosody(pitch=1.05, pitch_range=0.7, rate=0.95, energy=0.85, tremor=0.02, tilt=1.2,
                     motion=0.8, head_pitch=1.5),
  "neutral": Prosody(),
}

# Vowels: (F1, F2, F3) in Hz and jaw openness in [0, 1].
VOWELS = (((800, 1200, 2500), 1.0), ((500, 1900, 2600), 0.6), ((300, 2300, 3000), 0.25),
          ((500, 900, 2400), 0.7), ((320, 800, 2300), 0.3), ((650, 1700, 2500), 0.8))



def scaled_by_intensity(value: float, alpha: float) -> float:
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
  rate = scaled_by_intensity(prosody.rate, alpha)
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
  pitch_range = 0.12 * scaled_by_intensity(prosody.pitch_range, alpha)
  f0 = identity.f0 * scaled_by_intensity(prosody.pitch, alpha) * (
    1 + pitch_range * (0.5 - phrase_position) + pitch_range * 0.8 * accent)
  control_time = np.arange(steps) / control_rate
  f0 *= 1 + prosody.tremor * alpha * np.sin(2 * np.pi * 6.0 * control_time)
  f0 *= 1 + 0.01 * np.sin(2 * np.pi * 0.7 * control_time + rng.uniform(0, 6.3))

  sample_time = np.arange(num_samples) / SAMPLE_RATE
  at_samples = lambda x: np.interp(sample_time, control_time, x)  # noqa: E731
  f0_s = at_samples(f0)
  phase = 2 * np.pi * np.cumsum(f0_s) / SAMPLE_RATE
  harmonics = int(min(48, 4000 // identity.f0))
  tilt = scaled_by_intensity(prosody.tilt, alpha)
  # Harmonic amplitudes at control rate: formant resonances (Lorentzian peaks) times spectral tilt.
  frequencies = f0[:, None] * np.arange(1, harmonics + 1)[None, :]
  envelope = sum(gain / (1 + ((frequencies - formants[:, k:k + 1]) / bandwidth) ** 2)
                 for k, (gain, bandwidth) in enumerate(((1.0, 90.0), (0.6, 110.0), (0.3, 150.0))))
  envelope = envelope * (frequencies / 100.0) ** (-0.6 * tilt) * voicing[:, None]
  voiced = np.zeros(num_samples, np.float32)
  for k in range(harmonics):
    voiced += (at_samples(envelope[:, k]) * np.sin((k + 1) * phase)).astype(np.float32)
  # White noise tilted upwards.
  hiss = np.diff(rng.standard_normal(num_samples + 1)).astype(np.float32)
  breath = 0.04 * max(tilt - 1.0, 0.0) * at_samples(voicing)  # breathy voice (sad, worried)
  signal = voiced + hiss * (0.25 * at_samples(noise) + breath)
  energy = scaled_by_intensity(prosody.energy, alpha)
  audio = np.clip(signal * 5000.0 * energy, -32767, 32767).astype(np.int16)

  def per_frame(x):
    return at_samples(x).reshape(num_frames, SAMPLES_PER_FRAME).mean(axis=1)

  return (audio, np.clip(per_frame(opening), 0.0, 1.0),
          np.clip(per_frame(np.abs(accent) * voicing), 0.0, 1.0))
