"""Per-device memory of one full-size ETHD training step on 8-way FSDP, from XLA's own numbers.

  .venv/bin/python benchmarks/train_memory.py --frames 2 4 8      # figures for those clips
  .venv/bin/python benchmarks/train_memory.py --frames 2 --remat none

The step is the paper's setting at 512² (64×64 latents), batch 1 per device on a mesh of 8
simulated CPU devices (`--xla_force_host_platform_device_count=8`, set below before jax is
imported), all 8 on the `fsdp` axis: the self-driven dropout reconstruction loss
(`ethd.objective.reconstruction_loss`: SVD's EDM preconditioning, log-normal sigma, masked
(σ²+1)/σ² weighting) -> grad -> 8-bit Adam (`train.optim.adam_8bit`) -> new parameters, all in
one `jax.jit` with parameters and optimizer state donated. Parameters are fp32 masters, compute
is bf16 (`Compute(dtype=bf16, param_dtype=fp32)`); rematerialisation is the model's own switch
`Compute.remat` ("blocks": each UNet down / mid / up block keeps only its inputs for the
backward pass, `jax.checkpoint_policies.nothing_saveable`), so no model file changes.
Parameters and optimizer state are sharded by the logical-axis table (parallel/logical.py) and
DEFAULT_RULES; the batch over (data, fsdp).

Nothing is materialised: the model is abstract and the step is lowered for ShapeDtypeStructs
carrying their shardings, then compiled; `Compiled.memory_analysis()` gives per-device bytes of
the SPMD-partitioned program: arguments (params + optimizer state + batch), outputs, aliased
(donated) bytes and temporaries. Peak per device ≈ arguments + outputs − aliased + temporaries.

Compiling the full 1.58 G-parameter model's backward pass at 120 frames on a 2-core CPU is not
practical, so the script measures small clips and extrapolates linearly to 120 frames:
parameter and optimizer memory does not depend on frames; activations (temporaries) grow
linearly with them (every layer is per frame or attends across the 25-ish frames of a clip;
temporal attention logits grow as frames² but are (batch·h·w, heads, F, F): at 120 frames and
64² that is 4096·5·120²·2 bytes = 0.59 GB per layer at the first level, and a linear fit of a few
points does not see it, so the extrapolation adds that term separately and says so).
Measured (2-core shared CPU, jax 0.10.2, remat=blocks; per device; params 0.792 GB + 8-bit Adam
state 0.410 GB, arguments 1.205 GB, outputs 1.202 GB, all donated):
  2 frames: compile 2003 s, temporaries 39.95 GB, peak 41.16 GB
  4 frames: compile 1226 s, temporaries 67.02 GB, peak 68.22 GB
Linear fit: 14.09 GB + 13.53 GB/frame -> 120 frames 1638 GB (+0.59 GB F² logits): does NOT fit
80 GB as compiled by XLA:CPU; 80 GB is reached at ~4.9 frames. At 4 frames the SPMD partitioner
reports "involuntary full rematerialization" of bf16[1,4,20,64,5] tensors (the expression-token
attention at the 1280-channel level): weight shardings propagate into activations because the
model sets no activation sharding constraints, so parts of the step run replicated; a
`with_sharding_constraint` on block activations (batch over data x fsdp) is the next thing to
try, plus `context` (frame) parallelism for 120-frame windows. XLA:CPU has no latency-hiding scheduler and no memory-aware
collective scheduling, so the temporaries likely include whole gathered fp32 / bf16 copies of
the 1.58 G parameters and unsharded gradients before their reduce-scatter (6.3 + 3.2 + 6.3 GB if
all live at once): a frame-independent part that a GPU/TPU compile schedules away.
Figures only: nothing is asserted. XLA:CPU's buffer assignment is not a GPU's, so the figures are
an estimate of what an 80 GB accelerator would need, not a measurement on one.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from etalk_jax import parallel  # noqa: E402
from etalk_jax.ethd.model import ETHD, ETHDConfig  # noqa: E402
from etalk_jax.ethd.objective import reconstruction_loss  # noqa: E402
from etalk_jax.layers.compute import Compute  # noqa: E402
from etalk_jax.svd import UNetConfig  # noqa: E402
from etalk_jax.train.optim import adam_8bit  # noqa: E402

GB = 1e9
LATENT, PIXELS = 64, 512
# `--tiny`: a one-level ETHD at 8x8 latents (64² pixels), to check the script end to end in a
# minute; its figures say nothing about the full model.
TINY_UNET = dict(
    sample_size=8, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",),
    up_block_types=("CrossAttnUpBlockSpatioTemporal",), block_out_channels=(64,),
    addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, layers_per_block=1,
    cross_attention_dim=32, transformer_layers_per_block=1, num_attention_heads=2, num_frames=8)


def step_fn(graphdef, tx):
  def step(params, opt_state, batch, key):
    def loss_fn(params):
      loss, _ = reconstruction_loss(nnx.merge(graphdef, params), batch["clean"],
                                    batch["reference_latents"], batch["lip_latents"],
                                    batch["expression"], batch["reference_expression"],
                                    batch["face_mask"], batch["lip_mask"], key)
      return loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def measure(frames: int, remat: str, devices: int, global_batch: int, tiny: bool = False
            ) -> dict:
  global LATENT, PIXELS
  if tiny:
    LATENT, PIXELS = 8, 64
  mesh = parallel.make_mesh({"data": 1, "fsdp": devices})
  compute = Compute(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention="xla", remat=remat)
  config = ETHDConfig(unet=UNetConfig.from_dict(TINY_UNET)) if tiny else ETHDConfig()
  model = parallel.abstract_sharded(lambda rngs: ETHD(config, compute=compute, rngs=rngs), mesh)
  axes = parallel.model_axes(model)
  graphdef, params = nnx.split(model)
  tx = adam_8bit(1e-5)
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = parallel.state_shardings(opt_state, mesh, family_axes=axes)
  opt_state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                sharding=s),
                           opt_state, opt_shardings)
  param_shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
  shapes = {
      "clean": (global_batch, frames, LATENT, LATENT, 4),
      "reference_latents": (global_batch, LATENT, LATENT, 4),
      "lip_latents": (global_batch, frames, config.lip_dim),
      "expression": (global_batch, frames, config.expression_dim),
      "reference_expression": (global_batch, config.expression_dim),
      "face_mask": (global_batch, PIXELS, PIXELS),
      "lip_mask": (global_batch, PIXELS, PIXELS),
  }
  batch = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=parallel.batch_sharding(mesh, len(s)))
           for k, s in shapes.items()}
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  step = jax.jit(step_fn(graphdef, tx), donate_argnums=(0, 1),
                 out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, P())))
  start = time.perf_counter()
  lowered = step.lower(params, opt_state, batch, key)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  per_device = lambda tree: sum(  # noqa: E731
      int(np.prod(s.shard_shape(leaf.shape))) * leaf.dtype.itemsize
      for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
          jax.tree.map(lambda leaf: leaf.sharding, tree))))
  result = {
      "frames": frames, "remat": remat, "devices": devices, "global_batch": global_batch,
      "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
      "params_gb": per_device(params) / GB, "opt_state_gb": per_device(opt_state) / GB,
      "argument_gb": memory.argument_size_in_bytes / GB,
      "output_gb": memory.output_size_in_bytes / GB,
      "alias_gb": memory.alias_size_in_bytes / GB,
      "temp_gb": memory.temp_size_in_bytes / GB,
  }
  result["peak_gb"] = (result["argument_gb"] + result["output_gb"] - result["alias_gb"]
                       + result["temp_gb"])
  return result


def extrapolate(rows: list[dict], frames: int = 120) -> dict:
  """Least-squares line of temporaries over frames (at least two clip lengths), evaluated at
  `frames`; arguments and outputs (parameters, optimizer state, the batch) scale by their
  measured per-frame part too."""
  x = np.array([r["frames"] for r in rows], float)
  fit = {}
  for field in ("temp_gb", "peak_gb"):
    slope, intercept = np.polyfit(x, [r[field] for r in rows], 1)
    fit[field] = intercept + slope * frames
    fit[field + "_per_frame"] = slope
  # Temporal attention logits (b·h·w, heads, F, F) in bf16 at the first level, one layer live:
  # grows as F², invisible to a linear fit of short clips.
  fit["temporal_logits_gb"] = LATENT * LATENT * 5 * frames * frames * 2 / GB
  fit["peak_gb_with_logits"] = fit["peak_gb"] + fit["temporal_logits_gb"]
  fit["frames"] = frames
  return fit


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, nargs="+", default=[2, 4, 8])
  parser.add_argument("--remat", default="blocks", choices=["none", "blocks", "blocks_save_dots"])
  parser.add_argument("--tiny", action="store_true", help="a one-level ETHD: a quick check")
  parser.add_argument("--json", help="append each row as a JSON line to this file")
  args = parser.parse_args(argv)
  devices = jax.device_count()
  rows = []
  print(f"{'tiny' if args.tiny else 'full-size'} ETHD training step, {devices} devices (fsdp), batch 1 per device, "
        f"{64 if args.tiny else 512}² (latents {8 if args.tiny else 64}²), bf16 compute / fp32 params, 8-bit Adam, remat={args.remat}",
        flush=True)
  header = (f"{'frames':>6} {'compile s':>9} {'params':>7} {'opt':>6} {'args':>7} {'outputs':>7} "
            f"{'aliased':>7} {'temps':>7} {'peak GB/device':>14}")
  print(header, flush=True)
  for frames in args.frames:
    row = measure(frames, args.remat, devices, devices, args.tiny)
    rows.append(row)
    print(f"{frames:>6} {row['compile_s']:>9.1f} {row['params_gb']:>7.3f} "
          f"{row['opt_state_gb']:>6.3f} {row['argument_gb']:>7.3f} {row['output_gb']:>7.3f} "
          f"{row['alias_gb']:>7.3f} {row['temp_gb']:>7.3f} {row['peak_gb']:>14.3f}", flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")
  if len(rows) >= 2:
    fit = extrapolate(rows)
    print(f"\nextrapolated (linear in frames, from {[r['frames'] for r in rows]}) to 120 frames: "
          f"temporaries {fit['temp_gb']:.2f} GB ({fit['temp_gb_per_frame']:.3f} GB/frame), "
          f"peak {fit['peak_gb']:.2f} GB per device; + temporal attention logits (F²) "
          f"{fit['temporal_logits_gb']:.2f} GB -> {fit['peak_gb_with_logits']:.2f} GB. "
          f"Fits 80 GB: {'yes' if fit['peak_gb_with_logits'] < 80 else 'NO'} "
          "(an extrapolation from short clips on XLA:CPU, not a measurement)")
  return rows


if __name__ == "__main__":
  sys.exit(main() and 0)
