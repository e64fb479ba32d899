"""Throughput of each metric network at full size (random weights, fp32, this machine), and the
peak memory of one 128-frame FVD pass. Each metric runs in a fresh process, so the peak resident
memory it prints is that metric's alone (the process's ru_maxrss: JAX, the weights, the compiled
program and its buffers).

  .venv/bin/python benchmarks/eval_throughput.py            # all four, ~5 min on 2 cores
  .venv/bin/python benchmarks/eval_throughput.py --only fvd

Per metric, what `etalk eval` runs on each side of every video pair, from 512x512 uint8 frames:
  fid    Inception-v3 on 32 frames (batch 16, resized to 299 inside): frames/s
  fvd    I3D on one 128-frame clip (stylegan_v: resized to 224): frames/s, peak RSS, and XLA's
         own buffer figures for the compiled pass (arguments, outputs, temporaries)
  sync   SyncNet on 128 frames of 224² face crops and their speech (124 windows, MFCC included;
         the crops themselves are not timed): frames/s
  efid   the face3d ResNet-50 on 32 aligned 224² faces (alignment not timed): frames/s
Each figure is the second of two calls (the first compiles).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from data_pipeline import SAMPLE_RATE
from etalk_jax.evaluation.extract import BatchedForward
from etalk_jax.evaluation.face3d import FACE3D_FULL, Face3DRecon, expression_coefficients
from etalk_jax.evaluation.i3d import I3D, I3D_FULL, preprocess_videos
from etalk_jax.evaluation.inception import INCEPTION_FULL, FIDInception, inception_inputs
from etalk_jax.evaluation.syncnet import SYNCNET_FULL, SyncNet, SyncNetScorer

METRICS = ("fid", "fvd", "sync", "efid")
FVD_FRAMES = 128


def _twice(function):
  function()  # compile
  began = time.perf_counter()
  function()
  return time.perf_counter() - began


def measure(metric: str) -> dict:
  rng = np.random.default_rng(0)
  rngs = nnx.Rngs(0)
  if metric == "fid":
    frames = rng.integers(0, 256, (32, 512, 512, 3), np.uint8)
    forward = BatchedForward(FIDInception(INCEPTION_FULL, rngs=rngs), lambda m, x: m(x), 16)
    seconds = _twice(lambda: forward(inception_inputs(frames)))
    result = {"frames": len(frames), "seconds": seconds}
  elif metric == "fvd":
    clip = rng.integers(0, 256, (1, FVD_FRAMES, 512, 512, 3), np.uint8)
    model = I3D(I3D_FULL, rngs=rngs)
    forward = BatchedForward(model, lambda m, x: m(preprocess_videos(x, "stylegan_v")), 1)
    seconds = _twice(lambda: forward(clip))
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(preprocess_videos(x))).lower(
        state, clip).compile()
    analysis = compiled.memory_analysis()
    result = {"frames": FVD_FRAMES, "seconds": seconds}
    if analysis is not None:
      result["xla_bytes"] = {
          "arguments": int(analysis.argument_size_in_bytes),
          "outputs": int(analysis.output_size_in_bytes),
          "temporaries": int(analysis.temp_size_in_bytes)}
  elif metric == "sync":
    crops = rng.integers(0, 256, (FVD_FRAMES, 224, 224, 3), np.uint8)
    speech = rng.normal(0, 0.1, FVD_FRAMES * SAMPLE_RATE // 25).astype(np.float32)
    scorer = SyncNetScorer(SyncNet(SYNCNET_FULL, rngs=rngs))
    seconds = _twice(lambda: jax.block_until_ready(scorer(crops, speech)))
    result = {"frames": FVD_FRAMES, "seconds": seconds}
  elif metric == "efid":
    faces = rng.uniform(0, 1, (32, 224, 224, 3)).astype(np.float32)
    forward = BatchedForward(Face3DRecon(FACE3D_FULL, rngs=rngs), expression_coefficients, 16)
    seconds = _twice(lambda: forward(faces))
    result = {"frames": len(faces), "seconds": seconds}
  else:
    raise ValueError(metric)
  result["frames_per_second"] = result["frames"] / result["seconds"]
  result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=METRICS, default=None, help="one metric, in this process")
  parser.add_argument("--json", action="store_true", help="print the result as JSON")
  args = parser.parse_args()
  if args.only:
    result = measure(args.only)
    print(json.dumps(result) if args.json else result)
    return
  print(f"{'metric':<6}{'frames/s':>10}{'peak RSS MiB':>14}  XLA buffers of the pass (MiB)")
  for metric in METRICS:
    output = subprocess.run([sys.executable, __file__, "--only", metric, "--json"],
                            capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    buffers = ", ".join(f"{name} {value / 2**20:,.0f}"
                        for name, value in result.get("xla_bytes", {}).items())
    print(f"{metric:<6}{result['frames_per_second']:>10.2f}{result['peak_rss_mib']:>14,.0f}  "
          f"{buffers}")


if __name__ == "__main__":
  main()
