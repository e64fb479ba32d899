"""XLA-counted FLOPs of full-size ETHD sampling a 120-frame 512² video in 25 steps and of SVD's
VAE decoder for it, beside the paper's 3668.16 and 180.51 TFLOPs (Tab. 7); and the time of one
tiny-config sampling step, ours (jitted `sample_clip`) vs diffusers' UNet + EulerDiscreteScheduler.

  .venv/bin/python benchmarks/flops.py                 # FLOPs and the step timing
  .venv/bin/python benchmarks/flops.py --skip-timing   # FLOPs only
  .venv/bin/python benchmarks/flops.py --compile       # count after XLA's optimisations

Nothing is materialised: the models are abstract (`model_io.abstract`), split into graphdef and
abstract state, and each function is only lowered for `ShapeDtypeStruct` inputs. By default the
count is `Lowered.cost_analysis()` (the HLO as traced; compiling the full-size UNet for 120
frames takes long on a small CPU); `--compile` counts the optimised HLO instead. XLA counts a
multiply-add as 2 FLOPs and also counts elementwise work (normalisation, softmax, activations).

What is counted and why it is exact:
- ETHD: one call on the whole 120-frame window at 64×64 latents (batch 1), times 25 steps. The
  25 steps are the same computation on different values, so 25 × one call is exact (XLA's
  cost analysis would count a `fori_loop` body once). Guidance off, as in the paper's count
  (`--guidance` doubles the batch). The Euler update (a few elementwise ops on 2 M latents) is
  negligible and left out. The plain SVD UNet on the same shapes is printed too, so that the
  cost of ETHD's additions (lip/expression token MLPs, EDI, banded expression CA) shows.
- VAE decoder: `TemporalVAE.decode` on chunks of `--decode-chunk` frames, as
  `decode_in_chunks` runs it, times the number of chunks (every op is per frame or a temporal
  conv within the chunk, so the count is linear in frames; a last shorter chunk is lowered on
  its own).

Measured (2-core CPU, lowered HLO): ETHD 143.68 TFLOPs per call (the plain SVD UNet 137.36), so
3592.05 TFLOPs for 25 steps: 0.979x the paper's 3668.16. VAE decoder 355.13 TFLOPs: 1.97x the
paper's 180.51; half of it, 177.6, is within 2% of the paper's figure, so the paper most likely
counted a multiply-add as one operation for the decoder (its backbone figure matches two per
multiply-add, so Tab. 7 mixes the conventions). A count by hand agrees: per 512² frame the
decoder's convolutions (spatial 3x3 and temporal 3x1x1 in every res block, upsamplers, shortcuts,
in/out convs) and its mid attention come to 1.52 T multiply-adds, 182.5 T for 120 frames, 1.1%
from the paper's 180.51.
Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etalk_jax import model_io
from etalk_jax.diffusion import sampling
from etalk_jax.ethd import ETHD, ETHDConfig
from etalk_jax.svd import (
  TemporalVAE,
  UNetConfig,
  UNetSpatioTemporal,
  VAEConfig,
  unet_from_diffusers,
)

from svd_compare import interleaved_medians  # benchmarks/ sibling

PAPER_BACKBONE_TFLOPS = 3668.16
PAPER_VAE_DECODER_TFLOPS = 180.51
VAE_DOWNSAMPLE = 8  # SVD's VAE: 512² pixels <-> 64² latents


def xla_flops(fn, *args, compile: bool = False) -> float:
  """FLOPs XLA's cost analysis gives for `jax.jit(fn)` on these (abstract) arguments."""
  lowered = jax.jit(fn).lower(*args)
  cost = lowered.compile().cost_analysis() if compile else lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost["flops"])


def _spec(*shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


def ethd_call_flops(frames: int, size: int, batch: int, compile: bool) -> tuple[float, float]:
  """(ETHD, plain SVD UNet) FLOPs of one denoiser call at full size."""
  config = ETHDConfig()
  latent = size // VAE_DOWNSAMPLE
  graphdef, state = nnx.split(model_io.abstract(lambda rngs: ETHD(config, rngs=rngs)))
  ethd = xla_flops(
      lambda s, *inputs: nnx.merge(graphdef, s)(*inputs), state,
      _spec(batch, frames, latent, latent, config.unet.in_channels), _spec(batch),
      _spec(batch, frames, config.lip_dim), _spec(batch, frames, config.expression_dim),
      _spec(batch, config.expression_dim), _spec(batch, size, size), compile=compile)
  del graphdef, state
  unet_config = UNetConfig()
  graphdef, state = nnx.split(model_io.abstract(
      lambda rngs: UNetSpatioTemporal(unet_config, rngs=rngs)))
  ids = unet_config.projection_class_embeddings_input_dim // unet_config.addition_time_embed_dim
  svd = xla_flops(
      lambda s, *inputs: nnx.merge(graphdef, s)(*inputs), state,
      _spec(batch, frames, latent, latent, unet_config.in_channels), _spec(batch),
      _spec(batch, 1, unet_config.cross_attention_dim), _spec(batch, ids), compile=compile)
  return ethd, svd


def vae_decoder_flops(frames: int, size: int, chunk: int, compile: bool) -> float:
  """FLOPs of decoding `frames` latents `chunk` frames at a time (as `decode_in_chunks`)."""
  config = VAEConfig()
  latent = size // VAE_DOWNSAMPLE
  graphdef, state = nnx.split(model_io.abstract(lambda rngs: TemporalVAE(config, rngs=rngs)))
  per_length: dict[int, float] = {}
  total = 0.0
  for start in range(0, frames, chunk):
    length = min(chunk, frames - start)
    if length not in per_length:
      per_length[length] = xla_flops(
          lambda s, z, n=length: nnx.merge(graphdef, s).decode(z, n), state,
          _spec(length, latent, latent, config.latent_channels), compile=compile)
    total += per_length[length]
  return total


# ----------------------------------------------------------------------------------------------
# One tiny-config sampling step: ours vs diffusers
# ----------------------------------------------------------------------------------------------

TINY_UNET = dict(
    sample_size=16, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 64), addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12, layers_per_block=1, cross_attention_dim=16,
    transformer_layers_per_block=1, num_attention_heads=2, num_frames=8)


def step_timing(frames: int, size: int, repeats: int) -> None:
  """One Euler step (input scaling, UNet with the reference latent concatenated, update) of the
  same random tiny SVD UNet: `sample_clip` with one step vs diffusers' eager loop body."""
  import torch  # noqa: PLC0415 (PyTorch is optional: only the step timing needs it)
  from diffusers import (  # noqa: PLC0415 (the PyTorch side of the step timing, optional)
    EulerDiscreteScheduler,
    UNetSpatioTemporalConditionModel,
  )

  torch.manual_seed(0)
  torch_unet = UNetSpatioTemporalConditionModel(**TINY_UNET).eval()
  unet = unet_from_diffusers(torch_unet)
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((1, frames, size, size, 4), np.float32)
  reference = np.repeat(rng.standard_normal((1, 1, size, size, 4), np.float32), frames, axis=1)
  context = rng.standard_normal((1, 1, TINY_UNET["cross_attention_dim"]), np.float32)
  time_ids = np.array([[6.0, 127.0, 0.02]], np.float32)
  frame_conditions = {"reference_latents": reference}
  video_conditions = {"encoder_hidden_states": context, "added_time_ids": time_ids}
  denoiser, params = sampling.model_denoiser(unet, sampling.call_svd_unet)
  sigmas = jnp.asarray(sampling.sampler_sigmas(sampling.SamplerConfig(steps=1)))
  ours = lambda: sampling.sample_clip(denoiser, params, noise, sigmas, frame_conditions,
                                      video_conditions).block_until_ready()
  start = time.perf_counter()
  ours()
  compile_seconds = time.perf_counter() - start

  scheduler = EulerDiscreteScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True,
      sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
      steps_offset=1)
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 2)))
  torch_noise, torch_reference = to_torch(noise), to_torch(reference)
  torch_context, torch_ids = torch.from_numpy(context), torch.from_numpy(time_ids)

  def theirs():
    scheduler.set_timesteps(1)
    latents = torch_noise * scheduler.init_noise_sigma
    t = scheduler.timesteps[0]
    with torch.inference_mode():
      scaled = torch.cat([scheduler.scale_model_input(latents, t), torch_reference], dim=2)
      output = torch_unet(scaled, t, torch_context, torch_ids).sample
      return scheduler.step(output, t, latents).prev_sample

  error = float(np.abs(np.asarray(ours()) - np.moveaxis(theirs().numpy(), 2, -1)).max())
  medians = interleaved_medians({"ours": ours, "theirs": theirs}, repeats)
  jax_seconds, torch_seconds = medians["ours"], medians["theirs"]
  print(f"[step] tiny SVD UNet ({sum(p.numel() for p in torch_unet.parameters()):,} "
        f"parameters), 1 x {frames} frames x {size}² latents, one Euler step; "
        f"torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")
  print(f"  max |ours - diffusers|       {error:.2e}")
  print(f"  ours (jit) median            {jax_seconds * 1e3:8.2f} ms   (compile "
        f"{compile_seconds:.1f} s)")
  print(f"  diffusers (eager) median     {torch_seconds * 1e3:8.2f} ms")
  print(f"  ratio ours / PyTorch         {jax_seconds / torch_seconds:8.2f}x")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--frames", type=int, default=120)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--guidance", action="store_true", help="classifier-free guidance")
  parser.add_argument("--decode-chunk", type=int, default=8)
  parser.add_argument("--compile", action="store_true", help="count the optimised HLO")
  parser.add_argument("--skip-flops", action="store_true")
  parser.add_argument("--skip-timing", action="store_true")
  parser.add_argument("--timing-frames", type=int, default=8)
  parser.add_argument("--timing-size", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  if not args.skip_flops:
    start = time.perf_counter()
    batch = 2 if args.guidance else 1
    ethd, svd = ethd_call_flops(args.frames, args.size, batch, args.compile)
    decoder = vae_decoder_flops(args.frames, args.size, args.decode_chunk, args.compile)
    backbone = args.steps * ethd
    how = "compiled" if args.compile else "lowered"
    print(f"[flops] {args.frames} frames at {args.size}² ({args.size // VAE_DOWNSAMPLE}² "
          f"latents), {args.steps} steps, guidance {'on' if args.guidance else 'off'}; "
          f"XLA cost analysis of the {how} HLO ({time.perf_counter() - start:.0f} s)")
    print(f"  ETHD, one call               {ethd / 1e12:10.2f} TFLOPs")
    print(f"  SVD UNet, one call           {svd / 1e12:10.2f} TFLOPs   (ETHD's additions: "
          f"{(ethd - svd) / 1e12:.2f}, {100 * (ethd - svd) / svd:.1f}%)")
    print(f"  ETHD backbone, {args.steps} steps      {backbone / 1e12:10.2f} TFLOPs   (paper "
          f"{PAPER_BACKBONE_TFLOPS}; ours / paper {backbone / 1e12 / PAPER_BACKBONE_TFLOPS:.3f})")
    print(f"  VAE decoder, chunks of {args.decode_chunk:<3d}  {decoder / 1e12:10.2f} TFLOPs   "
          f"(paper {PAPER_VAE_DECODER_TFLOPS}; ours / paper "
          f"{decoder / 1e12 / PAPER_VAE_DECODER_TFLOPS:.3f})")
  if not args.skip_timing:
    step_timing(args.timing_frames, args.timing_size, args.repeats)


if __name__ == "__main__":
  main()
