"""`etalk demo`: the most complete path that runs on a fresh machine with nothing downloaded.

Today that is the SVD backbone: build a random SVD UNet and VAE in diffusers, convert them to
Flax NNX, run both frameworks on the same inputs and report the difference and the timings.
`benchmarks/svd_vs_torch.py` uses the same comparison on a larger configuration.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

# Small enough for a 2-core CPU in well under a minute, big enough to exercise every block type.
DEMO_UNET = dict(
    sample_size=16, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                      "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 64, 128), addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=96, layers_per_block=2, cross_attention_dim=64,
    transformer_layers_per_block=1, num_attention_heads=(1, 2, 4), num_frames=8)
DEMO_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                layers_per_block=1, latent_channels=4)


def _interleaved_medians(first, second, repeats: int) -> tuple[float, float]:
  """Median seconds of two functions timed in alternation, so that background load on a shared
  machine hits both alike."""
  first(), second()  # warm-up
  times: tuple[list, list] = ([], [])
  for _ in range(repeats):
    for fn, bucket in ((first, times[0]), (second, times[1])):
      start = time.perf_counter()
      fn()
      bucket.append(time.perf_counter() - start)
  return statistics.median(times[0]), statistics.median(times[1])


def compare_unet(fields: dict[str, Any], *, batch: int = 1, frames: int = 8, size: int = 16,
                 repeats: int = 5, seed: int = 0) -> dict[str, float]:
  """Same random weights and inputs through diffusers (eager) and our jitted UNet.

  Returns conversion, compile and median forward times, their ratio and the relative error.
  """
  import jax
  import torch
  from diffusers import UNetSpatioTemporalConditionModel
  from flax import nnx

  from etalk_jax.svd import unet_from_diffusers

  torch.manual_seed(seed)
  reference = UNetSpatioTemporalConditionModel(**fields).eval()
  rng = np.random.default_rng(seed)
  ids = fields["projection_class_embeddings_input_dim"] // fields["addition_time_embed_dim"]
  sample = rng.standard_normal((batch, frames, size, size, fields["in_channels"]), np.float32)
  context = rng.standard_normal((batch, 1, fields["cross_attention_dim"]), np.float32)
  added_time_ids = np.tile(np.array([6.0, 127.0, 0.02] * (ids // 3), np.float32), (batch, 1))
  timestep = np.float32(0.5)

  torch_inputs = (torch.from_numpy(sample).permute(0, 1, 4, 2, 3).contiguous(),
                  torch.tensor(timestep), torch.from_numpy(context),
                  torch.from_numpy(added_time_ids))

  def torch_forward():
    with torch.inference_mode():
      return reference(*torch_inputs).sample

  expected = torch_forward().permute(0, 1, 3, 4, 2).numpy()

  start = time.perf_counter()
  ours = unet_from_diffusers(reference)
  convert_seconds = time.perf_counter() - start

  graphdef, state = nnx.split(ours)
  forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
  args = (state, sample, timestep, context, added_time_ids)
  start = time.perf_counter()
  compiled = forward.lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  got = np.asarray(compiled(*args))
  jax_seconds, torch_seconds = _interleaved_medians(
      lambda: compiled(*args).block_until_ready(), torch_forward, repeats)
  error = float(np.abs(got - expected).max() / np.abs(expected).max())
  return {
      "parameters": sum(p.numel() for p in reference.parameters()),
      "relative_error": error,
      "convert_s": convert_seconds,
      "jax_compile_s": compile_seconds,
      "jax_forward_s": jax_seconds,
      "torch_forward_s": torch_seconds,
      "ratio_jax_over_torch": jax_seconds / torch_seconds,
  }


def compare_vae(fields: dict[str, Any], *, frames: int = 4, size: int = 32, seed: int = 0
                ) -> dict[str, float]:
  """Encode (posterior mean) and temporal decode through both frameworks; relative errors."""
  import torch
  from diffusers import AutoencoderKLTemporalDecoder

  from etalk_jax.svd import vae_from_diffusers

  torch.manual_seed(seed)
  reference = AutoencoderKLTemporalDecoder(**fields).eval()
  ours = vae_from_diffusers(reference)
  images = np.random.default_rng(seed).uniform(-1, 1, (frames, size, size, 3)).astype(np.float32)
  with torch.inference_mode():
    posterior = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    expected_mean = posterior.mean.permute(0, 2, 3, 1).numpy()
    expected_frames = reference.decode(posterior.mean, num_frames=frames).sample
  expected_frames = expected_frames.permute(0, 2, 3, 1).numpy()
  mean = np.asarray(ours.encode(images).mean)
  decoded = np.asarray(ours.decode(mean, frames))
  rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
  return {"encode_relative_error": rel(mean, expected_mean),
          "decode_relative_error": rel(decoded, expected_frames)}


def run() -> int:
  print("etalk demo: the SVD backbone in Flax NNX against diffusers (random weights, CPU)")
  unet = compare_unet(DEMO_UNET)
  print(f"  UNet, {unet['parameters']:,} parameters, 1 x 8 frames x 16 x 16 latents")
  print(f"    relative difference to diffusers: {unet['relative_error']:.2e}")
  print(f"    conversion {unet['convert_s']:.2f} s, XLA compile {unet['jax_compile_s']:.1f} s")
  print(f"    forward: ours (jit) {unet['jax_forward_s'] * 1e3:.1f} ms, "
        f"diffusers (eager) {unet['torch_forward_s'] * 1e3:.1f} ms, "
        f"ratio {unet['ratio_jax_over_torch']:.2f}x")
  vae = compare_vae(DEMO_VAE)
  print(f"  temporal VAE: encode {vae['encode_relative_error']:.2e}, "
        f"decode {vae['decode_relative_error']:.2e} relative difference")
  worst = max(unet["relative_error"], vae["encode_relative_error"], vae["decode_relative_error"])
  ok = worst < 1e-4
  print("  OK: equal to diffusers within 1e-4" if ok else
        f"  MISMATCH: {worst:.2e} exceeds 1e-4")
  return 0 if ok else 1
