"""Splash attention (Pallas interpret mode) under a data x fsdp mesh of 8 simulated CPU devices,
against the same kernel on one device: outputs and gradients. Run by test_attention.py in a
subprocess whose XLA_FLAGS ask for 8 host devices; prints one JSON line of results."""

import json

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from etalk_jax import parallel
from etalk_jax.layers import attention


def splash(q, k, v):
  return attention.splash_attention(q, k, v, interpret=True)


def loss(q, k, v, weights):
  return (splash(q, k, v) * weights).sum()


def main():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  rng = np.random.default_rng(0)
  results = {"devices": jax.device_count()}
  for batch in (8, 6):  # 8: split over data x fsdp; 6: only `data` divides it
    q, k, v, weights = (rng.standard_normal((batch, 128, 2, 64)).astype(np.float32)
                        for _ in range(4))
    single_out = jax.jit(splash)(q, k, v)
    single_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, weights)
    axes = attention.batch_mesh_axes(mesh, batch)
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    placed = [jax.device_put(x, sharding) for x in (q, k, v, weights)]
    with jax.set_mesh(mesh):
      sharded_out = jax.jit(splash)(*placed[:3])
      sharded_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*placed)
    results[str(batch)] = {
        "axes": list(axes),
        "out_shards": len({str(shard.index) for shard in sharded_out.addressable_shards}),
        "out_error": float(np.abs(np.asarray(sharded_out) - np.asarray(single_out)).max()),
        "reference_error": float(np.abs(np.asarray(single_out) - np.asarray(
            jax.nn.dot_product_attention(q, k, v))).max()),
        "grad_error": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                          for a, b in zip(sharded_grads, single_grads)),
        "grad_scale": max(float(np.abs(np.asarray(g)).max()) for g in single_grads),
    }
  print(json.dumps(results))


if __name__ == "__main__":
  main()
