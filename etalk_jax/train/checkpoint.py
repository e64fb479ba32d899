"""Training checkpoints: model, optimizer, Grain iterator, RNG key and step saved together.

One Orbax `CheckpointManager` step folder per saved step, holding the items
  model      the model's whole `nnx.state` (parameters, batch statistics, RNG counters, ...)
  optimizer  `nnx.state(optimizer)` (step count and optax state, e.g. 8-bit Adam's quantised
             moments)
  rng        the training loop's RNG key (its raw key data; the key implementation is in `meta`)
  data       the Grain iterator's state, with the handler and item name `data` of
             `data_pipeline.loader.save_iterator`, so `loader.restore_iterator(step_dir_parent)`
             reads it
  meta       JSON: the step and the RNG key implementation
Step `s` holds the state after `s` completed training steps (the iterator has yielded `s` batches),
so a resumed loop runs step `s + 1` next.

Saves are asynchronous: `save` returns once arrays are copied off the devices and the iterator state
is written; the files are written in a background thread and the step folder appears under its final
name only when complete (Orbax writes into a temporary folder and renames it), so a process killed
mid-save leaves the previous complete step as `latest_step()`.

Restores go into the live (freshly built) objects: their current arrays give the shapes, dtypes and
shardings to restore onto, so a sharded model is never gathered on one device.

`StopRequest` turns SIGTERM (a preemption notice, `kill`, Ctrl-C with SIGINT) into a flag the loop
checks each step: it then saves the current step, waits for the save and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from pathlib import Path
from typing import Any

import grain  # also registers grain's CheckpointSave/Restore args with Orbax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from etalk_jax.errors import InputNotFound, UserError

ITEM_NAMES = ("model", "optimizer", "rng", "data", "meta")


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `TrainCheckpointer.restore` hands back besides the objects it restored in place."""
  step: int
  rng: jax.Array


def _grain_handler():
  return grain.checkpoint.CheckpointHandler()


def _array_handler() -> ocp.PyTreeCheckpointHandler:
  # As in model_io: at most 1 GB in flight each way (Orbax's default of 96 GB peaked at 1.67x a
  # 6 GB model's size) and no compression (weights barely compress; zstd tripled the save time).
  return ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, restore_concurrent_gb=1,
                                     use_compression=False)


def _restore_args(live_tree) -> ocp.args.PyTreeRestore:
  """Restores onto the shapes, dtypes and shardings of `live_tree`'s arrays."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, live_tree)
  return ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def _is_key(leaf) -> bool:
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _storable(tree):
  """Typed PRNG keys (e.g. inside `nnx.Rngs`) as their raw uint32 data: Orbax stores plain
  arrays."""
  return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _from_storable(restored, template):
  """Inverse of `_storable`, taking each key's implementation from the live `template` leaf."""
  return jax.tree.map(
    lambda value, like: (jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
                         if _is_key(like) else value),
    restored, template)


def _rng_impl(rng: jax.Array) -> str | None:
  """The key implementation's name for typed keys, None for raw uint32 keys
  (`jax.random.PRNGKey`)."""
  return str(jax.random.key_impl(rng)) if _is_key(rng) else None


class TrainCheckpointer:
  """An Orbax `CheckpointManager` over a training run's folder, keeping the last `max_to_keep`
  steps.

  Use it as a context manager (or call `close()`): closing waits for a pending async save.
  """

  def __init__(self, directory: str | Path, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=ITEM_NAMES,
      item_handlers={"model": _array_handler(), "optimizer": _array_handler(),
                     "rng": _array_handler(), "data": _grain_handler(),
                     "meta": ocp.JsonCheckpointHandler()})

  def __enter__(self) -> TrainCheckpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_step(self) -> int | None:
    """The newest complete step, or None when the folder holds none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer, iterator,
           rng: jax.Array, force: bool = False) -> bool:
    """Starts saving everything at `step` (the number of completed steps); returns whether it saved
    (False when `step` is off `save_interval_steps` and not `force`d). Returns before the files are
    written; `wait_until_finished()` blocks until they are."""
    model_state = _storable(nnx.to_pure_dict(nnx.state(model)))
    optimizer_state = _storable(nnx.to_pure_dict(nnx.state(optimizer)))
    rng_data = jax.random.key_data(rng) if _is_key(rng) else rng
    return self._manager.save(step, force=force, args=ocp.args.Composite(
      model=ocp.args.PyTreeSave(model_state),
      optimizer=ocp.args.PyTreeSave(optimizer_state),
      rng=ocp.args.PyTreeSave({"key": rng_data}),
      # Written synchronously inside `save`, so it is the state after exactly `step` batches.
      data=grain.checkpoint.CheckpointSave(iterator),
      meta=ocp.args.JsonSave({"step": int(step), "rng_impl": _rng_impl(rng)})))

  def restore(self, *, model: nnx.Module, optimizer: nnx.Optimizer, iterator, rng: jax.Array,
              step: int | None = None) -> Restored:
    """Restores `step` (default: the latest) into `model`, `optimizer` and `iterator` in place.

    `rng` is a key of the run's kind (typed or raw, any value): it gives the shape, implementation
    and sharding; the restored key comes back in `Restored.rng`, with the step.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise InputNotFound(f"{self.directory}: no checkpoint to resume from; start the run "
                          f"fresh (check `latest_step()` first) or pass the run's --workdir")
    if step not in self._manager.all_steps():
      raise InputNotFound(f"{self.directory}: no checkpoint at step {step}; it has steps "
                          f"{self.all_steps()}")
    model_state = nnx.state(model)
    optimizer_state = nnx.state(optimizer)
    model_live = nnx.to_pure_dict(model_state)
    optimizer_live = nnx.to_pure_dict(optimizer_state)
    rng_live = {"key": jax.random.key_data(rng) if _is_key(rng) else rng}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
        model=_restore_args(_storable(model_live)),
        optimizer=_restore_args(_storable(optimizer_live)),
        rng=_restore_args(rng_live),
        data=grain.checkpoint.CheckpointRestore(iterator),
        meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as error:
      raise UserError(f"{self.directory} step {step}: the checkpoint does not match this run's "
                      f"model, optimizer or data pipeline ({error}); resume with the config it "
                      f"was saved with or use a fresh --workdir") from error
    nnx.replace_by_pure_dict(model_state, _from_storable(restored["model"], model_live))
    nnx.update(model, model_state)
    nnx.replace_by_pure_dict(optimizer_state, _from_storable(restored["optimizer"], optimizer_live))
    nnx.update(optimizer, optimizer_state)
    meta = restored["meta"]
    if meta["step"] != step:
      raise UserError(f"{self.directory} step {step}: its metadata says step {meta['step']}; the "
                      f"folder was renamed or corrupted")
    rng_data = restored["rng"]["key"]
    if meta["rng_impl"] != _rng_impl(rng):
      raise UserError(f"{self.directory} step {step}: saved with RNG key implementation "
                      f"{meta['rng_impl']}, this run uses {_rng_impl(rng)}")
    restored_rng = (jax.random.wrap_key_data(rng_data, impl=jax.random.key_impl(rng))
                    if _is_key(rng) else rng_data)
    return Restored(step=step, rng=restored_rng)

  def wait_until_finished(self) -> None:
    """Blocks until the pending async save (if any) is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class StopRequest:
  """A flag set by SIGTERM (and any other `signals`), for a loop to save and exit at a step
  boundary.

      with StopRequest() as stop:
        for step in range(start + 1, total + 1):
          ... train one step ...
          if stop.requested():
            checkpointer.save(step, ..., force=True)
            break
      checkpointer.wait_until_finished()

  The handler only sets a flag: saving inside a signal handler would interrupt a step halfway.
  In a multi-process run `requested()` agrees across processes (any process signalled -> all stop
  at the same step), at the cost of one small all-gather per call. The previous handlers come back
  on exit.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.signals = signals
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("StopRequest installs signal handlers, which Python allows only in the "
                         "main thread")
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    self.signum = signum
    self._event.set()

  def request(self) -> None:
    """Asks the loop to stop, as a signal would (for tests and in-process callers)."""
    self._event.set()

  def requested(self) -> bool:
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))
