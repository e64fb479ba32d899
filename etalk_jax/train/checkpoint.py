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

Faults (tests/train/test_faults.py):
  - a checkpoint whose arrays' structure or shapes differ from the live objects' (the run's config
    changed a shape) is refused before any array is read: `CheckpointMismatch` lists the arrays
    (the loop adds the config fields that differ);
  - a step folder with a corrupted or missing file is refused with an error naming the file (or its
    item folder) and the fix: move that step folder away to resume from the previous complete step.
    It is never skipped silently: whether an older step is good enough is the user's call, and the
    damaged folder is the evidence. (Tensorstore checks the array files: a flipped byte in one is a
    DATA_LOSS error, not a silently different parameter.);
  - a disk that fills up (ENOSPC, EFBIG, EDQUOT) during a save is a `UserError` naming the folder;
    the failed step never gets its final name, so the previous complete step stays the latest
    (its partial temporary folder is never read, and is replaced when that step is saved again);
  - a step past `max_to_keep` is renamed into `.deleted/` before it is removed, so a kill during
    the removal never leaves a half-deleted step under its final name;
  - a full disk's message is all the user reads (`quiet_reported_failures`): Orbax's threads log
    the failure they hit with its traceback (the manager raises it again in the main thread,
    where it becomes the message), and tensorstore's writes that finish after Orbax closed its
    event loop report "Event loop is closed" as unraisable exceptions. Orbax's records wait until
    the save's outcome is known and are dropped only when it is our message; the unraisable hook
    drops only those closed-loop callbacks. Likewise a restore refused as damaged: the other
    array reads that the damaged file failed too are not logged by asyncio when their tasks are
    collected (`_DamagedReadLog`).

`StopRequest` turns SIGTERM (a preemption notice, `kill`, Ctrl-C with SIGINT) into a flag the loop
checks each step: it then saves the current step, waits for the save and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import re
import shutil
import signal
import sys
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
ARRAY_ITEMS = ("model", "optimizer", "rng")
TRASH = ".deleted"  # steps past max_to_keep, renamed here and then removed
# What a full disk looks like: the OSError's errno, or inside tensorstore's ValueError text.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
DISK_FULL_TEXT = re.compile("|".join([*(f"os_error_code='{n}'" for n in DISK_FULL_ERRNOS),
                                      "No space left", "File too large", "Disk quota exceeded"]))
# Tensorstore's status codes for a file that is missing or does not decode.
DAMAGED_TEXT = re.compile(r"DATA_LOSS|NOT_FOUND|OUT_OF_RANGE|does not exist|not found")


class CheckpointMismatch(UserError):
  """The checkpoint's arrays differ in structure or shape from the live objects'; `mismatches`
  lists them ("model/kernel: saved (8, 4), this run (16, 4)")."""

  def __init__(self, message: str, mismatches: list[str]):
    super().__init__(message)
    self.mismatches = mismatches


def _reason(error: BaseException) -> str:
  """The first line of `error`, without tensorstore's spec dump."""
  text = str(error).split(" [tensorstore_spec")[0].strip().splitlines()
  text = text[0] if text else type(error).__name__
  return text if len(text) <= 300 else text[:297] + "..."


def _chain(error: BaseException):
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or one it was raised from) is a write that failed for want of space."""
  return any((isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
             or DISK_FULL_TEXT.search(str(e)) for e in _chain(error))


def _is_damaged(error: BaseException) -> bool:
  """Whether a restore failed on a file that is missing or does not decode (as against one that
  holds something else than this run expects)."""
  return any(isinstance(e, (FileNotFoundError, json.JSONDecodeError))
             or DAMAGED_TEXT.search(str(e)) for e in _chain(error))


class _SaveFailureLog(logging.Filter):
  """Orbax's log records that carry an exception (its logger is absl's) wait here until the main
  thread learns how the save went (`TrainCheckpointer._translated`): a failure this module
  reports as a UserError (a full disk) drops them, with every later one of that save (the
  threads it stopped log theirs too); any other failure passes them on, in order, as does
  `close` any left. So a full disk is one message, and a failure we do not translate keeps
  every line Orbax logged about it."""

  def __init__(self):
    super().__init__()
    self._lock = threading.Lock()
    self._held: list[logging.LogRecord] = []
    self._reported = False

  def filter(self, record: logging.LogRecord) -> bool:
    if getattr(record, "etalk_released", False) or not record.exc_info:
      return True
    if "orbax" not in record.pathname.replace("\\", "/").split("/"):
      return True
    with self._lock:
      if not self._reported:
        self._held.append(record)
    return False

  def start(self) -> None:
    """A new checkpointer: nothing is reported yet."""
    with self._lock:
      self._reported = False

  def drop(self) -> None:
    """The save failed with our message: its held records go, and every later one of it."""
    with self._lock:
      self._reported = True
      self._held.clear()

  def release(self) -> None:
    """Passes the held records on: a failure that is not our message, or (from `close`) one
    that no save or wait raised. A background failure is raised by a later save or wait than
    the one that started it, so a call that returns keeps them held."""
    with self._lock:
      held, self._held = self._held, []
    for record in held:
      record.etalk_released = True
      logging.getLogger(record.name).handle(record)


def _is_closed_loop_callback(unraisable) -> bool:
  """A tensorstore write finishing after Orbax closed the event loop of the save that failed:
  asyncio's `call_soon_threadsafe` raising "Event loop is closed" from `_check_closed`."""
  error, traceback = unraisable.exc_value, unraisable.exc_traceback
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    return False
  while traceback is not None and traceback.tb_next is not None:
    traceback = traceback.tb_next
  return traceback is not None and traceback.tb_frame.f_code.co_name == "_check_closed"


class _DamagedReadLog(logging.Filter):
  """A restore that hits a damaged file fails many of Orbax's concurrent array reads at once;
  the first failure becomes our message, and the tasks of the others, whose exceptions nobody
  awaits, are logged by asyncio ("Task exception was never retrieved", with a traceback) when
  they are garbage-collected, whenever that is. This drops those records, and only those whose
  exception names a step folder already reported as damaged (`report`)."""

  def __init__(self):
    super().__init__()
    self._lock = threading.Lock()
    self._folders: set[str] = set()

  def report(self, step_dir: Path) -> None:
    with self._lock:
      self._folders.add(str(step_dir))

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is None or not str(record.msg).startswith("Task exception was never retrieved"):
      return True
    text = " ".join(str(e) for e in _chain(error))
    with self._lock:
      return not any(folder + "/" in text for folder in self._folders)


_SAVE_FAILURE_LOG = _SaveFailureLog()
_DAMAGED_READ_LOG = _DamagedReadLog()

def quiet_reported_failures() -> _SaveFailureLog:
  """Keeps the noise of a save or restore that fails with our message off stderr (see the module
  docstring): installs `_SAVE_FAILURE_LOG` on absl's logger, `_DAMAGED_READ_LOG` on asyncio's
  and an unraisable hook that drops only the closed-loop callbacks, once per process."""
  asyncio_logger = logging.getLogger("asyncio")
  if _DAMAGED_READ_LOG not in asyncio_logger.filters:
    asyncio_logger.addFilter(_DAMAGED_READ_LOG)
  absl_logger = logging.getLogger("absl")
  if _SAVE_FAILURE_LOG not in absl_logger.filters:
    absl_logger.addFilter(_SAVE_FAILURE_LOG)
    previous_hook = sys.unraisablehook

    def hook(unraisable) -> None:
      if not _is_closed_loop_callback(unraisable):
        previous_hook(unraisable)

    sys.unraisablehook = hook
  return _SAVE_FAILURE_LOG


def _named_file(error: BaseException, folder: Path) -> Path:
  """The file `error` is about: the most specific path under `folder` its text names, else the
  first JSON file under `folder` that does not parse, else `folder`."""
  paths = [Path(p.rstrip("/.:,\\")) for e in _chain(error)
           for p in re.findall(r"/[^\s\"']+", str(e)) if p.startswith(str(folder))]
  if paths:
    named = max(paths, key=lambda p: len(str(p)))
    # Tensorstore names the database folder when its manifest is gone.
    missing = [named / name for name in ("manifest.ocdbt", "_METADATA") if named.is_dir()
               and not (named / name).exists()]
    return missing[0] if missing else named
  if folder.is_file():
    return folder
  json_files = [p for p in sorted(folder.rglob("*")) if p.is_file() and (
      p.suffix == ".json" or p.name in ("_METADATA", "_sharding", "metadata")
      or p.parent.name == "array_metadatas")]
  for path in json_files:
    try:
      json.loads(path.read_bytes())
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
      return path
  return folder


def _flat(tree) -> dict[str, Any]:
  """{"a/b/c": leaf} of the leaves that have a shape (arrays, Orbax's array metadata)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  # Dict keys, sequence indices and attribute names alike: Orbax stores a dataclass node's
  # attributes (8-bit Adam's moments) as dict keys.
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path):
          leaf for path, leaf in leaves if hasattr(leaf, "shape")}


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
    # A save killed or failed midway (SIGKILL, a full disk) leaves a temporary folder that no
    # restore reads and that saving the same step again replaces. (Orbax's
    # cleanup_tmp_directories would remove it sooner, but removes nested temporary folders
    # concurrently and fails on its own races.)
    # todelete_subdir: a step past max_to_keep is first renamed into TRASH, then removed
    # (`_empty_trash`): Orbax's in-place delete, killed midway, left a half-deleted step under
    # its final name, one that looks complete.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True,
                                           todelete_subdir=TRASH)
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=ITEM_NAMES,
      item_handlers={"model": _array_handler(), "optimizer": _array_handler(),
                     "rng": _array_handler(), "data": _grain_handler(),
                     "meta": ocp.JsonCheckpointHandler()})
    self._saving: int | None = None  # the step whose background write may still be running
    self._save_log = quiet_reported_failures()
    self._save_log.start()
    self._empty_trash()

  def _empty_trash(self) -> None:
    """Removes the steps Orbax retired into TRASH (no save is running: it renames them there
    when a save completes)."""
    if jax.process_index() == 0:
      shutil.rmtree(self.directory / TRASH, ignore_errors=True)

  def __enter__(self) -> TrainCheckpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_step(self) -> int | None:
    """The newest complete step, or None when the folder holds none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _complete_steps(self) -> list[int]:
    """The step folders on disk under their final names (Orbax renames a step only once it is
    complete), read afresh: after a failed save the manager still lists the failed step."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit()
                  and p.is_dir())

  def _disk_full(self, error: BaseException, step: int | None) -> UserError:
    complete = [s for s in self._complete_steps() if s != step]
    previous = (f"the previous checkpoint (step {complete[-1]}) is intact" if complete else
                "no earlier checkpoint exists")
    return UserError(
        f"{self.directory}: disk full (no space left) while saving checkpoint step {step} "
        f"({_reason(error)}); {previous}. Free space on that disk (or lower "
        f"config.train.keep) and run the same command again to resume")

  def _translated(self, action, step: int | None):
    """Runs `action()`; a full disk becomes a UserError naming the folder (other errors, bugs
    included, stay as they are)."""
    try:
      return action()
    except Exception as error:
      if is_disk_full(error):
        self._save_log.drop()
        raise self._disk_full(error, step) from error
      self._save_log.release()
      raise

  def save(self, step: int, *, model: nnx.Module, optimizer: nnx.Optimizer, iterator,
           rng: jax.Array, force: bool = False) -> bool:
    """Starts saving everything at `step` (the number of completed steps); returns whether it saved
    (False when `step` is off `save_interval_steps` and not `force`d). Returns before the files are
    written; `wait_until_finished()` blocks until they are. A full disk raises a `UserError` here
    (the previous save's background write, or this one's synchronous part) or when waiting."""
    model_state = _storable(nnx.to_pure_dict(nnx.state(model)))
    optimizer_state = _storable(nnx.to_pure_dict(nnx.state(optimizer)))
    rng_data = jax.random.key_data(rng) if _is_key(rng) else rng
    # Orbax waits for the previous save first: its failure is that step's.
    self._translated(self._manager.wait_until_finished, self._saving)
    self._empty_trash()
    self._saving = step
    saved = self._translated(lambda: self._manager.save(step, force=force, args=ocp.args.Composite(
      model=ocp.args.PyTreeSave(model_state),
      optimizer=ocp.args.PyTreeSave(optimizer_state),
      rng=ocp.args.PyTreeSave({"key": rng_data}),
      # Written synchronously inside `save`, so it is the state after exactly `step` batches.
      data=grain.checkpoint.CheckpointSave(iterator),
      meta=ocp.args.JsonSave({"step": int(step), "rng_impl": _rng_impl(rng)}))), step)
    return saved

  def _damaged(self, error: BaseException, step: int, item_dir: Path) -> UserError:
    _DAMAGED_READ_LOG.report(self.directory / str(step))
    earlier = [s for s in self.all_steps() if s < step]
    fix = (f"move the folder {self.directory / str(step)} out of {self.directory} to resume from "
           f"step {earlier[-1]}, the previous complete one" if earlier else
           "start the run afresh in a new --workdir (there is no earlier step)")
    return UserError(f"{_named_file(error, item_dir)}: checkpoint step {step} is damaged, a file "
                     f"is corrupted or missing ({_reason(error)}); {fix}")

  def _check_shapes(self, step: int, live: dict[str, Any]) -> None:
    """Refuses a checkpoint whose arrays differ in structure or shape from `live` ({item: pure
    dict}), reading only Orbax's metadata (`_METADATA`, which Orbax always writes: a step without
    one is damaged)."""
    mismatches = []
    for item, tree in live.items():
      item_dir = self.directory / str(step) / item
      if not (item_dir / "_METADATA").is_file():
        raise self._damaged(FileNotFoundError(f"{item_dir / '_METADATA'} is missing"), step,
                            item_dir / "_METADATA")
      try:
        metadata = _array_handler().metadata(item_dir)
      except (ValueError, KeyError, TypeError, OSError) as error:
        raise self._damaged(error, step, item_dir) from error
      mismatches += _differences(item, _flat(getattr(metadata, "tree", metadata)), _flat(tree))
    if mismatches:
      raise CheckpointMismatch(_mismatch_message(self.directory, step, mismatches), mismatches)

  def restore(self, *, model: nnx.Module, optimizer: nnx.Optimizer, iterator, rng: jax.Array,
              step: int | None = None) -> Restored:
    """Restores `step` (default: the latest) into `model`, `optimizer` and `iterator` in place.

    `rng` is a key of the run's kind (typed or raw, any value): it gives the shape, implementation
    and sharding; the restored key comes back in `Restored.rng`, with the step.

    Raises `CheckpointMismatch` when the arrays' structure or shapes differ from the live
    objects' (before reading any array), and a `UserError` naming the file when a file of the
    step is corrupted or missing.
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
    live = {"model": _storable(model_live), "optimizer": _storable(optimizer_live),
            "rng": rng_live}
    self._check_shapes(step, live)
    item_args = {**{item: _restore_args(tree) for item, tree in live.items()},
                 "data": grain.checkpoint.CheckpointRestore(iterator),
                 "meta": ocp.args.JsonRestore()}
    restored = {}
    # One item at a time, so that a failure names its item's folder.
    for item, args in item_args.items():
      item_dir = self.directory / str(step) / item
      try:
        restored[item] = self._manager.restore(
            step, args=ocp.args.Composite(**{item: args}))[item]
      except (ValueError, KeyError, TypeError, OSError) as error:
        # The arrays' structure and shapes matched their metadata: a failure to read them is
        # damage. The data pipeline's state is checked only by Grain: there, only a missing or
        # undecodable file is.
        if item in live or _is_damaged(error):
          raise self._damaged(error, step, item_dir) from error
        raise UserError(f"{item_dir}: the checkpoint does not match this run's model, optimizer "
                        f"or data pipeline ({_reason(error)}); resume with the config it was "
                        f"saved with or use a fresh --workdir") from error
    mismatches = []
    for item, tree in live.items():
      mismatches += _differences(item, _flat(restored[item]), _flat(tree))
    if mismatches:
      raise CheckpointMismatch(_mismatch_message(self.directory, step, mismatches), mismatches)
    meta = restored["meta"]
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and "rng_impl" in meta):
      raise self._damaged(ValueError(f"it holds {meta!r}, not the step and the key's kind"),
                          step, self.directory / str(step) / "meta" / "metadata")
    if meta["step"] != step:
      raise UserError(f"{self.directory} step {step}: its metadata says step {meta['step']}; the "
                      f"folder was renamed or corrupted")
    rng_data = restored["rng"]["key"]
    if meta["rng_impl"] != _rng_impl(rng):
      raise UserError(f"{self.directory} step {step}: saved with RNG key implementation "
                      f"{meta['rng_impl']}, this run uses {_rng_impl(rng)}")
    nnx.replace_by_pure_dict(model_state, _from_storable(restored["model"], model_live))
    nnx.update(model, model_state)
    nnx.replace_by_pure_dict(optimizer_state, _from_storable(restored["optimizer"], optimizer_live))
    nnx.update(optimizer, optimizer_state)
    restored_rng = (jax.random.wrap_key_data(rng_data, impl=jax.random.key_impl(rng))
                    if _is_key(rng) else rng_data)
    return Restored(step=step, rng=restored_rng)

  def wait_until_finished(self) -> None:
    """Blocks until the pending async save (if any) is on disk; a full disk raises a
    `UserError`."""
    self._translated(self._manager.wait_until_finished, self._saving)
    self._saving = None

  def close(self) -> None:
    try:
      self.wait_until_finished()
      self._empty_trash()
    finally:
      self._manager.close()
      self._save_log.release()


def _differences(item: str, saved: dict[str, Any], live: dict[str, Any]) -> list[str]:
  """"item/path: saved (shape), this run (shape)" for each array that differs or exists on one
  side only."""
  lines = [f"{item}/{path}: saved {tuple(saved[path].shape) if path in saved else 'nothing'}, "
           f"this run {tuple(live[path].shape) if path in live else 'nothing'}"
           for path in sorted(set(saved) | set(live))
           if path not in saved or path not in live
           or tuple(saved[path].shape) != tuple(live[path].shape)]
  return lines


def _mismatch_message(directory: Path, step: int, mismatches: list[str]) -> str:
  shown = "; ".join(mismatches[:4]) + (f"; and {len(mismatches) - 4} more"
                                       if len(mismatches) > 4 else "")
  return (f"{directory} step {step}: the checkpoint's arrays differ from this run's "
          f"({len(mismatches)}: {shown}); resume with the config it was saved with or use a fresh "
          f"--workdir")


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
