"""A tiny training run for the checkpoint tests: imported by tests/train/test_checkpoint.py and run
as a subprocess (the SIGTERM / SIGKILL tests) with

  python tests/helpers/train_checkpoint_script.py DATASET_DIR WORKDIR TOTAL_STEPS [--step-delay S]
                                                  [--kill-during-save-at STEP]

A linear map from a window's audio to its mouth-opening track, with input noise drawn from the
loop's RNG key (so resuming must restore the key too) and 8-bit Adam (its quantised moments must
round-trip).
Prints `resumed N` / `step N` / `stopped N` lines, flushed, for the parent to follow.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

WINDOW = 8
BATCH = 2
SAVE_EVERY = 2
MAX_TO_KEEP = 2


def loader_config():
  from data_pipeline import loader  # noqa: PLC0415
  # Audio and tracks only: no video decoding, so a batch takes milliseconds.
  return loader.LoaderConfig(window=WINDOW, batch_size=BATCH, seed=3, num_workers=0, read_threads=1,
                             with_frames=False, with_reference=False, with_masks=False,
                             shard_index=0, shard_count=1)


def build(dataset_dir: str):
  """Fresh model, optimizer, data iterator and RNG key, as a new process would build them."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from data_pipeline import SAMPLES_PER_FRAME, loader  # noqa: PLC0415
  from etalk_jax.train.optim import adam_8bit  # noqa: PLC0415
  config = loader_config()
  audio_length = (WINDOW + 2 * config.audio_context_frames) * SAMPLES_PER_FRAME
  # 7680 x 8 kernel: above optim.MIN_8BIT_SIZE, so its Adam moments are the uint8-quantised ones.
  model = nnx.Linear(audio_length, WINDOW, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, adam_8bit(1e-3), wrt=nnx.Param)
  iterator = iter(loader.make_dataset(dataset_dir, "train", config))
  return model, optimizer, iterator, jax.random.key(42)


def _train_step():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  @nnx.jit
  def train_step(model, optimizer, audio, mouth_open, rng):
    rng, noise_key = jax.random.split(rng)

    def loss_fn(model):
      noisy = audio + 0.01 * jax.random.normal(noise_key, audio.shape)
      return jnp.mean((model(noisy) - mouth_open) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, rng

  return train_step


def train(dataset_dir: str, workdir: str, total_steps: int, *, stop=None, step_delay: float = 0.0,
          kill_during_save_at: int | None = None, report=None) -> dict:
  """Runs (or resumes, when `workdir` holds a checkpoint) to `total_steps`, saving every SAVE_EVERY
  steps and at the end. Returns the first step run, the per-step losses and the final parameters."""
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from etalk_jax.train.checkpoint import TrainCheckpointer  # noqa: PLC0415
  report = report or (lambda line: None)
  model, optimizer, iterator, rng = build(dataset_dir)
  train_step = _train_step()
  losses, batches = [], []
  with TrainCheckpointer(workdir, max_to_keep=MAX_TO_KEEP) as checkpointer:
    start = 0
    if checkpointer.latest_step() is not None:
      restored = checkpointer.restore(model=model, optimizer=optimizer, iterator=iterator, rng=rng)
      start, rng = restored.step, restored.rng
      report(f"resumed {start}")
    step = start
    for step in range(start + 1, total_steps + 1):
      batch = next(iterator)
      batches.append((list(batch["clip_id"]), batch["start"].tolist()))
      loss, rng = train_step(model, optimizer, batch["audio"], batch["mouth_open"], rng)
      losses.append(np.asarray(loss))
      report(f"step {step}")
      stopping = stop is not None and stop.requested()
      if step == kill_during_save_at:
        # The earlier saves are complete; this one's files are still being written when the
        # process dies.
        checkpointer.wait_until_finished()
        hold_background_writes(30.0)
        with TrainCheckpointer(workdir, max_to_keep=MAX_TO_KEEP) as held:
          held.save(step, model=model, optimizer=optimizer, iterator=iterator, rng=rng, force=True)
          report(f"killing {step}")
          os.kill(os.getpid(), signal.SIGKILL)
      if step % SAVE_EVERY == 0 or step == total_steps or stopping:
        checkpointer.save(step, model=model, optimizer=optimizer, iterator=iterator, rng=rng,
                          force=True)
      if stopping:
        checkpointer.wait_until_finished()
        report(f"stopped {step}")
        break
      time.sleep(step_delay)
  params = {"/".join(map(str, path)): np.asarray(value)
            for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return {"start": start, "losses": losses, "params": params, "batches": batches, "last": step}


class _SlowCommit:
  """An Orbax commit future that takes `seconds`: holds an async save open so a test can kill it
  midway."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def result(self, timeout=None):
    del timeout
    time.sleep(self.seconds)


def hold_background_writes(seconds: float) -> None:
  """From now on, every array item's background write takes `seconds` longer (the SIGKILL test)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from etalk_jax.train import checkpoint  # noqa: PLC0415

  def slow_handler():
    # Patched on the instance: Orbax picks handlers for args by class, so the class must stay.
    handler = ocp.PyTreeCheckpointHandler(use_compression=False)
    plain_async_save = handler.async_save

    async def async_save(*args, **kwargs):
      futures = await plain_async_save(*args, **kwargs)
      return list(futures or []) + [_SlowCommit(seconds)]

    handler.async_save = async_save
    return handler

  checkpoint._array_handler = slow_handler  # noqa: SLF001


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("dataset_dir")
  parser.add_argument("workdir")
  parser.add_argument("total_steps", type=int)
  parser.add_argument("--step-delay", type=float, default=0.0)
  parser.add_argument("--kill-during-save-at", type=int)
  args = parser.parse_args(argv)
  from etalk_jax.train.checkpoint import StopRequest  # noqa: PLC0415
  report = lambda line: print(line, flush=True)  # noqa: E731
  with StopRequest() as stop:
    train(args.dataset_dir, args.workdir, args.total_steps, stop=stop, step_delay=args.step_delay,
          kill_during_save_at=args.kill_during_save_at, report=report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
