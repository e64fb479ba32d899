"""One unattended pass over what only a GPU can show: parity with diffusers on CUDA, full-size
ETHD sampling and training speed, attention kernels. Prints one table (and `--out` JSON).

On the device machine (one H100 / H200), from the repository root:

  PYTHONPATH=. python3 benchmarks/device_check.py --out $OUT/device_check.json

Here, the same code at tiny shapes on the CPU (2.5 minutes on 2 shared cores):

  PYTHONPATH=. .venv/bin/python benchmarks/device_check.py --dry-run

Assumes: the repository's packages importable (PYTHONPATH=.); jax with CUDA (written against
jax 0.10.2, meant for 0.11: `memory_stats()` may be None and `cost_analysis()` a dict or a
list, both handled); torch with CUDA (a CPU-only torch makes the parity rows compare with torch
on the CPU, as their `torch_device` figure says); diffusers if installed: where `import
diffusers` fails the three parity rows say "skipped: diffusers missing" and the rest runs.
Nothing is downloaded: every model is random.

Each group of rows runs in a child process of its own, so a crash, an out-of-memory or a hang
costs that group only and each peak-memory figure is that group's. Groups are time-boxed
(parity 110 s, attention 45 s, sampling 165 s, training 150 s, each also getting what the groups
before it left unused: 470 s in all, under 8 minutes with the start; `--time-scale` stretches
them); a row a group did not report by then is failed with the reason. Rows:

  parity_unet, parity_ethd_init, parity_vae: a medium SVD UNet (`svd_vs_torch.MEDIUM_UNET`:
    channels 64/128/256, 8 frames of 32² latents), ETHD built from it at initialisation (EDI's
    output is zero, so fed SVD's context as tokens it must compute what the UNet computes) and
    a medium temporal VAE (64/128/256, 8 frames of 128²), perturbed random weights, against
    diffusers on CUDA. fp32 at highest matmul precision on both sides (torch TF32 off for
    matmuls and cuDNN): max relative error (max |ours - theirs| / max |theirs|) under 1e-4.
    bf16 (ours `Compute.bf16()`: bf16 compute over fp32 weights, attention "auto" = cuDNN;
    torch: bf16 autocast), both against torch fp32: under 5e-2, the bound of the bf16 test in
    tests/svd/test_models.py (8 bits of mantissa through ~40 layers stay within a few percent;
    a dtype bug gives O(1)); torch's own bf16 error is printed beside ours.
  attention: the first level's spatial self-attention, (120 frames, 4096 tokens, 5 heads, 64)
    bf16: `jax.nn.dot_product_attention(implementation="cudnn")`, `blocked_attention` with key
    blocks of 256 / 512 / 1024, and `implementation="xla"` where it fits (its logits alone are
    20 GB; not fitting is a figure, not a failure): forward and forward + backward ms, median of
    10 after a warm-up, and each forward's error against the first that ran.
  ethd_sampling: full-size random-init ETHD (`ETHDConfig()`: SVD-XT's UNet), 120 frames at 512²
    (64×64×4 latents + the reference latent = 8 input channels), 25 Euler steps through
    `sample_video` (one 120-frame window), bf16, attention "auto": compile (first call minus
    second), sampling time (second call), peak device memory, TFLOPs per ETHD call (XLA's count
    of the lowered call with XLA attention: a cuDNN custom call counts 0 FLOPs) and MFU =
    steps × call FLOPs / time / the chip's dense bf16 peak (989 TFLOP/s for H100 and H200 from
    the device kind, `--peak-tflops` to override).
  ethd_train_step: one full-size ETHD step as the `ethd` stage trains (`train.loop.make_step`;
    the stage's objective `ethd.objective.audio_driven_loss`; bf16 over fp32 params, 8-bit Adam,
    remat "layers") on `--train-frames` frames (default 16, batch 1): compile, median step time
    of `--train-steps` after a warm-up, peak memory, MFU of the model FLOPs (3 × the forward's
    XLA count), and XLA's count of the compiled step (remat's recomputation in, cuDNN out).

A good result (expected, not yet measured): every row ok; fp32 parity 1e-6 to 1e-5, bf16 about
1e-2 and within ~2x of torch's own; attention: cuDNN's forward a few ms (2.6 TFLOPs), blocked
several times slower; sampling: 143.68 TFLOPs per call (benchmarks/flops.py's count, an exact
check), 25 steps in ~10 s (MFU 30-50%), peak memory tens of GB (fp32 weights are 6.3 GB);
training at 16 frames: ~57 model TFLOPs per step, a few tenths of a second.

`--dry-run`: the same code at tiny shapes on the CPU (the tests' parity configs, a one-level
ETHD, 4 frames, 2 steps, small attention); cuDNN is "skipped: no GPU" and torch runs on the CPU.
The exit status is non-zero when any row failed; figures are printed, never asserted as timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from etalk_jax import model_io, parallel
from etalk_jax.diffusion.sampling import (
  WINDOWS_512,
  SamplerConfig,
  model_denoiser,
  plan_windows,
  sample_video,
)
from etalk_jax.ethd import ETHD, ETHDConfig, ethd_from_svd
from etalk_jax.ethd.objective import audio_driven_loss
from etalk_jax.layers.attention import blocked_attention
from etalk_jax.layers.compute import Compute
from etalk_jax.pipeline import call_ethd
from etalk_jax.svd import UNetConfig, unet_from_diffusers, vae_from_diffusers
from etalk_jax.train.loop import Task, make_step, peak_flops_per_device
from etalk_jax.train.optim import Optimizer, adam_8bit

# Siblings in benchmarks/ (this script's folder, first on sys.path when it runs).
from flops import xla_flops  # XLA's FLOP count of a lowered function
from svd_vs_torch import MEDIUM_UNET

REPO = Path(__file__).resolve().parents[1]
# The tests' diffusers builders (tests/helpers/svd_reference.py), as
# benchmarks/sharding_overhead.py imports tests/helpers/parallel_step.py.
sys.path.insert(0, str(REPO))

FP32_TOLERANCE = 1e-4
# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 4e-3); through ~40 layers the output stays
# within a few percent of fp32 (torch's own bf16 autocast: 1e-2 to 2e-2 on the dry run's
# models), while a dtype bug (a cast missed, a norm in bf16) gives O(1). The bound of
# tests/svd/test_models.py's bf16 test.
BF16_TOLERANCE = 5e-2
MEDIUM_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  block_out_channels=(64, 128, 256), layers_per_block=2, latent_channels=4)
# --dry-run's ETHD for sampling and training: one level with attention, 8 input channels (XLA:CPU
# compiles a random initialiser and a rematerialised backward slowly: keep it small).
DRY_RUN_ETHD_UNET = dict(
    sample_size=8, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",),
    up_block_types=("CrossAttnUpBlockSpatioTemporal",), block_out_channels=(32,),
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12, layers_per_block=1, cross_attention_dim=32,
    transformer_layers_per_block=1, num_attention_heads=2, num_frames=4)
VAE_DOWNSAMPLE = 8
# Seconds per group of rows on the device; the dry run's are only a guard against hangs.
# Each group's time box on the device: its own figure here plus whatever the groups before it
# left unused, 470 s in all (8 minutes less the parent's start and the table). The dry run's
# boxes only guard against a hang.
TIME_BOXES = {"parity": 110, "attention": 45, "sampling": 165, "train": 150}
DRY_RUN_TIME_BOX = 300
GB = 1e9
# The parent's start (wall clock), passed to the children so that progress lines share a clock.
START_VARIABLE = "DEVICE_CHECK_START"
_START = float(os.environ.get(START_VARIABLE, time.time()))


def progress(message: str) -> None:
  print(f"[device_check {time.time() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Every shape the rows use: the device's, or --dry-run's tiny ones."""
  dry_run: bool
  parity_unet: dict | None  # None: the tests' UNET_TWO_LEVELS (needs svd_reference)
  parity_vae: dict | None  # None: the tests' VAE_TINY
  vae_frames: int
  vae_size: int
  ethd_unet: UNetConfig
  frames: int
  latent: int
  steps: int
  train_frames: int
  train_steps: int
  attention_shape: tuple[int, int, int, int]
  attention_blocks: tuple[int, ...]
  attention_repeats: int

  @classmethod
  def of(cls, args) -> "Sizes":
    if args.dry_run:
      return cls(True, None, None, vae_frames=3, vae_size=32,
                 ethd_unet=UNetConfig.from_dict(DRY_RUN_ETHD_UNET), frames=4, latent=8, steps=2,
                 train_frames=2, train_steps=2, attention_shape=(2, 512, 5, 64),
                 attention_blocks=(128, 256, 512), attention_repeats=3)
    return cls(False, MEDIUM_UNET, MEDIUM_VAE, vae_frames=8, vae_size=128,
               ethd_unet=UNetConfig(), frames=120, latent=64, steps=25,
               train_frames=args.train_frames, train_steps=args.train_steps,
               attention_shape=(120, 4096, 5, 64), attention_blocks=(256, 512, 1024),
               attention_repeats=10)


# ------------------------------------------------------------------------------------ rows


@dataclasses.dataclass
class Row:
  name: str
  what: str
  status: str = "ok"
  figures: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0


class Skipped(Exception):
  """The row cannot run here (no GPU, no diffusers): reported as skipped, not failed."""


class OutOfBounds(Exception):
  """The row ran but a figure is outside its bound (a parity error): reported as failed."""


def run_row(name: str, what: str, measure: Callable[[dict], None],
            record: Callable[[Row], None]) -> None:
  """`measure(figures)` fills the figures; whatever it raises becomes the row's status, and the
  figures it had filled by then stay."""
  row = Row(name, what)
  progress(f"{name}: {what}")
  start = time.perf_counter()
  try:
    measure(row.figures)
  except Skipped as reason:
    row.status = f"skipped: {reason}"
  except Exception as error:  # noqa: BLE001 - one row's failure must not stop the others
    row.status = f"failed: {type(error).__name__}: {str(error).strip()[:400]}"
  row.seconds = time.perf_counter() - start
  progress(f"{name}: {row.status} ({row.seconds:.1f} s) {format_figures(row.figures)}")
  record(row)


def peak_memory_gb() -> float | None:
  """The device's peak bytes in use so far (this process), where the backend reports it."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / GB


def compiled_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled program (a dict, or a list of one per program in older
  jax; None or no 'flops' where the backend does not count)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return None if flops is None or flops <= 0 else float(flops)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
  return None if not peak else flops / seconds / peak


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ---------------------------------------------------------------------------------- parity


def check_parity(figures: dict, errors: dict[str, float]) -> None:
  """Puts `errors` (name ending in _fp32 or _bf16 -> relative error) into the figures and
  raises OutOfBounds for any over its bound."""
  figures.update(errors)
  over = [f"{name} {value:.2e} > {FP32_TOLERANCE if name.endswith('fp32') else BF16_TOLERANCE}"
          for name, value in errors.items()
          if value > (FP32_TOLERANCE if name.endswith("fp32") else BF16_TOLERANCE)]
  if over:
    raise OutOfBounds("; ".join(over))


class ParityModels:
  """The diffusers references of the parity rows, built once and shared by the rows (the UNet
  serves both the UNet and the ETHD row); a failed build fails every row that needs it."""

  def __init__(self, sizes: Sizes):
    # torch and the tests' builders are needed by the parity rows only.
    import torch  # noqa: PLC0415 (PyTorch is optional on the device machine)

    from tests.helpers import svd_reference  # noqa: PLC0415 (imports PyTorch)
    self.torch, self.reference, self.sizes = torch, svd_reference, sizes
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    on_gpu = jax.default_backend() == "gpu"
    self.device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"

  @functools.cached_property
  def unet(self):
    """(our fp32 UNet, our bf16 UNet, inputs, torch fp32 output, torch bf16 output)."""
    fields = self.sizes.parity_unet or self.reference.UNET_TWO_LEVELS
    model = self.reference.make_unet(fields)
    inputs = self.reference.unet_inputs(fields, batch=1, context_len=1)
    ours_fp32 = unet_from_diffusers(model)
    ours_bf16 = unet_from_diffusers(model, compute=Compute.bf16())
    model.to(self.device)
    return (ours_fp32, ours_bf16, inputs, self.reference.run_torch_unet(model, inputs),
            self.reference.run_torch_unet(model, inputs, autocast_bf16=True))


unet_forward = nnx.jit(lambda unet, inputs: unet(**inputs))
ethd_forward_with_svd_context = nnx.jit(lambda ethd, inputs, lip, conditions: ethd.forward(
    inputs["sample"], inputs["timestep"], lip, inputs["added_time_ids"], conditions=conditions,
    frame_context=True))
vae_encode_mean = nnx.jit(lambda vae, images: vae.encode(images).mean)
vae_decode = nnx.jit(lambda vae, latents, frames: vae.decode(latents, frames),
                     static_argnames="frames")


def parity_unet(models: ParityModels, figures: dict) -> None:
  ours_fp32, ours_bf16, inputs, torch_fp32, torch_bf16 = models.unet
  figures["torch_device"] = models.device
  with jax.default_matmul_precision("highest"):
    got_fp32 = unet_forward(ours_fp32, inputs)
  got_bf16 = unet_forward(ours_bf16, inputs)
  error = models.reference.relative_error
  figures["torch_own_bf16"] = error(torch_bf16, torch_fp32)
  check_parity(figures, {"error_fp32": error(got_fp32, torch_fp32),
                         "error_bf16": error(got_bf16, torch_fp32)})


def parity_ethd_init(models: ParityModels, figures: dict) -> None:
  ours_fp32, ours_bf16, inputs, torch_fp32, torch_bf16 = models.unet
  figures["torch_device"] = models.device
  lip, conditions = models.reference.svd_context_as_tokens(inputs)
  ethd_fp32 = ethd_from_svd(ours_fp32, ETHDConfig(unet=ours_fp32.config))
  ethd_bf16 = ethd_from_svd(ours_bf16, ETHDConfig(unet=ours_bf16.config),
                            compute=Compute.bf16())
  with jax.default_matmul_precision("highest"):
    got_fp32 = ethd_forward_with_svd_context(ethd_fp32, inputs, lip, conditions)
  got_bf16 = ethd_forward_with_svd_context(ethd_bf16, inputs, lip, conditions)
  error = models.reference.relative_error
  figures["torch_own_bf16"] = error(torch_bf16, torch_fp32)
  check_parity(figures, {"error_fp32": error(got_fp32, torch_fp32),
                         "error_bf16": error(got_bf16, torch_fp32)})


def parity_vae(models: ParityModels, figures: dict) -> None:
  torch, sizes = models.torch, models.sizes
  model = models.reference.make_vae(sizes.parity_vae or models.reference.VAE_TINY)
  ours_fp32, ours_bf16 = vae_from_diffusers(model), vae_from_diffusers(model,
                                                                       compute=Compute.bf16())
  model.to(models.device)
  figures["torch_device"] = models.device
  frames = sizes.vae_frames
  images = np.random.default_rng(1).uniform(
      -1, 1, (frames, sizes.vae_size, sizes.vae_size, 3)).astype(np.float32)
  channels_first = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).to(models.device)
  channels_last = lambda x: x.float().permute(0, 2, 3, 1).cpu().numpy()

  def torch_vae(bf16: bool, latents: np.ndarray | None = None):
    with torch.no_grad(), torch.autocast(models.device, torch.bfloat16, enabled=bf16):
      mean = model.encode(channels_first(images)).latent_dist.mean
      decode_input = mean if latents is None else channels_first(latents)
      return channels_last(mean), channels_last(model.decode(decode_input,
                                                             num_frames=frames).sample)

  mean_fp32, decoded_fp32 = torch_vae(False)
  mean_torch_bf16, decoded_torch_bf16 = torch_vae(True, mean_fp32)  # same decoder input
  error = models.reference.relative_error
  figures["torch_own_bf16_encode"] = error(mean_torch_bf16, mean_fp32)
  figures["torch_own_bf16_decode"] = error(decoded_torch_bf16, decoded_fp32)
  with jax.default_matmul_precision("highest"):
    ours_mean = vae_encode_mean(ours_fp32, images)
    ours_decoded = vae_decode(ours_fp32, mean_fp32, frames=frames)
  ours_mean_bf16 = vae_encode_mean(ours_bf16, images)
  ours_decoded_bf16 = vae_decode(ours_bf16, mean_fp32, frames=frames)
  check_parity(figures, {"encode_error_fp32": error(ours_mean, mean_fp32),
                         "decode_error_fp32": error(ours_decoded, decoded_fp32),
                         "encode_error_bf16": error(ours_mean_bf16, mean_fp32),
                         "decode_error_bf16": error(ours_decoded_bf16, decoded_fp32)})


def skip(reason: str) -> Callable[[dict], None]:
  def measure(figures: dict) -> None:
    raise Skipped(reason)
  return measure


def parity_rows(sizes: Sizes, record: Callable[[Row], None]) -> None:
  rows = [("parity_unet", "SVD UNet vs diffusers", parity_unet),
          ("parity_ethd_init", "ETHD at initialisation vs the diffusers UNet",
           parity_ethd_init),
          ("parity_vae", "temporal VAE encode / decode vs diffusers", parity_vae)]
  try:
    import diffusers  # noqa: F401, PLC0415 (optional on the device machine: only these rows)
  except Exception as error:  # noqa: BLE001 - a broken install counts as missing
    for name, what, _ in rows:
      run_row(name, what, skip(f"diffusers missing ({type(error).__name__}: {error})"), record)
    return
  models: list[ParityModels] = []  # built by the first row that runs; its failure is that row's

  def with_models(measure, figures):
    if not models:
      models.append(ParityModels(sizes))
    measure(models[0], figures)

  for name, what, measure in rows:
    run_row(name, what, functools.partial(with_models, measure), record)


# ------------------------------------------------------------------------- full-size ETHD


def random_ethd(config: ETHDConfig, compute: Compute) -> ETHD:
  """Random-init ETHD created on the first local device (`parallel.create_sharded` on a mesh
  of one): the initialiser runs there, no host copy of the weights."""
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])
  return parallel.create_sharded(lambda rngs: ETHD(config, compute=compute, rngs=rngs), mesh)


def ethd_inputs(config: ETHDConfig, frames: int, latent: int, seed: int = 0) -> dict:
  """One clip's noise / latents and conditions at `latent`² (pixels 8x that), batch 1."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  pixels = latent * VAE_DOWNSAMPLE
  return {"latents": normal(1, frames, latent, latent, 4),
          "reference_latent": normal(1, latent, latent, 4),
          "lip_latents": normal(1, frames, config.lip_dim),
          "expression": normal(1, frames, config.expression_dim),
          "reference_expression": normal(1, config.expression_dim),
          "face_mask": np.ones((1, pixels, pixels), np.float32)}


def ethd_call_flops(config: ETHDConfig, frames: int, latent: int) -> float:
  """XLA's FLOP count of one ETHD call on a batch-1 clip, lowered (not compiled) for abstract
  inputs with XLA attention: a cuDNN attention custom call would count as 0 FLOPs."""
  compute = Compute(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention="xla")
  graphdef, state = nnx.split(model_io.abstract(
      lambda rngs: ETHD(config, compute=compute, rngs=rngs)))
  inputs = ethd_inputs(config, frames, latent)
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  sample = jax.ShapeDtypeStruct((1, frames, latent, latent, config.unet.in_channels),
                                jnp.float32)
  return xla_flops(lambda state, *args: nnx.merge(graphdef, state)(*args), state, sample,
                   jax.ShapeDtypeStruct((1,), jnp.float32), spec(inputs["lip_latents"]),
                   spec(inputs["expression"]), spec(inputs["reference_expression"]),
                   spec(inputs["face_mask"]))


def sampling_row(sizes: Sizes, peak: float | None, figures: dict) -> None:
  config = ETHDConfig(unet=sizes.ethd_unet)
  frames, steps = sizes.frames, sizes.steps
  figures.update(frames=frames, latent=sizes.latent, steps=steps)
  start = time.perf_counter()
  ethd = random_ethd(config, Compute.bf16())
  figures["init_s"] = time.perf_counter() - start
  inputs = ethd_inputs(config, frames, sizes.latent)
  frame_conditions = {name: inputs[name] for name in ("lip_latents", "expression")}
  video_conditions = {name: inputs[name] for name in
                      ("reference_latent", "reference_expression", "face_mask")}
  denoiser, params = model_denoiser(ethd, call_ethd)
  sampler = SamplerConfig(steps=steps)

  def sample():
    return sample_video(denoiser, params, inputs["latents"], frame_conditions,
                        video_conditions, sampler=sampler, windows=WINDOWS_512)

  progress("ethd_sampling: first call (compile + sample)")
  start = time.perf_counter()
  jax.block_until_ready(sample())
  first = time.perf_counter() - start
  progress("ethd_sampling: second call (sample)")
  start = time.perf_counter()
  latents = jax.block_until_ready(sample())
  sample_s = time.perf_counter() - start
  figures.update(compile_s=first - sample_s, sample_s=sample_s, s_per_step=sample_s / steps,
                 peak_memory_gb=peak_memory_gb())
  if not np.isfinite(np.asarray(latents)).all():
    raise OutOfBounds("the sampled latents are not all finite")
  calls = steps * plan_windows(frames, WINDOWS_512).windows
  call_flops = ethd_call_flops(config, frames, sizes.latent)
  figures.update(tflops_per_call=call_flops / 1e12,
                 mfu=mfu(calls * call_flops, sample_s, peak))


def ethd_stage_loss(model, batch, key):
  """The `ethd` stage's objective (`ethd.objective.audio_driven_loss`, the stage's defaults: the
  expression chosen between e_v and Di-CTE's e_a, conditions dropped for guidance) on the
  check's one clip, whose e_v stands in for e_a too; no lip weight, so the lip mask is all ones."""
  lip_mask = jnp.ones(batch["latents"].shape[:-1], jnp.float32)
  return audio_driven_loss(model, batch["latents"], batch["reference_latent"],
                           batch["lip_latents"], batch["expression"], batch["expression"],
                           batch["reference_expression"], batch["face_mask"], lip_mask, key), {}


def train_row(sizes: Sizes, peak: float | None, figures: dict) -> None:
  config = ETHDConfig(unet=sizes.ethd_unet)
  frames = sizes.train_frames
  figures.update(frames=frames, latent=sizes.latent)
  compute = Compute(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention="auto",
                    remat="layers")
  start = time.perf_counter()
  model = random_ethd(config, compute)
  schedule = optax.constant_schedule(1e-5)
  optimizer = Optimizer(model, adam_8bit(schedule), wrt=nnx.Param)
  figures["init_s"] = time.perf_counter() - start
  task = Task(name="ethd", model=model, trainable=nnx.Param, loss=ethd_stage_loss,
              batches=iter(()), export=lambda model, folder: None)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer  # the step owns (and donates) the state from here on
  batch = jax.device_put(ethd_inputs(config, frames, sizes.latent))
  key = jax.random.key(0)
  step = jax.jit(make_step(task, graphdef, 1, schedule), donate_argnums=(0,))
  progress("ethd_train_step: compile")
  start = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  figures["compile_s"] = time.perf_counter() - start
  times, losses = [], []
  for index in range(sizes.train_steps + 1):  # the first is a warm-up
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch, jax.random.fold_in(key, index)))
    times.append(time.perf_counter() - start)
    losses.append(float(metrics["loss"]))
  step_s = statistics.median(times[1:])
  figures.update(step_s=step_s, first_step_s=times[0], peak_memory_gb=peak_memory_gb(),
                 last_loss=losses[-1])
  if not np.isfinite(losses).all():
    raise OutOfBounds(f"non-finite losses {losses}")
  xla_step_flops = compiled_flops(compiled)
  figures["xla_step_tflops"] = None if xla_step_flops is None else xla_step_flops / 1e12
  model_flops = 3 * ethd_call_flops(config, frames, sizes.latent)  # forward + 2x backward
  figures.update(model_tflops=model_flops / 1e12, mfu=mfu(model_flops, step_s, peak))


# ------------------------------------------------------------------------------- attention


def attention_row(sizes: Sizes, figures: dict) -> None:
  """Each implementation's forward and forward + backward; the first that runs is the
  reference of the others' forward error. XLA's may not fit: that is a figure, not a failure."""
  shape = sizes.attention_shape
  figures["shape"] = "x".join(map(str, shape))
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  variants = [("cudnn", lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn"))]
  variants += [(f"blocked{block}", lambda q, k, v, block=block: blocked_attention(
      q, k, v, block=block)) for block in sizes.attention_blocks]
  variants += [("xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                                    implementation="xla"))]
  reference, failures = None, []
  for name, attend in variants:
    if name == "cudnn" and jax.default_backend() != "gpu":
      figures[name] = "skipped: no GPU"
      continue
    forward = jax.jit(attend)
    backward = jax.jit(jax.grad(lambda q, k, v, attend=attend: attend(q, k, v).astype(
        jnp.float32).sum(), argnums=(0, 1, 2)))
    try:
      out = jax.block_until_ready(forward(q, k, v))
      figures[f"{name}_fwd_ms"] = median_seconds(functools.partial(forward, q, k, v),
                                                 sizes.attention_repeats) * 1e3
      if reference is None:
        reference = out.astype(jnp.float32)
      else:
        figures[f"{name}_error"] = float(jnp.abs(out.astype(jnp.float32) - reference).max()
                                         / jnp.abs(reference).max())
      del out
      figures[f"{name}_fwd_bwd_ms"] = median_seconds(functools.partial(backward, q, k, v),
                                                     sizes.attention_repeats) * 1e3
    except Exception as error:  # noqa: BLE001 - recorded per implementation
      message = f"{type(error).__name__}: {str(error).strip()[:160]}"
      if name == "xla":
        figures[name] = f"did not fit or run: {message}"
      else:
        figures[name] = f"failed: {message}"
        failures.append(name)
  if failures:
    raise RuntimeError(f"{', '.join(failures)} failed (see figures)")


# ----------------------------------------------------------------------------------- groups


def size_name(sizes: Sizes) -> str:
  return "tiny (dry run)" if sizes.dry_run else "full-size"


def run_group(group: str, args, record: Callable[[Row], None]) -> None:
  sizes = Sizes.of(args)
  peak = peak_flops_per_device(args.peak_tflops)
  progress(f"group {group}: jax {jax.__version__}, {jax.local_devices()[0].device_kind}, "
           f"peak {peak and peak / 1e12} TFLOP/s")
  if group == "parity":
    parity_rows(sizes, record)
  elif group == "attention":
    run_row("attention", "spatial self-attention: cuDNN vs blocked vs XLA",
            lambda figures: attention_row(sizes, figures), record)
  elif group == "sampling":
    run_row("ethd_sampling", f"{size_name(sizes)} random-init ETHD sampling {sizes.frames} "
            f"frames, {sizes.steps} Euler steps, bf16",
            lambda figures: sampling_row(sizes, peak, figures), record)
  elif group == "train":
    run_row("ethd_train_step", f"{size_name(sizes)} ETHD train step, {sizes.train_frames} "
            "frames, bf16 / fp32 params, 8-bit Adam, remat layers",
            lambda figures: train_row(sizes, peak, figures), record)
  else:
    raise ValueError(f"unknown group {group!r}")


GROUP_ROWS = {"parity": ("parity_unet", "parity_ethd_init", "parity_vae"),
              "attention": ("attention",), "sampling": ("ethd_sampling",),
              "train": ("ethd_train_step",)}


def run_group_in_child(group: str, argv: list[str], time_box: float) -> list[Row]:
  """`group` in a fresh process of this script, killed after `time_box` seconds; rows it did
  not report come back failed, with why."""
  with tempfile.TemporaryDirectory() as folder:
    results = Path(folder) / "rows.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
               **{START_VARIABLE: str(_START)})
    if group == "parity":  # torch shares the GPU: JAX takes memory as it needs it
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--group", group,
               "--results", str(results)]
    try:
      code = subprocess.run(command, check=False, env=env, timeout=time_box).returncode
      why = f"the child process exited with code {code} before reporting this row"
    except subprocess.TimeoutExpired:
      why = f"TimeoutExpired: group {group!r} ran past its {time_box:.0f} s time box"
    rows = ([Row(**json.loads(line)) for line in results.read_text().splitlines()]
            if results.exists() else [])
  reported = {row.name for row in rows}
  rows += [Row(name, f"group {group}", status=f"failed: {why}")
           for name in GROUP_ROWS[group] if name not in reported]
  return rows


# ------------------------------------------------------------------------------------ table


def format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.3g}"
  return str(value)


def format_figures(figures: dict) -> str:
  return "  ".join(f"{name}={format_value(value)}" for name, value in figures.items())


def table(rows: list[Row]) -> str:
  width = max(len(row.name) for row in rows)
  lines = [f"{'row':<{width}}  {'time':>6}  status / figures"]
  for row in rows:
    lines.append(f"{row.name:<{width}}  {row.seconds:5.0f}s  {row.status}")
    lines.append(f"{'':<{width}}  {'':>6}  {row.what}")
    if row.figures:
      lines.append(f"{'':<{width}}  {'':>6}  {format_figures(row.figures)}")
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="also write the table as JSON to this file")
  parser.add_argument("--dry-run", action="store_true",
                      help="tiny shapes on the CPU: checks the script, says nothing of speed")
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="the chip's dense bf16 peak for MFU (default: from the device kind)")
  parser.add_argument("--train-frames", type=int, default=16)
  parser.add_argument("--train-steps", type=int, default=5, help="timed steps after a warm-up")
  parser.add_argument("--groups", nargs="+", choices=sorted(GROUP_ROWS),
                      default=["parity", "attention", "sampling", "train"])
  parser.add_argument("--time-scale", type=float, default=1.0,
                      help="multiplies every group's time box")
  parser.add_argument("--group", help=argparse.SUPPRESS)  # internal: a child's group
  parser.add_argument("--results", help=argparse.SUPPRESS)  # internal: a child's rows file
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.group:  # a child: run one group, append each row to the results file as it ends
    def record(row: Row) -> None:
      with open(args.results, "a") as results:
        results.write(json.dumps(dataclasses.asdict(row), default=str) + "\n")
    run_group(args.group, args, record)
    return 0

  start = time.perf_counter()
  rows: list[Row] = []
  unused = 0.0  # seconds the groups so far left of their boxes
  for group in args.groups:
    own = (DRY_RUN_TIME_BOX if args.dry_run else TIME_BOXES[group]) * args.time_scale
    time_box = own + unused
    progress(f"group {group} (time box {time_box:.0f} s)")
    began = time.perf_counter()
    rows += run_group_in_child(group, argv, time_box)
    unused = max(0.0, time_box - (time.perf_counter() - began))
  total = time.perf_counter() - start
  failed = [row.name for row in rows if row.status.startswith("failed")]
  # Only now does this process touch the device: the children had it to themselves.
  device = f"{jax.local_devices()[0].device_kind} ({jax.default_backend()})"
  print(f"device_check{' --dry-run' if args.dry_run else ''}: {device}, jax {jax.__version__}")
  print(table(rows))
  print(f"total wall time {total:.0f} s; {len(rows) - len(failed)} of {len(rows)} rows ok or "
        f"skipped{'; failed: ' + ', '.join(failed) if failed else ''}")
  if args.out:
    Path(args.out).write_text(json.dumps({
        "device": device,
        "jax": jax.__version__, "dry_run": args.dry_run, "total_s": total, "failed": failed,
        "rows": [dataclasses.asdict(row) for row in rows]}, indent=2, default=str) + "\n")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
