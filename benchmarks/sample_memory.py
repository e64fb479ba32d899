"""Peak memory of sampling a 4.8 s 512² video (120 frames, one window, 25 Euler steps) with
full-size ETHD, and of decoding it with SVD's VAE, from XLA's own numbers.

  .venv/bin/python benchmarks/sample_memory.py               # the figure, guidance off
  .venv/bin/python benchmarks/sample_memory.py --guidance    # classifier-free guidance (batch 2)
  .venv/bin/python benchmarks/sample_memory.py --tiny        # a one-level ETHD: a quick check

What is compiled is what `EmotiveTalkPipeline` runs: the windowed sampler
(`diffusion.sampling._sample_windows`, all steps in one `fori_loop`) with ETHD as its denoiser
(`pipeline.call_ethd`), bf16 compute over fp32 weights (`Compute.bf16`), for ShapeDtypeStructs:
nothing is materialised. Then `TemporalVAE.decode` on one 14-frame chunk, as `VAECodec.decode`
runs it, with ETHD's weights still resident. The peak is
max(sampler: arguments + outputs - aliased + temporaries,
    ETHD weights + VAE weights + the decode chunk's outputs + temporaries + the latents).

Attention is chosen as on `--backend` (default "gpu") with `--attention` (default "xla": blocked
attention from 1024 keys on, 512 keys per block on a GPU, plain below): a code path a GPU runs.
"auto" would take cuDNN flash attention for the bf16 calls, which holds no per-block logits and
cannot be compiled on this CPU. XLA:CPU computes bf16 dots in f32 with converted copies, so its
temporaries overstate a GPU's.

Figures only: nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from etalk_jax import model_io  # noqa: E402
from etalk_jax.diffusion import sampling  # noqa: E402
from etalk_jax.ethd.model import ETHD, ETHDConfig  # noqa: E402
from etalk_jax.layers import attention  # noqa: E402
from etalk_jax.layers.compute import Compute  # noqa: E402
from etalk_jax.pipeline import call_ethd  # noqa: E402
from etalk_jax.svd import TemporalVAE, UNetConfig, VAEConfig  # noqa: E402

# A sibling in benchmarks/ (this script's folder is first on sys.path when it runs).
from flops import TINY_UNET  # noqa: E402  (`--tiny`: a two-level ETHD, 8 input channels)

GB = 1e9
VAE_DOWNSAMPLE = 8
DECODE_CHUNK = 14  # VAECodec's decode_chunk_frames


def spec(*shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


def tree_bytes(tree) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def peak_bytes(memory) -> int:
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def sampler_memory(config: ETHDConfig, compute: Compute, frames: int, pixels: int, steps: int,
                   guidance: bool) -> dict:
  latent = pixels // VAE_DOWNSAMPLE
  graphdef, params = nnx.split(model_io.abstract(
      lambda rngs: ETHD(config, compute=compute, rngs=rngs)))
  denoiser = sampling.ModelDenoiser(graphdef, call_ethd)
  windows = sampling.WINDOWS_512
  plan = sampling.plan_windows(frames, windows)
  frame_conditions = {"lip_latents": spec(1, plan.buffer_frames, config.lip_dim),
                      "expression": spec(1, plan.buffer_frames, config.expression_dim)}
  video_conditions = {"reference_latent": spec(1, latent, latent, 4),
                      "reference_expression": spec(1, config.expression_dim),
                      "face_mask": spec(1, pixels, pixels)}
  unconditional = None
  if guidance:  # the pipeline's speech guidance: the same conditions with l_a zeroed
    unconditional = sampling.Guidance(frame_conditions, video_conditions,
                                      spec(plan.window_frames))
  sigmas = spec(steps + 1)
  start = time.perf_counter()
  lowered = sampling._sample_windows.lower(
      denoiser, params, spec(1, plan.buffer_frames, latent, latent, 4), sigmas, frame_conditions,
      video_conditions, unconditional, spec(*plan.starts.shape, dtype=jnp.int32),
      spec(*plan.weights.shape), spec(*plan.active_groups.shape, dtype=jnp.bool_),
      windows_per_call=windows.windows_per_call)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return {"params_gb": tree_bytes(params) / GB,
          "argument_gb": memory.argument_size_in_bytes / GB,
          "temp_gb": memory.temp_size_in_bytes / GB, "peak_gb": peak_bytes(memory) / GB,
          "compile_s": seconds, "latents_gb": plan.buffer_frames * latent * latent * 4 * 4 / GB}


def decode_memory(compute: Compute, pixels: int, tiny: bool) -> dict:
  config = (VAEConfig(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 64),
                       layers_per_block=1) if tiny else VAEConfig())
  graphdef, params = nnx.split(model_io.abstract(
      lambda rngs: TemporalVAE(config, compute=compute, rngs=rngs)))
  latent = pixels // 2 ** (len(config.block_out_channels) - 1)
  start = time.perf_counter()
  compiled = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z, DECODE_CHUNK)).lower(
      params, spec(DECODE_CHUNK, latent, latent, config.latent_channels)).compile()
  memory = compiled.memory_analysis()
  return {"params_gb": tree_bytes(params) / GB,
          "work_gb": (memory.output_size_in_bytes + memory.temp_size_in_bytes) / GB,
          "compile_s": time.perf_counter() - start}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=120)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--guidance", action="store_true", help="classifier-free guidance on")
  parser.add_argument("--backend", default="gpu", choices=("cpu", "gpu", "tpu"))
  parser.add_argument("--attention", default="xla", choices=("xla", "auto"),
                      help="'auto' on a GPU takes cuDNN, which only a GPU compiles")
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  pixels = 64 if args.tiny else 512
  config = ETHDConfig(unet=UNetConfig.from_dict(TINY_UNET)) if args.tiny else ETHDConfig()
  compute = Compute.bf16(args.attention)
  print(f"{'tiny' if args.tiny else 'full-size'} ETHD sampling, {args.frames} frames at "
        f"{pixels}², {args.steps} steps, guidance {'on' if args.guidance else 'off'}, bf16 "
        f"compute / fp32 weights, attention {args.attention!r} as on {args.backend!r}",
        flush=True)
  with attention.target_backend(args.backend):
    sampler = sampler_memory(config, compute, args.frames, pixels, args.steps, args.guidance)
    decode = decode_memory(compute, pixels, args.tiny)
  decoding_gb = sampler["params_gb"] + decode["params_gb"] + decode["work_gb"] + \
      sampler["latents_gb"]
  peak = max(sampler["peak_gb"], decoding_gb)
  print(f"sampler: ETHD weights {sampler['params_gb']:.2f} GB, arguments "
        f"{sampler['argument_gb']:.2f} GB, temporaries {sampler['temp_gb']:.2f} GB, peak "
        f"{sampler['peak_gb']:.2f} GB (compiled in {sampler['compile_s']:.0f} s)")
  print(f"decoding: ETHD + VAE weights {sampler['params_gb'] + decode['params_gb']:.2f} GB + one "
        f"{DECODE_CHUNK}-frame chunk {decode['work_gb']:.2f} GB + latents "
        f"{sampler['latents_gb']:.2f} GB = {decoding_gb:.2f} GB (compiled in "
        f"{decode['compile_s']:.0f} s)")
  print(f"peak {peak:.2f} GB: fits one 80 GB GPU: {'yes' if peak < 80 else 'NO'}", flush=True)
  return peak


if __name__ == "__main__":
  main()
