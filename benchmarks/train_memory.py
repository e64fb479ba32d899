"""Per-device memory of one full-size ETHD training step on 8-way FSDP, from XLA's own numbers.

  .venv/bin/python benchmarks/train_memory.py --decompose --frames 120   # the figure (~8 min)
  .venv/bin/python benchmarks/train_memory.py --decompose --frames 120 --backend cpu  # CPU path
  .venv/bin/python benchmarks/train_memory.py --frames 2 4              # whole-step compiles
  .venv/bin/python benchmarks/train_memory.py --levels 1 --frames 2 8   # quick, first level only

The step is the paper's setting at 512² (64×64 latents), batch 1 per device on a mesh of 8
simulated CPU devices (`--xla_force_host_platform_device_count=8`, set below before jax is
imported), all 8 on the `fsdp` axis: the self-driven dropout reconstruction loss
(`ethd.objective.reconstruction_loss`) -> grad -> 8-bit Adam -> new parameters. Parameters are
fp32 masters sharded by the logical-axis table, compute is bf16, remat is `Compute.remat`
("layers" by default, as configs/ethd_512.py trains: every res block and transformer of the
UNet keeps only its input, and inside a transformer each spatial / temporal block again).
Attention is chosen as on `--backend` (default "gpu", through `attention.target_backend`) with
attention "xla": `layers.attention.blocked_attention` from 1024 keys on, 512 keys per block on a
GPU (128 on the CPU), whose custom VJP keeps no logits; plain attention below. That is a code
path a GPU runs (`--config.train.attention=xla`); the default "auto" takes cuDNN flash attention
for the bf16 calls instead, which holds less (no per-block logits) and cannot be compiled here.

Two ways to measure:

1. Whole step (default): lower and compile the sharded step for ShapeDtypeStructs and read
   `Compiled.memory_analysis()`. Honest only for short clips: XLA:CPU compiles the 1.58 G-param
   backward slowly (20-30 min at 2-4 frames), and it undoes rematerialisation: its CSE merges
   the recomputed forward into the original (the flag below turns that off) and even then its
   scheduler runs recomputations long before their backward needs them (a buffer-liveness
   dump of `--levels 1` shows the peak inside the forward pass, holding nine blocks' GEGLU
   intermediates). It also computes bf16 dots in f32 with converted copies. So whole-step
   figures on the CPU overstate a GPU's; they were, at 2 / 4 frames, 41 / 68 GB with block remat.
2. `--decompose`: the peak as remat intends it, measured part by part at the real clip length:
   state (sharded params + gradients + 8-bit Adam) + the residuals the backward pass keeps (JAX's
   own list, `saved_residuals`, of the traced step for one clip) + the largest single layer's
   forward + backward compiled alone at that length (`memory_analysis()`, its parameters
   whole as FSDP gathers them, its gradient whole before the reduce-scatter). Every remat'd
   layer call the UNet makes is recorded while tracing and compiled.

Measured before the choice per backend (blocks of 128 keys, the CPU's), `--decompose --frames
120`, per device:
  params 0.79 + gradients 0.79 + 8-bit Adam 0.41 GB + residuals 11.85 GB (126 arrays)
  + largest layer (the first level's ETHDTransformer, 120 x 64² x 320: 45.68 GB)
  = 59.5 GB: fits 80 GB. Holding every parameter's fp32 gradient unsharded as well (an XLA that
  all-reduces instead of reduce-scattering) adds 5.5 GB: 65 GB. The layer figures are XLA:CPU's,
  whose bf16 dots run in f32 (conservative for a GPU).
Figures only: nothing is asserted.
"""

from __future__ import annotations

import os

# XLA:CPU by default undoes rematerialisation: CSE merges the recomputed forward with the
# original one, and its concurrency-optimised scheduler runs recomputations early. Both off, the
# CPU schedules for memory as the GPU and TPU compilers do (a 10-layer check: 40 -> 12 live
# intermediates with per-layer remat, as expected).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_disable_hlo_passes=cse "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax._src.ad_checkpoint import saved_residuals  # noqa: E402 (what print_saved_residuals prints)
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from etalk_jax import parallel  # noqa: E402
from etalk_jax.ethd.model import ETHD, ETHDConfig  # noqa: E402
from etalk_jax.ethd.objective import reconstruction_loss  # noqa: E402
from etalk_jax.layers import attention  # noqa: E402
from etalk_jax.layers.compute import REMAT_POLICIES, Compute  # noqa: E402
from etalk_jax.svd import UNetConfig, unet as unet_module  # noqa: E402
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


def ethd_loss(graphdef, params, batch, key):
  loss, _ = reconstruction_loss(nnx.merge(graphdef, params), batch["clean"],
                                batch["reference_latents"], batch["lip_latents"],
                                batch["expression"], batch["reference_expression"],
                                batch["face_mask"], batch["lip_mask"], key)
  return loss


def step_fn(graphdef, tx):
  def step(params, opt_state, batch, key):
    loss, grads = jax.value_and_grad(lambda p: ethd_loss(graphdef, p, batch, key))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def first_levels(levels: int) -> UNetConfig:
  """SVD-XT's UNet cut to its first `levels` resolutions at full width: the same blocks at the
  same sizes, for quick checks of how memory scales (its figures are not the full model's)."""
  full = UNetConfig()
  count = len(full.block_out_channels)
  if not 1 <= levels <= count:
    raise ValueError(f"--levels must be 1 to {count}, got {levels}")
  return UNetConfig(down_block_types=full.down_block_types[:levels],
                    up_block_types=full.up_block_types[count - levels:],
                    block_out_channels=full.block_out_channels[:levels],
                    num_attention_heads=tuple(full.num_attention_heads)[:levels])


def sharded_setup(remat: str, devices: int, tiny: bool = False, levels: int | None = None):
  """(mesh, ETHD config, graphdef, abstract sharded params, abstract 8-bit Adam state with its
  shardings, 8-bit Adam) on an `fsdp` mesh of `devices`."""
  mesh = parallel.make_mesh({"data": 1, "fsdp": devices})
  compute = Compute(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention="xla", remat=remat)
  if tiny:
    config = ETHDConfig(unet=UNetConfig.from_dict(TINY_UNET))
  else:
    config = ETHDConfig(unet=first_levels(levels)) if levels else ETHDConfig()
  model = parallel.abstract_sharded(lambda rngs: ETHD(config, compute=compute, rngs=rngs), mesh)
  axes = parallel.model_axes(model)
  graphdef, params = nnx.split(model)
  tx = adam_8bit(1e-5)
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = parallel.state_shardings(opt_state, mesh, family_axes=axes)
  opt_state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                sharding=s),
                           opt_state, opt_shardings)
  return mesh, config, graphdef, params, opt_state, tx


def batch_shapes(config: ETHDConfig, frames: int, batch: int, mesh=None) -> dict:
  """ShapeDtypeStructs of a training batch (sharded over the batch axes when `mesh` is given)."""
  shapes = {
      "clean": (batch, frames, LATENT, LATENT, 4),
      "reference_latents": (batch, LATENT, LATENT, 4),
      "lip_latents": (batch, frames, config.lip_dim),
      "expression": (batch, frames, config.expression_dim),
      "reference_expression": (batch, config.expression_dim),
      "face_mask": (batch, PIXELS, PIXELS),
      "lip_mask": (batch, PIXELS, PIXELS),
  }
  return {name: jax.ShapeDtypeStruct(
      shape, jnp.float32,
      sharding=None if mesh is None else parallel.batch_sharding(mesh, len(shape)))
      for name, shape in shapes.items()}


def per_device_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs / arrays."""
  return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


def measure(frames: int, remat: str, devices: int, global_batch: int, tiny: bool = False,
            levels: int | None = None) -> dict:
  global LATENT, PIXELS
  if tiny:
    LATENT, PIXELS = 8, 64
  mesh, config, graphdef, params, opt_state, tx = sharded_setup(remat, devices, tiny, levels)
  param_shardings = jax.tree.map(lambda leaf: leaf.sharding, params)
  opt_shardings = jax.tree.map(lambda leaf: leaf.sharding, opt_state)
  batch = batch_shapes(config, frames, global_batch, mesh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  step = jax.jit(step_fn(graphdef, tx), donate_argnums=(0, 1),
                 out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, P())))
  start = time.perf_counter()
  with jax.set_mesh(mesh):  # the model's activation constraints (layers.sharding)
    lowered = step.lower(params, opt_state, batch, key)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  result = {
      "frames": frames, "remat": remat, "devices": devices, "global_batch": global_batch,
      "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
      "params_gb": per_device_bytes(params) / GB, "opt_state_gb": per_device_bytes(opt_state) / GB,
      "argument_gb": memory.argument_size_in_bytes / GB,
      "output_gb": memory.output_size_in_bytes / GB,
      "alias_gb": memory.alias_size_in_bytes / GB,
      "temp_gb": memory.temp_size_in_bytes / GB,
  }
  result["peak_gb"] = (result["argument_gb"] + result["output_gb"] - result["alias_gb"]
                       + result["temp_gb"])
  return result


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def decompose(frames: int, devices: int, levels: int | None = None) -> dict:
  """The step's per-device peak, part by part, at the real clip length (see the module doc):
  state (sharded params, gradients, 8-bit Adam) + what the backward pass keeps (JAX's own list of
  saved residuals for one clip) + the largest single layer's forward + backward at `frames`
  (compiled alone: `memory_analysis()`; its parameters whole, as FSDP gathers them)."""
  _, config, graphdef, params, opt_state, _ = sharded_setup("layers", devices, levels=levels)
  state_gb = {"params": per_device_bytes(params) / GB,
              "gradients": per_device_bytes(params) / GB,
              "optimizer": per_device_bytes(opt_state) / GB}

  # Record each distinct rematerialised layer call (module, inputs, how it is called) while
  # tracing; the UNet calls them through `call_layer`.
  layers: dict = {}
  original = unet_module.call_layer

  def recording(remat, layer, *args, **options):
    signature = (type(layer).__name__, str(jax.tree.map(lambda x: (x.shape, x.dtype), args)))
    if signature not in layers:
      call = options.get("call", lambda layer, *args: layer(*args))
      layers[signature] = (nnx.graphdef(layer), _abstract(nnx.state(layer)), _abstract(args),
                           call)
    return original(remat, layer, *args, **options)

  unet_module.call_layer = recording
  try:  # one clip: batch 1 per device
    residuals = saved_residuals(functools.partial(ethd_loss, graphdef), _abstract(params),
                                batch_shapes(config, frames, 1),
                                jax.ShapeDtypeStruct((2,), jnp.uint32))
  finally:
    unet_module.call_layer = original
  kept = [(aval, why) for aval, why in residuals if not why.startswith("from the argument")]
  residual_gb = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in kept) / GB

  layer_rows = []
  for (name, _), (layer_graphdef, layer_state, args, call) in layers.items():
    def forward_backward(state, args, layer_graphdef=layer_graphdef, call=call):
      out, vjp = jax.vjp(lambda s, a: call(nnx.merge(layer_graphdef, s), *a), state, args)
      return vjp(jnp.ones_like(out))
    memory = jax.jit(forward_backward).lower(layer_state, args).compile().memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes) / GB
    layer_rows.append({"layer": name, "input": tuple(args[0].shape), "peak_gb": peak})
  worst = max(layer_rows, key=lambda row: row["peak_gb"])
  total = sum(state_gb.values()) + residual_gb + worst["peak_gb"]
  return {"frames": frames, "state_gb": state_gb, "residual_gb": residual_gb,
          "residual_count": len(kept), "layers": layer_rows, "worst_layer": worst,
          "peak_gb": total}


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
  parser.add_argument("--remat", default="layers", choices=sorted(REMAT_POLICIES))
  parser.add_argument("--tiny", action="store_true", help="a one-level ETHD: a quick check")
  parser.add_argument("--levels", type=int,
                      help="only the UNet's first LEVELS resolutions, full width: a quicker check")
  parser.add_argument("--json", help="append each row as a JSON line to this file")
  parser.add_argument("--decompose", action="store_true",
                      help="per-device peak at the given frame counts, part by part (see above)")
  parser.add_argument("--backend", default="gpu", choices=("cpu", "gpu", "tpu"),
                      help="choose attention kernels as on this backend (default: gpu)")
  args = parser.parse_args(argv)
  print(f"attention as on {args.backend!r}: xla path, blocked from "
        f"{attention.BLOCKED_MIN_LENGTH} keys on, {attention.KEY_BLOCK[args.backend]} keys per "
        "block", flush=True)
  with attention.target_backend(args.backend):
    return run(args)


def run(args):
  devices = jax.device_count()
  if args.decompose:
    for frames in args.frames:
      start = time.perf_counter()
      parts = decompose(frames, devices, args.levels)
      for row in parts["layers"]:
        print(f"  layer {row['layer']:<30s} input {str(row['input']):<22s} "
              f"forward+backward {row['peak_gb']:.2f} GB")
      state = parts["state_gb"]
      print(f"{frames} frames: params {state['params']:.2f} + gradients {state['gradients']:.2f} "
            f"+ 8-bit Adam {state['optimizer']:.2f} GB (sharded over {devices}) + residuals the "
            f"backward keeps {parts['residual_gb']:.2f} GB ({parts['residual_count']} arrays) + "
            f"largest layer {parts['worst_layer']['layer']} {parts['worst_layer']['peak_gb']:.2f} "
            f"GB = {parts['peak_gb']:.2f} GB per device; fits 80 GB: "
            f"{'yes' if parts['peak_gb'] < 80 else 'NO'} ({time.perf_counter() - start:.0f} s)",
            flush=True)
      if args.json:
        with open(args.json, "a") as f:
          f.write(json.dumps(parts) + "\n")
    return [parts]
  rows = []
  print(f"{'tiny' if args.tiny else 'full-size'} ETHD training step, {devices} devices (fsdp), "
        f"batch 1 per device, {64 if args.tiny else 512}² (latents {8 if args.tiny else 64}²), "
        f"bf16 compute / fp32 params, 8-bit Adam, remat={args.remat}",
        flush=True)
  header = (f"{'frames':>6} {'compile s':>9} {'params':>7} {'opt':>6} {'args':>7} {'outputs':>7} "
            f"{'aliased':>7} {'temps':>7} {'peak GB/device':>14}")
  print(header, flush=True)
  for frames in args.frames:
    row = measure(frames, args.remat, devices, devices, args.tiny, args.levels)
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
