"""The SVD backbone against diffusers on the same random weights and inputs: our jitted UNet vs
diffusers' eager one (outputs and interleaved timings), and the temporal VAE's encode and decode.
A helper of the benchmark scripts (`svd_vs_torch.py`, `flops.py`), which run with benchmarks/ on
sys.path.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from etalk_jax.svd import unet_from_diffusers, vae_from_diffusers


def interleaved_medians(functions: dict[str, Callable[[], Any]], repeats: int
                        ) -> dict[str, float]:
  """Median seconds per call of each function, called in turn `repeats` times after one warm-up
  call each (which also compiles), so that background load on a shared machine hits all alike.
  Each function returns only when its work is done (JAX results blocked on)."""
  for fn in functions.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in functions}
  for _ in range(repeats):
    for name, fn in functions.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def compare_unet(fields: dict[str, Any], *, batch: int = 1, frames: int = 8, size: int = 16,
                 repeats: int = 5, seed: int = 0) -> dict[str, float]:
  """Same random weights and inputs through diffusers (eager) and our jitted UNet.

  Returns conversion, compile and median forward times, their ratio and the relative error.
  """
  # PyTorch and diffusers load only for a comparison: the helper imports without them.
  import torch  # noqa: PLC0415 (PyTorch is optional: only a comparison needs it)
  from diffusers import UNetSpatioTemporalConditionModel  # noqa: PLC0415 (PyTorch, as torch)

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
  medians = interleaved_medians({"jax": lambda: compiled(*args).block_until_ready(),
                                 "torch": torch_forward}, repeats)
  jax_seconds, torch_seconds = medians["jax"], medians["torch"]
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
  # PyTorch and diffusers load only for a comparison (as in `compare_unet`).
  import torch  # noqa: PLC0415 (PyTorch is optional: only a comparison needs it)
  from diffusers import AutoencoderKLTemporalDecoder  # noqa: PLC0415 (PyTorch, as torch)

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
