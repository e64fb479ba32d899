"""One training step of a tiny SVD UNet on a data x FSDP mesh of simulated CPU devices, and the
same step on one device. Run by tests/parallel/test_step.py in a subprocess whose XLA_FLAGS ask
for 8 host devices (they must be set before jax is imported); prints one JSON line of results."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from etalk_jax import parallel
from etalk_jax.svd import UNetConfig, UNetSpatioTemporal

# One level keeps XLA's CPU compile short; it still has resnets, spatial and temporal attention.
UNET_ONE_LEVEL = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",),
    up_block_types=("CrossAttnUpBlockSpatioTemporal",), block_out_channels=(32,),
    addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, layers_per_block=1,
    cross_attention_dim=16, transformer_layers_per_block=1, num_attention_heads=2, num_frames=2)


def make_batch(batch: int = 8, context_dim: int = 16) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"sample": rng.standard_normal((batch, 2, 8, 8, 4), np.float32),
          "timestep": rng.uniform(-1, 1, (batch,)).astype(np.float32),
          "encoder_hidden_states": rng.standard_normal((batch, 1, context_dim), np.float32),
          "added_time_ids": rng.uniform(0, 2, (batch, 3)).astype(np.float32),
          "target": rng.standard_normal((batch, 2, 8, 8, 4), np.float32)}


def train_step(graphdef, tx):
  def step(params, opt_state, batch):
    def loss_fn(params):
      unet = nnx.merge(graphdef, params)
      prediction = unet(batch["sample"], batch["timestep"], batch["encoder_hidden_states"],
                        batch["added_time_ids"])
      return jnp.mean((prediction - batch["target"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def main():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  config = UNetConfig.from_dict(UNET_ONE_LEVEL)
  unet = parallel.create_sharded(lambda rngs: UNetSpatioTemporal(config, rngs=rngs), mesh)
  graphdef, params = nnx.split(unet)
  # eps 1e-3 rather than 1e-8: Adam's first step is lr * g / (|g| + eps), ~lr * sign(g), which
  # turns the ~1e-7 reduction-order differences of near-zero gradients into O(lr) ones. With
  # eps 1e-3 a gradient difference d moves a parameter by at most lr * d / eps.
  tx = optax.adam(1e-3, eps=1e-3)
  batch = make_batch()

  # Created on its shards: a split parameter's per-device piece is 1/4 of it.
  def split_over_fsdp(leaves):
    return [leaf.addressable_shards[0].data.size / leaf.size for leaf in leaves
            if "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec))]
  sharded_fraction = split_over_fsdp(jax.tree.leaves(params))

  one_device = jax.devices()[0]
  single_params = jax.device_put(params, one_device)
  single_step = jax.jit(train_step(graphdef, tx))
  single = single_step(single_params, tx.init(single_params), jax.device_put(batch, one_device))

  # Logical names from the UNet's table: parameters and Adam's moments shard alike.
  axes = parallel.model_axes(unet)
  param_shardings = parallel.state_shardings(params, mesh, family_axes=axes)
  opt_shardings = parallel.state_shardings(jax.eval_shape(tx.init, params), mesh,
                                           family_axes=axes)
  created_as_logical = all(
      leaf.sharding.spec == sharding.spec
      for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings)))
  batch_shardings = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  sharded_step = jax.jit(train_step(graphdef, tx),
                         in_shardings=(param_shardings, opt_shardings, batch_shardings),
                         out_shardings=(param_shardings, opt_shardings, None))
  sharded = sharded_step(params, opt_state, jax.device_put(batch, batch_shardings))

  param_error = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(jax.tree.leaves(single[0]), jax.tree.leaves(sharded[0])))
  update_size = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(jax.tree.leaves(single[0]), jax.tree.leaves(single_params)))
  json.dump({"devices": jax.device_count(), "mesh": dict(mesh.shape),
             "loss_single": float(single[2]), "loss_sharded": float(sharded[2]),
             "param_error": param_error, "update_size": update_size,
             "sharded_fraction": sorted(set(sharded_fraction)),
             "sharded_count": len(sharded_fraction), "param_count": len(jax.tree.leaves(params)),
             "created_as_logical": created_as_logical,
             "opt_state_sharded_count": len(split_over_fsdp(jax.tree.leaves(sharded[1])))},
            sys.stdout)
  print()


if __name__ == "__main__":
  main()
