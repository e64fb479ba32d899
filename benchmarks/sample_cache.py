"""`etalk sample` twice, each in a fresh process, with JAX's persistent compilation cache that
`etalk` turns on (etalk_jax/cli.py `use_compilation_cache`): the first call compiles and fills
the cache, the second loads the same programs. Prints both calls' wall time (process start to
exit) and the generation time `etalk sample` reports, and the same pair with the cache off.

  .venv/bin/python benchmarks/sample_cache.py --checkpoint demo_out/checkpoint   # ~3 min

The portrait is skimage's astronaut photo (a real face, which MediaPipe finds), the speech
`--seconds` of the synthetic speaker's voice (data_pipeline.synthetic), the emotion "happy".
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data

from data_pipeline import FPS, media
from data_pipeline.synthetic import make_identity
from data_pipeline.synthetic.speech import synthesize_speech


def write_inputs(folder: Path, seconds: float) -> tuple[Path, Path]:
  portrait, speech = folder / "astronaut.png", folder / "speech.wav"
  Image.fromarray(skimage_data.astronaut()).save(portrait)
  audio, _, _ = synthesize_speech(np.random.default_rng(0), int(round(seconds * FPS)),
                                  make_identity(0), "neutral", 1.0)
  media.write_audio_file(speech, audio)
  return portrait, speech


def run_sample(checkpoint: str, portrait: Path, speech: Path, out: Path, cache: str | None
               ) -> tuple[float, float]:
  """One `etalk sample` in a fresh process -> (wall seconds, the generation seconds it prints)."""
  environment = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache or "")
  command = [sys.executable, "-m", "etalk_jax.cli", "sample", "--portrait", str(portrait),
             "--audio", str(speech), "--checkpoint", checkpoint, "--out", str(out),
             "--emotion", "happy", "--no-progress"]
  out.unlink(missing_ok=True)
  start = time.perf_counter()
  completed = subprocess.run(command, env=environment, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if completed.returncode != 0:
    raise SystemExit(f"etalk sample failed:\n{completed.stderr[-3000:]}")
  generation = float(re.search(r"in ([0-9.]+) s \(", completed.stdout).group(1))
  return wall, generation


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default="demo_out/checkpoint",
                      help="pipeline folder (default demo_out/checkpoint, `etalk demo`'s)")
  parser.add_argument("--seconds", type=float, default=3.0, help="speech length (default 3)")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as scratch:
    scratch = Path(scratch)
    portrait, speech = write_inputs(scratch, args.seconds)
    print(f"etalk sample, {args.seconds:g} s of speech, {args.checkpoint}; each call a fresh "
          "process")
    print(f"{'cache':<6} {'call':<7} {'wall s':>7} {'generation s':>13}")
    for label, cache in (("off", None), ("on", str(scratch / "xla"))):
      for call in ("first", "second"):
        wall, generation = run_sample(args.checkpoint, portrait, speech, scratch / "out.mp4",
                                      cache)
        print(f"{label:<6} {call:<7} {wall:>7.1f} {generation:>13.1f}", flush=True)


if __name__ == "__main__":
  main()
