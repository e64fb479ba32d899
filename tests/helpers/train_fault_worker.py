"""A tiny training run through the real loop (`etalk_jax.train.loop.train`: its checkpoints,
config.json, non-finite checks and export) for tests/train/test_faults.py, imported there and run
as a subprocess that a fault then hits:

  python tests/helpers/train_fault_worker.py DATASET_DIR WORKDIR STEPS [--width W]
      [--nonfinite stop|skip] [--kill PHASE STEP DELAY] [--fill-disk-at STEP --fsize BYTES]
      [--nan-at STEP]

The task: a two-layer map from a window's audio to its mouth-opening track on the tiny synthetic
set's Grain iterator (its position must round-trip), input noise drawn from the step's key (the
RNG must round-trip), 8-bit Adam (quantised moments) with a parameter EMA (what the export
writes). `config.model.width` is its hidden width: the field that changes shapes.

Faults, each armed at the STEP-th step this process runs (`featurize` calls, counted from 1):
  --kill step STEP DELAY     SIGKILL DELAY seconds after step STEP's batch was drawn
  --kill save STEP DELAY     step STEP's checkpoint write is held open SAVE_HOLD s in the
                             background; SIGKILL DELAY s after the save started
  --kill export 0 DELAY      the export's files, written, wait EXPORT_HOLD s in their temporary
                             folder; SIGKILL DELAY s after the export started
  --fill-disk-at STEP        from step STEP on (the earlier saves complete), no file may grow
                             past --fsize bytes (RLIMIT_FSIZE with SIGXFSZ ignored: writes fail
                             with EFBIG, as on a full disk)
  --nan-at STEP              step STEP's audio is NaN (a corrupt clip)
A process whose kill is armed never exits by itself: it waits for the kill after its work.
Prints `batch N <ids>` per step and `save N` once a save has started (so every earlier one is
complete), flushed. A UserError prints one
line, `error: ...`, and exits 2, as `etalk` does (on stdout, unlike etalk, so that the tests can
also check that stderr holds no traceback); anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from data_pipeline import SAMPLES_PER_FRAME
from data_pipeline.loader import LoaderConfig
from etalk_jax import model_io
from etalk_jax.errors import UserError
from etalk_jax.train import checkpoint, loop
from etalk_jax.train.config import base_config
from etalk_jax.train.stages import common

WINDOW = 8
STEPS = 8
SAVE_EVERY = 2
SAVE_HOLD = 1.0  # seconds a held checkpoint write stays open
EXPORT_HOLD = 1.0
AUDIO_LENGTH = (WINDOW + 2 * LoaderConfig(window=WINDOW, batch_size=2).audio_context_frames
                ) * SAMPLES_PER_FRAME


def make_config(dataset_dir: str, steps: int = STEPS, *, width: int = 8, nonfinite: str = "stop",
                keep: int = 2):
  config = base_config("faults", steps=steps, lr=1e-3, batch_size=2, window=WINDOW)
  config.data.dataset_dir = str(dataset_dir)
  config.data.seed = 3
  config.model = dict(width=width)
  config.optim.name = "adam8bit"
  config.optim.ema_decay = 0.5
  config.train.log_every = 4
  config.train.checkpoint_every = SAVE_EVERY
  config.train.keep = keep
  config.train.nonfinite = nonfinite
  return config


class Mouth(nnx.Module):
  def __init__(self, width: int, rngs: nnx.Rngs):
    # 7680 x width: above optim.MIN_8BIT_SIZE, so its moments are the uint8-quantised ones.
    self.hidden = nnx.Linear(AUDIO_LENGTH, width, rngs=rngs)
    self.out = nnx.Linear(width, WINDOW, rngs=rngs)

  def __call__(self, audio):
    return self.out(jnp.tanh(self.hidden(audio)))


def load_export(folder: Path, width: int = 8) -> Mouth:
  return model_io.restore_model(folder, lambda: model_io.abstract(lambda rngs: Mouth(width, rngs)))


def make_task(config, *, on_batch=None) -> loop.Task:
  """The task; `on_batch(n, batch)` (n counted from 1 in this process) may replace the batch."""
  width = int(config.model.width)
  model = Mouth(width, nnx.Rngs(0))
  count = [0]

  def featurize(batch):
    count[0] += 1
    if on_batch is not None:
      batch = on_batch(count[0], batch)
    return {"audio": np.asarray(batch["audio"], np.float32),
            "mouth_open": np.asarray(batch["mouth_open"], np.float32)}

  def loss(model, batch, key):
    noisy = batch["audio"] + 0.01 * jax.random.normal(key, batch["audio"].shape)
    return jnp.mean((model(noisy) - batch["mouth_open"]) ** 2), {}

  def export(model, folder):
    model_io.save_model(model, folder, {"width": width}, overwrite=True)

  return loop.Task(name="faults", model=model, trainable=nnx.Param, loss=loss,
                   batches=common.loader_iterator(config, with_frames=False,
                                                  with_reference=False, with_masks=False),
                   featurize=featurize, export=export, batch_size=2)


def run(dataset_dir, workdir, steps: int = STEPS, **config_args) -> dict:
  """One run (or resume) in this process."""
  config = make_config(dataset_dir, steps, **config_args)
  return loop.train(config, workdir, task=make_task(config), progress=False)


def read_step(step_dir: Path) -> dict[str, np.ndarray]:
  """Every array of a checkpoint step (model, optimizer, RNG) and its data-iterator state, read
  as stored (no target)."""
  arrays = {}
  for item in checkpoint.ARRAY_ITEMS:
    tree = ocp.PyTreeCheckpointer().restore(step_dir / item)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      arrays[f"{item}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  arrays["data"] = np.frombuffer((step_dir / "data" / "process_0-of-1.json").read_bytes(),
                                 np.uint8)
  return arrays


def export_arrays(workdir: Path) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(nnx.state(load_export(Path(workdir) / "export")))}


# ----------------------------------------------------------------------------- fault hooks


class _HeldCommit:
  """An Orbax commit future that takes `seconds`: holds a write open so a kill lands in it."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def result(self, timeout=None):
    del timeout
    time.sleep(self.seconds)


HOLD = {"save": 0.0}  # seconds a checkpoint write started now is held open


def _holding_handler(**kwargs) -> ocp.PyTreeCheckpointHandler:
  handler = ocp.PyTreeCheckpointHandler(use_compression=False, **kwargs)
  plain_async_save = handler.async_save

  async def async_save(*args, **kwargs):
    futures = list(await plain_async_save(*args, **kwargs) or [])
    return futures + [_HeldCommit(HOLD["save"])] if HOLD["save"] else futures

  # On the instance: Orbax picks handlers for args by class, so the class must stay.
  handler.async_save = async_save
  return handler


def _kill_after(seconds: float, what: str) -> None:
  print(f"kill armed {what} {seconds:.3f}", flush=True)
  threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL)).start()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("dataset_dir")
  parser.add_argument("workdir")
  parser.add_argument("steps", type=int)
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--nonfinite", default="stop")
  parser.add_argument("--kill", nargs=3, metavar=("PHASE", "STEP", "DELAY"))
  parser.add_argument("--fill-disk-at", type=int)
  parser.add_argument("--fsize", type=int, default=32 * 1024)
  parser.add_argument("--nan-at", type=int)
  args = parser.parse_args(argv)
  phase, kill_step, delay = (args.kill[0], int(args.kill[1]), float(args.kill[2])
                             ) if args.kill else (None, None, 0.0)

  def on_batch(n, batch):
    print(f"batch {n} {loop.batch_ids(batch)}", flush=True)
    if phase == "step" and n == kill_step:
      _kill_after(delay, f"step {n}")
    if n == args.fill_disk_at:
      for opened in checkpointers:  # the disk fills once the earlier saves are on it
        opened.wait_until_finished()
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, resource.RLIM_INFINITY))
    if n == args.nan_at:
      batch = dict(batch, audio=np.full_like(np.asarray(batch["audio"]), np.nan))
    return batch

  checkpoint._array_handler = lambda: _holding_handler(  # noqa: SLF001
      save_concurrent_gb=1, restore_concurrent_gb=1)

  checkpointers = []

  class Checkpointer(checkpoint.TrainCheckpointer):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      checkpointers.append(self)

    def save(self, step, **kwargs):
      held = phase == "save" and step == kill_step
      HOLD["save"] = SAVE_HOLD if held else 0.0
      try:
        saved = super().save(step, **kwargs)
      finally:
        HOLD["save"] = 0.0
      # Started: the previous save is complete (Orbax waits for it first).
      print(f"save {step}", flush=True)
      if held:
        _kill_after(delay, f"save {step}")
      return saved

  loop.TrainCheckpointer = Checkpointer
  config = make_config(args.dataset_dir, args.steps, width=args.width, nonfinite=args.nonfinite)
  task = make_task(config, on_batch=on_batch)
  if phase == "export":
    plain_atomic_folder = model_io.atomic_folder

    @contextlib.contextmanager
    def held_atomic_folder(dst, overwrite=False):
      with plain_atomic_folder(dst, overwrite=overwrite) as tmp:
        yield tmp
        time.sleep(EXPORT_HOLD)  # the files are in the temporary folder, not yet renamed

    model_io.atomic_folder = held_atomic_folder
    plain_export = task.export

    def held_export(model, folder):
      _kill_after(delay, "export")
      plain_export(model, folder)
    task.export = held_export
  try:
    summary = loop.train(config, args.workdir, task=task, progress=False)
  except UserError as error:
    # On stdout, which only this thread writes: on stderr, Orbax's threads may log mid-line.
    print(f"error: {error}", flush=True)
    return 2
  print(f"done {summary['start_step']} skipped {summary['skipped_steps']}", flush=True)
  if phase is not None:
    time.sleep(60)  # the armed kill lands after the work if not in it
  return 0


if __name__ == "__main__":
  sys.exit(main())
