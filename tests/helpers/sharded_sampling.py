"""Windowed sampling of a tiny SVD UNet split over 8 simulated CPU devices, and the same videos on
one device. Run by tests/parallel/test_sharded_sampling.py in a subprocess whose XLA_FLAGS ask
for 8 host devices (they must be set before jax is imported); prints one JSON line of results."""

import json
import sys

import jax
import numpy as np
from flax import nnx

from etalk_jax import model_io
from etalk_jax.diffusion import sampling
from etalk_jax.svd import UNetConfig, UNetSpatioTemporal
from tests.helpers.parallel_step import UNET_ONE_LEVEL

# 8 groups of 1 window of 3 frames on one device; on 8 devices 1 group of 8 (windows_for_devices).
# 9 and 13 frames are 4 and 6 windows: one bucket, and the padded windows are real work on the
# devices that hold them (zero blend weight).
WINDOWS = sampling.WindowConfig(frames=3, overlap=1, windows_per_call=1, min_window_groups=8)
LENGTHS = (9, 13)
SEEN = []  # (global shape, per-device shape) of the denoiser's input, recorded while compiling


def random_unet() -> UNetSpatioTemporal:
  """The one-level UNet with 8 input channels (noisy + reference latent), weights drawn by NumPy
  (nnx's eager initialisers compile a program per shape); norm scales near 1."""
  config = UNetConfig.from_dict(dict(UNET_ONE_LEVEL, in_channels=8))
  graphdef, state = nnx.split(model_io.abstract(
      lambda rngs: UNetSpatioTemporal(config, rngs=rngs)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if str(getattr(path[-2], "key", path[-2])) == "scale":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def recording_call(unet, scaled_noisy, c_noise, frame_conditions, video_conditions):
  """call_svd_unet that records how its input batch is split over the devices."""
  shape = scaled_noisy.shape
  jax.debug.inspect_array_sharding(
      scaled_noisy, callback=lambda s: SEEN.append((list(shape), list(s.shard_shape(shape)))))
  return sampling.call_svd_unet(unet, scaled_noisy, c_noise, frame_conditions, video_conditions)


def inputs(frames: int):
  rng = np.random.default_rng(frames)
  noise = rng.standard_normal((1, frames, 8, 8, 4), np.float32)
  reference = rng.standard_normal((1, 1, 8, 8, 4), np.float32).repeat(frames, axis=1)
  video = {"encoder_hidden_states": rng.standard_normal((1, 1, 16), np.float32),
           "added_time_ids": np.array([[6.0, 127.0, 0.02]], np.float32)}
  unconditional = ({"reference_latents": np.zeros_like(reference)},
                   {name: np.zeros_like(value) for name, value in video.items()})
  return noise, {"reference_latents": reference}, video, unconditional


def main():
  devices = jax.devices()
  denoiser, params = sampling.model_denoiser(random_unet(), recording_call)
  results = {"devices": len(devices)}
  for name, sampler in (("plain", sampling.SamplerConfig(steps=2)),
                        ("guided", sampling.SamplerConfig(steps=2, min_guidance_scale=1.0,
                                                          max_guidance_scale=3.0))):
    differences, scales, compiles, seen = [], [], [], []
    for frames in LENGTHS:
      noise, frame_conditions, video_conditions, unconditional = inputs(frames)
      run = lambda devices: np.asarray(sampling.sample_video(
          denoiser, params, noise, frame_conditions, video_conditions, sampler=sampler,
          windows=WINDOWS, unconditional=unconditional, devices=devices))
      one = run(None)
      SEEN.clear()
      before = sampling._sample_windows._cache_size()
      sharded = run(devices)
      compiles.append(sampling._sample_windows._cache_size() - before)
      seen.extend(SEEN)
      differences.append(float(np.abs(sharded - one).max()))
      scales.append(float(np.abs(one).max()))
      results[f"{name}_finite"] = bool(np.isfinite(sharded).all() and np.isfinite(one).all())
    results[name] = {"max_abs_difference": max(differences), "max_abs_value": max(scales),
                     "new_compiles": compiles, "denoiser_batch": seen}
  json.dump(results, sys.stdout)
  print()


if __name__ == "__main__":
  main()
