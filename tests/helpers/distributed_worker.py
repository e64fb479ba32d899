"""Two CPU processes on localhost training one tiny model together, and the same training in one
process: run by tests/parallel/test_distributed.py (XLA_FLAGS and the distributed start must come
before jax touches a device, hence subprocesses).

  distributed_worker.py worker <process_id> <port> <dataset_dir> <out.npz>
  distributed_worker.py reference <dataset_dir> <out.npz>

Each worker joins `jax.distributed` (gloo CPU collectives), builds a data x fsdp mesh over both
processes' devices, reads its own Grain shard of the tiny synthetic dataset
(`shard_index=jax.process_index()`), assembles the global batch with
`jax.make_array_from_process_local_data` and takes STEPS Adam steps with parameters sharded
across the processes. The reference reads both shards in one process and concatenates them into
the same global batches.
"""

import os
import sys
import time

import numpy as np

from data_pipeline import loader

STEPS = 3
LOCAL_BATCH = 2
WINDOW = 2


def batches(dataset_dir: str, shard_index: int, shard_count: int):
  config = loader.LoaderConfig(window=WINDOW, batch_size=LOCAL_BATCH, seed=3, num_epochs=None,
                               with_reference=False, with_masks=False, num_workers=0,
                               read_threads=1, shard_index=shard_index, shard_count=shard_count)
  iterator = iter(loader.make_dataset(dataset_dir, "train", config))
  for _ in range(STEPS):
    batch = next(iterator)
    # (b, 2, 64, 64, 3) uint8 -> (b, 2, 16, 16, 3) in [-1, 1]; mouth opening per frame.
    frames = batch["frames"][:, :, ::4, ::4].astype(np.float32) / 127.5 - 1
    yield {"frames": frames, "mouth_open": batch["mouth_open"].astype(np.float32)}


def build_model():
  from flax import nnx  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)

  class TinyVideoModel(nnx.Module):
    """Conv features per frame -> MLP -> each frame's mouth opening (3 kernels >= 4096 elements:
    FSDP-sharded across the two processes)."""

    def __init__(self, rngs):
      self.conv1 = nnx.Conv(3, 32, (3, 3), strides=(2, 2), rngs=rngs)
      self.conv2 = nnx.Conv(32, 64, (3, 3), strides=(2, 2), rngs=rngs)
      self.linear1 = nnx.Linear(64 * 16, 128, rngs=rngs)
      self.linear2 = nnx.Linear(128, 64, rngs=rngs)
      self.head = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, frames):
      b, f = frames.shape[:2]
      x = frames.reshape(b * f, *frames.shape[2:])
      x = nnx.gelu(self.conv2(nnx.gelu(self.conv1(x))))
      x = nnx.gelu(self.linear1(x.reshape(b * f, -1)))
      return self.head(nnx.gelu(self.linear2(x))).reshape(b, f)

  return TinyVideoModel(nnx.Rngs(0))


def train_step(graphdef, tx):
  import jax  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  import jax.numpy as jnp  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  import optax  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  from flax import nnx  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)

  def step(params, opt_state, batch):
    def loss_fn(params):
      prediction = nnx.merge(graphdef, params)(batch["frames"])
      return jnp.mean((prediction - batch["mouth_open"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def flat(params) -> dict[str, np.ndarray]:
  import jax  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def worker(process_id: int, port: int, dataset_dir: str, out: str):
  import jax  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from etalk_jax import parallel  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  parallel.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
  import optax  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  from flax import nnx  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  from jax.experimental import multihost_utils  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)

  assert jax.process_count() == 2 and jax.device_count() == 2 * jax.local_device_count()
  mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
  graphdef, host_params = nnx.split(build_model())
  param_shardings = parallel.state_shardings(host_params, mesh)
  # Every process built the same host values; each places only its own shards.
  params = jax.tree.map(lambda value, sharding: jax.make_array_from_callback(
      value.shape, sharding, lambda index: np.asarray(value)[index]), host_params,
      param_shardings)
  tx = optax.adam(1e-2, eps=1e-3)
  opt_shardings = parallel.state_shardings(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  step = jax.jit(train_step(graphdef, tx), out_shardings=(param_shardings, opt_shardings, None))
  losses = []
  start = time.perf_counter()
  for local in batches(dataset_dir, jax.process_index(), jax.process_count()):
    global_batch = {k: jax.make_array_from_process_local_data(
        parallel.batch_sharding(mesh, v.ndim), v) for k, v in local.items()}
    params, opt_state, loss = step(params, opt_state, global_batch)
    losses.append(float(loss))
  seconds = time.perf_counter() - start
  sharded = sum("fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec))
                for leaf in jax.tree.leaves(params))
  gathered = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    np.savez(out, losses=np.asarray(losses), devices=jax.device_count(), sharded=sharded,
             mesh=str(dict(mesh.shape)), seconds=seconds, **flat(gathered))
  print(f"process {jax.process_index()}: mesh {dict(mesh.shape)}, {sharded} sharded params, "
        f"losses {losses}", flush=True)
  jax.distributed.shutdown()


def reference(dataset_dir: str, out: str):
  import jax  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  import optax  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  from flax import nnx  # noqa: PLC0415 (after __main__ sets JAX_PLATFORMS)
  graphdef, params = nnx.split(build_model())
  tx = optax.adam(1e-2, eps=1e-3)
  opt_state = tx.init(params)
  step = jax.jit(train_step(graphdef, tx))
  losses = []
  for shard0, shard1 in zip(batches(dataset_dir, 0, 2), batches(dataset_dir, 1, 2)):
    batch = {k: np.concatenate([shard0[k], shard1[k]]) for k in shard0}
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  np.savez(out, losses=np.asarray(losses), **flat(params))
  print(f"reference: losses {losses}", flush=True)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
  else:
    reference(sys.argv[2], sys.argv[3])
