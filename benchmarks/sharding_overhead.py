"""Steps/s of a tiny-config training step on 1 device vs 8 simulated CPU devices, same global
batch: what the data x FSDP machinery (parameter all-gathers, gradient reduce-scatters, batch
split) costs when there is no real parallel hardware.

  .venv/bin/python benchmarks/sharding_overhead.py [--steps 20] [--batch 8]

All 8 "devices" are threads of one host (`--xla_force_host_platform_device_count=8`, set below
before jax is imported), sharing the machine's cores, so 8 devices cannot be faster than 1 here;
the figure is the overhead of the partitioned program (collectives, smaller kernels, scheduling),
an upper bound on what sharding costs a tiny model. The step: a one-level SVD UNet (resnets,
spatial and temporal attention; 2 frames of 8x8 latents), MSE to a target, grad, 8-bit Adam;
parameters created on their shards by the UNet's logical-axis table. Timing: median of `--steps`
steps after two warm-up steps (compile excluded), each ended by `block_until_ready`.
Figures only: nothing is asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from etalk_jax import parallel  # noqa: E402
from etalk_jax.svd import UNetConfig, UNetSpatioTemporal  # noqa: E402
from etalk_jax.train.optim import adam_8bit  # noqa: E402

# The 8-device parity test's step and batch (tests/helpers/parallel_step.py), on a wider UNet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.parallel_step import UNET_ONE_LEVEL, make_batch, train_step  # noqa: E402

UNET = dict(UNET_ONE_LEVEL, block_out_channels=(64,), cross_attention_dim=32)


def time_steps(step, params, opt_state, batch, steps: int) -> tuple[float, float]:
  start = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, batch)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - start
  params, opt_state, loss = step(params, opt_state, batch)
  jax.block_until_ready(loss)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready((params, loss))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), compile_s


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args(argv)
  config = UNetConfig.from_dict(UNET)
  build = lambda rngs: UNetSpatioTemporal(config, rngs=rngs)  # noqa: E731
  tx = adam_8bit(1e-4)
  batch = make_batch(args.batch, context_dim=UNET["cross_attention_dim"])
  results = {}

  one = jax.devices()[0]
  graphdef, params = nnx.split(parallel.create_sharded(
      build, parallel.make_mesh({"data": 1}, devices=[one])))
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  step = jax.jit(train_step(graphdef, tx), donate_argnums=(0, 1))
  results["1 device"] = time_steps(step, params, jax.jit(tx.init)(params),
                                   jax.device_put(batch, one), args.steps)

  for shape in ({"data": 8, "fsdp": 1}, {"data": 2, "fsdp": 4}, {"data": 1, "fsdp": 8}):
    mesh = parallel.make_mesh(shape)
    model = parallel.create_sharded(build, mesh)
    axes = parallel.model_axes(model)
    graphdef, params = nnx.split(model)
    param_shardings = parallel.state_shardings(params, mesh, family_axes=axes)
    opt_shardings = parallel.state_shardings(jax.eval_shape(tx.init, params), mesh,
                                             family_axes=axes)
    batch_shardings = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    step = jax.jit(train_step(graphdef, tx), donate_argnums=(0, 1),
                   in_shardings=(param_shardings, opt_shardings, batch_shardings),
                   out_shardings=(param_shardings, opt_shardings, None))
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    results[f"8 devices {shape['data']} data x {shape['fsdp']} fsdp"] = time_steps(
        step, params, opt_state, jax.device_put(batch, batch_shardings), args.steps)

  base = results["1 device"][0]
  print(f"tiny one-level UNet ({count:,} params), global batch {args.batch}, 2 frames 8x8, "
        f"8-bit Adam; {os.cpu_count()} CPU cores; median of {args.steps} steps")
  print(f"{'layout':<32} {'ms/step':>8} {'steps/s':>8} {'vs 1 device':>11} {'compile s':>9}")
  for name, (seconds, compile_s) in results.items():
    print(f"{name:<32} {seconds * 1e3:>8.1f} {1 / seconds:>8.2f} {seconds / base:>10.2f}x "
          f"{compile_s:>9.1f}")


if __name__ == "__main__":
  main()
