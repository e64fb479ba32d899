"""Our wav2vec2 (JAX, jitted) against transformers' PyTorch model on this CPU, same random weights.

    .venv/bin/python benchmarks/audio_vs_torch.py [--seconds 60] [--repeats 3] [--rss-minutes 10]

Prints, for `--seconds` of speech-like audio through the wav2vec2-base architecture:
  full      - the whole model at once (all 13 hidden states), ours vs `Wav2Vec2Model`;
  features  - speech -> per-frame hidden states of all 12 layers at 25 fps (what A_w is built
              from): ours in 20 s chunks with 2 s context vs transformers' modules in one pass
              with Hallo's interpolation;
median wall time of `--repeats` runs after a warm-up (runs of the two sides interleaved, so
background load hits both alike) and the ratio ours / torch. Then the peak RSS of a fresh process
that turns `--rss-minutes` of audio into A_w (our model only, no torch imported).
Threads: torch uses all cores (torch.set_num_threads(os.cpu_count())), as XLA does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from etalk_jax.audio import params
from etalk_jax.audio.features import AudioFeatures, normalize
from etalk_jax.audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config

from svd_compare import interleaved_medians  # benchmarks/ sibling

RATE = 16000


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
  """Voiced harmonics with a wandering pitch, syllable-rate envelope, noise bursts, pauses."""
  rng = np.random.default_rng(seed)
  n = int(seconds * RATE)
  t = np.arange(n) / RATE
  pitch = 140 + 40 * np.sin(2 * np.pi * 0.3 * t) + 15 * np.sin(2 * np.pi * 2.1 * t)
  phase = 2 * np.pi * np.cumsum(pitch) / RATE
  voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
  syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 2
  pauses = (np.sin(2 * np.pi * 0.15 * t) > -0.8).astype(np.float64)
  noise = rng.standard_normal(n) * (np.sin(2 * np.pi * 1.3 * t) > 0.7)
  x = (voiced * syllables + 0.3 * noise) * pauses + 0.01 * rng.standard_normal(n)
  return (0.3 * x / np.abs(x).max()).astype(np.float32)


def compare(seconds: float, repeats: int) -> dict:
  import torch  # noqa: PLC0415 (PyTorch is optional, and the --rss-child run must go without it)
  import transformers  # noqa: PLC0415 (its Wav2Vec2Model is PyTorch: imported with torch)

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  torch_model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).eval()
  ours = params.wav2vec2_from_transformers(torch_model)
  audio = normalize(speech_like(seconds))
  frames = int(round(seconds * 25))

  graphdef, state = nnx.split(ours)

  @jax.jit
  def ours_full(state, audio):
    return nnx.merge(graphdef, state)(audio).hidden_states

  audio_jax = jax.device_put(audio[None])
  audio_torch = torch.from_numpy(audio[None])

  def torch_full():
    with torch.inference_mode():
      return torch_model(audio_torch, output_hidden_states=True).hidden_states

  featurizer = AudioFeatures(ours)

  def torch_features():  # Hallo's pipeline, one pass
    with torch.inference_mode():
      features = torch_model.feature_extractor(audio_torch[:, :frames * 640])
      features = torch.nn.functional.interpolate(features, size=frames, mode="linear",
                                                 align_corners=True).transpose(1, 2)
      hidden, _ = torch_model.feature_projection(features)
      out = torch_model.encoder(hidden, output_hidden_states=True)
      return out

  timings = interleaved_medians({
      "ours_full": lambda: jax.block_until_ready(ours_full(state, audio_jax)),
      "torch_full": torch_full,
      "ours_features": lambda: featurizer.frame_states(audio, frames),
      "torch_features": torch_features,
  }, repeats)
  return {
      "seconds_of_audio": seconds, "repeats": repeats, "cpu_count": os.cpu_count(),
      "full": {"ours_s": round(timings["ours_full"], 3),
               "torch_s": round(timings["torch_full"], 3),
               "ratio": round(timings["ours_full"] / timings["torch_full"], 3)},
      "features": {"ours_s": round(timings["ours_features"], 3),
                   "torch_s": round(timings["torch_features"], 3),
                   "ratio": round(timings["ours_features"] / timings["torch_features"], 3)},
  }


def rss_child(minutes: float) -> None:
  """Runs in a fresh process: 10 minutes of audio -> A_w, then prints peak RSS."""
  model = Wav2Vec2(Wav2Vec2Config(), rngs=nnx.Rngs(0))
  featurizer = AudioFeatures(model)
  audio = normalize(speech_like(minutes * 60, seed=1))
  start = time.perf_counter()
  a_w = featurizer.windows(audio)
  elapsed = time.perf_counter() - start
  peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps({"minutes_of_audio": minutes, "a_w_shape": list(a_w.shape),
                    "per_frame_states_mib": round(
                        (a_w.shape[0] + a_w.shape[1] - 1) * a_w[0, 0].nbytes / 2**20, 1),
                    "seconds": round(elapsed, 1), "peak_rss_mib": round(peak_mib, 1)}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=60.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rss-minutes", type=float, default=10.0)
  parser.add_argument("--skip-speed", action="store_true")
  parser.add_argument("--skip-rss", action="store_true")
  parser.add_argument("--rss-child", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.rss_child is not None:
    rss_child(args.rss_child)
    return
  if not args.skip_speed:
    print(json.dumps(compare(args.seconds, args.repeats), indent=2), flush=True)
  if not args.skip_rss:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(args.rss_minutes)],
                         check=True, capture_output=True, text=True)
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
  main()
