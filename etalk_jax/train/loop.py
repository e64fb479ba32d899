"""One training loop for every stage (encoder adapters, projector, Di-CTE, ETHD, speech emotion).

A stage (`etalk_jax.train.stages`) turns its config into a `Task`: the model (trainable parts and
frozen ones together), which parameters train, a loss, a checkpointable iterator of host batches,
a host-side `featurize` step (frozen encoders that turn loader windows into the loss's inputs)
and an `export` that writes the trained component. Everything else is here, read top to bottom:

  mesh and shardings   parameters and optimizer state placed by `etalk_jax.parallel` rules,
                       batches split over (data, fsdp)
  optimizer            optax: global-norm clipping -> Adam or 8-bit Adam (the paper's Adam8bit)
                       with a warmup + constant / cosine schedule -> optional parameter EMA
  step                 one `jax.jit` with in/out shardings and donated state; gradient
                       accumulation as a `lax.scan` over micro-batches (one update per step);
                       rematerialisation and bf16 compute are the model's `Compute`
  checkpoints          `TrainCheckpointer`: model, optimizer (EMA inside), RNG, Grain iterator
                       and step in one Orbax step; resumes exactly; SIGTERM saves and exits
  metrics              loss, gradient norm, learning rate, steps/s, examples/s and model-FLOPs
                       utilisation (XLA's cost analysis of the compiled step over the device's
                       peak) to TensorBoard event files and metrics.jsonl; a progress bar
  held-out loss        with config.train.eval_every > 0: every that many steps (and at the
                       last), the loss on config.train.eval_batches batches of the held-out
                       split (config.train.eval_split), logged as `held_out/<metric>` beside
                       the training loss
  non-finite steps     a NaN / inf loss or gradient norm: config.train.nonfinite "stop" (the
                       default) raises a UserError naming the step and its batch (clip ids and
                       window starts) before the next checkpoint or export, so none holds the
                       poisoned state; "skip" leaves parameters and optimizer state as they were
                       (a `lax.cond` inside the step) and logs the step with its batch. The step
                       never syncs for this: each step's loss and gradient norm stay on the
                       device until the loop fetches them anyway (log steps) or must (before a
                       checkpoint, the export, a SIGTERM stop), all pending ones in one transfer
  resume checks        a checkpoint whose arrays' shapes differ from the config's model is
                       refused, naming the arrays and the config fields that differ from the
                       run's config.json (written once the restore succeeded); a damaged step
                       folder is refused naming the file (etalk_jax.train.checkpoint)

The step's RNG key is `fold_in(run key, step)`, so a resumed run draws what the uninterrupted
one would have; a `featurize` that draws (`Task.featurize_key`) gets `fold_in(fold_in(step key,
FEATURIZE_STREAM), process index)`, reproducible the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tensorboardX import SummaryWriter
from tqdm import tqdm

from etalk_jax import parallel
from etalk_jax.errors import UserError
from etalk_jax.layers.sharding import use_rules
from etalk_jax.train import stages
from etalk_jax.train.checkpoint import CheckpointMismatch, StopRequest, TrainCheckpointer
from etalk_jax.train.config import MESH_DEFAULTS, OPTIM_DEFAULTS, TRAIN_DEFAULTS, with_defaults
from etalk_jax.train.optim import Optimizer, adam_8bit

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
FEATURIZE_STREAM = 1  # featurize's key: fold_in(step key, FEATURIZE_STREAM), not the loss's
# The held-out loss's keys: fold_in(fold_in(run key, HELD_OUT_STREAM), batch index), the same at
# every evaluation, so that the curve moves only with the parameters.
HELD_OUT_STREAM = 2
NONFINITE_MODES = ("stop", "skip")  # config.train.nonfinite


@dataclasses.dataclass
class Task:
  """What a stage hands the loop."""
  name: str
  model: nnx.Module  # everything the loss reads; frozen parts stay as they are
  trainable: Any  # nnx filter of the parameters that train (e.g. nnx.Param, ADAPTER_PARAMS)
  loss: LossFn  # (model, batch, key) -> (scalar loss, {name: scalar metric})
  batches: Iterator[Batch]  # host batches; a Grain iterator, so its position checkpoints
  export: Callable[[nnx.Module, Path], Any]  # writes the trained component(s) to a folder
  featurize: Callable[..., Batch] = lambda batch: batch  # host side, before the step
  # featurize draws random numbers (e.g. the reference frame's noise augmentation): it is
  # called as featurize(batch, key) with a key of the step's RNG.
  featurize_key: bool = False
  batch_size: int = 1  # examples per step (for examples/s)
  # A fresh iterator of the held-out split's host batches (the same fields as `batches`), for
  # the held-out loss (config.train.eval_every); None: the stage has no held-out data.
  held_out: Callable[[], Iterator[Batch]] | None = None


# -------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over `warmup_steps`, then `constant` or `cosine` decay to
  `lr * final_lr_fraction` at `total_steps`."""
  optim = with_defaults(optim, OPTIM_DEFAULTS)
  lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
  kind = optim["schedule"]
  if kind == "constant":
    if not warmup:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 1), max(total_steps, warmup + 1),
        end_value=lr * float(optim["final_lr_fraction"]))
  raise UserError(f"config.optim.schedule={kind!r}: use 'constant' or 'cosine'")


def params_ema(decay: float) -> optax.GradientTransformation:
  """Tracks an exponential moving average of the parameters AFTER this update; place it last in a
  chain (it leaves the updates as they are). Living in the optimizer state, the average is
  sharded like the parameters and checkpointed with the optimizer."""

  def init_fn(params):
    # A copy: the average must not share buffers with the parameters (both are donated).
    return {"ema": jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)}

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the parameters; call update(grads, state, params)")
    ema = jax.tree.map(lambda e, p, u: decay * e + (1 - decay) * (p + u).astype(jnp.float32),
                       state["ema"], params, updates)
    return updates, {"ema": ema}

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim: Mapping[str, Any], total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """config.optim -> (transformation, learning-rate schedule)."""
  optim = with_defaults(optim, OPTIM_DEFAULTS)
  schedule = learning_rate_schedule(optim, total_steps)
  parts = []
  if optim["clip_norm"]:
    parts.append(optax.clip_by_global_norm(float(optim["clip_norm"])))
  name = optim["name"]
  adam_args = dict(b1=float(optim["b1"]), b2=float(optim["b2"]), eps=float(optim["eps"]))
  weight_decay = float(optim["weight_decay"])
  if name == "adam8bit":
    parts.append(adam_8bit(schedule, weight_decay=weight_decay, **adam_args))
  elif name == "adam":
    parts.append(optax.adamw(schedule, weight_decay=weight_decay, **adam_args))
  else:
    raise UserError(f"config.optim.name={name!r}: use 'adam' or 'adam8bit'")
  if optim["ema_decay"]:
    parts.append(params_ema(float(optim["ema_decay"])))
  return optax.chain(*parts), schedule


def ema_state(optimizer: nnx.Optimizer):
  """The EMA parameters inside `optimizer` (a pure dict like the trainable state), or None."""
  for part in optimizer.opt_state:
    if isinstance(part, dict) and "ema" in part:
      return nnx.to_pure_dict(part["ema"])
  return None


# ------------------------------------------------------------------------------------- step


def _split_micro(batch: Batch, accumulation: int) -> Batch:
  def split(x):
    if x.shape[0] % accumulation:
      raise UserError(f"a batch of {x.shape[0]} does not split into {accumulation} "
                      "micro-batches; make config.data.batch_size a multiple of "
                      "config.optim.grad_accum")
    return x.reshape((accumulation, x.shape[0] // accumulation) + x.shape[1:])
  return jax.tree.map(split, batch)


def make_step(task: Task, graphdef: nnx.GraphDef, accumulation: int, schedule: optax.Schedule,
              skip_nonfinite: bool = False):
  """The pure step `(state, batch, key) -> (state, metrics)` over `nnx.state((model,
  optimizer))`; gradients only for `task.trainable`, accumulated over `accumulation`
  micro-batches. With `skip_nonfinite`, a step whose loss or gradient norm is not finite returns
  `state` unchanged (optimizer step count included)."""

  def step(state, batch, key):
    before = jax.tree.leaves(state)  # the input arrays: what a skipped step returns
    model, optimizer = nnx.merge(graphdef, state)
    model_graph, trainable, frozen = nnx.split(model, task.trainable, ...)

    def loss_of(params, micro_batch, micro_key):
      return task.loss(nnx.merge(model_graph, params, frozen), micro_batch, micro_key)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if accumulation == 1:
      (loss, metrics), grads = grad_fn(trainable, batch, key)
    else:
      def accumulate(carry, inputs):
        micro_batch, micro_key = inputs
        (loss, metrics), grads = grad_fn(trainable, micro_batch, micro_key)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

      micro = _split_micro(batch, accumulation)
      keys = jax.random.split(key, accumulation)
      (_, metrics0), grads0 = jax.eval_shape(grad_fn, trainable,
                                             jax.tree.map(lambda x: x[0], micro), keys[0])
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (jnp.zeros(()), metrics0,
                                                                   grads0))
      (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, (micro, keys))
      loss, metrics, grads = jax.tree.map(lambda x: x / accumulation, (loss, metrics, grads))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(optimizer.step.get_value()))
    optimizer.update(model, grads)
    after = nnx.state((model, optimizer))
    if skip_nonfinite:
      finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
      # A cond, not a select per leaf: it picks whole buffers (typed RNG keys included).
      leaves = jax.lax.cond(finite, lambda new, old: new, lambda new, old: old,
                            jax.tree.leaves(after), before)
      after = jax.tree.unflatten(jax.tree.structure(after), leaves)
    return after, metrics

  return step


def make_held_out_loss(task: Task, graphdef: nnx.GraphDef):
  """`(state, batch, key) -> metrics`: the training loss and its metrics on a batch, without
  gradients or an update (the model as the step sees it: the same loss, in the same mode)."""

  def held_out_loss(state, batch, key):
    model, _ = nnx.merge(graphdef, state)
    loss, metrics = task.loss(model, batch, key)
    return dict(metrics, loss=loss)

  return held_out_loss


def held_out_metrics(task: Task, loss_fn, state, mesh, rules, batches: int, key: jax.Array
                     ) -> dict[str, float]:
  """The mean of `loss_fn`'s metrics over the first `batches` batches of a fresh held-out
  iterator, each with its fixed key, as {"held_out/<name>": value}."""
  iterator = task.held_out()
  totals: dict[str, float] = {}
  for index in range(batches):
    batch_key = jax.random.fold_in(key, index)
    host_batch = next(iterator)
    if task.featurize_key:
      host_batch = task.featurize(host_batch, jax.random.fold_in(
          jax.random.fold_in(batch_key, FEATURIZE_STREAM), jax.process_index()))
    else:
      host_batch = task.featurize(host_batch)
    with jax.set_mesh(mesh), use_rules(rules):
      metrics = jax.device_get(loss_fn(state, _global_batch(host_batch, mesh), batch_key))
    for name, value in metrics.items():
      totals[name] = totals.get(name, 0.0) + float(value) / batches
  return {f"held_out/{name}": value for name, value in totals.items()}


# ---------------------------------------------------------------------------------- metrics

# Peak dense bf16 FLOP/s per chip, for model-FLOPs utilisation (vendor figures).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None  # e.g. the CPU: no meaningful peak, MFU is not reported


class MetricWriter:
  """metrics.jsonl (one JSON object per logged step) and TensorBoard event files; only process
  0 writes."""

  def __init__(self, workdir: Path):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


# ------------------------------------------------------------------------------------- loop


def _global_batch(batch: Batch, mesh) -> Batch:
  """This process's batch slice -> global arrays split over (data, fsdp)."""
  def put(x):
    x = np.asarray(x)
    if x.dtype.kind in "USO":  # strings (clip ids...) never reach the device
      return None
    sharding = parallel.batch_sharding(mesh, x.ndim)
    return jax.make_array_from_process_local_data(sharding, x)
  return {name: value for name, value in ((k, put(v)) for k, v in batch.items())
          if value is not None}


def batch_ids(batch: Batch) -> str:
  """What identifies a host batch in a message: its clip ids and window starts, where it has
  them."""
  parts = []
  for name in ("clip_id", "start"):
    if name in batch:
      values = [v.decode() if isinstance(v, bytes) else v for v in np.asarray(batch[name]).tolist()]
      parts.append(f"{name} {values}")
  where = "" if jax.process_count() == 1 else f" (process {jax.process_index()}'s examples)"
  return ("batch: " + ", ".join(parts) + where) if parts else "its batch has no clip ids"


def _nonfinite_steps(pending: list) -> list[tuple[int, float, float, str]]:
  """(step, loss, gradient norm, batch ids) of the pending steps whose loss or gradient norm is
  not finite; fetches all pending values in one transfer."""
  values = jax.device_get([(loss, norm) for _, loss, norm, _ in pending])
  return [(step, float(loss), float(norm), ids)
          for (step, _, _, ids), (loss, norm) in zip(pending, values)
          if not (np.isfinite(loss) and np.isfinite(norm))]


def _flat_config(tree, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for name, value in tree.items():
    flat.update(_flat_config(value, f"{prefix}.{name}" if prefix else str(name)))
  return flat


def config_changes(saved_file: Path, config: ml_collections.ConfigDict) -> str:
  """The fields of `config` that differ from the config saved in `saved_file` (the run's
  config.json), as "name: saved -> now; ..."."""
  try:
    saved = _flat_config(json.loads(saved_file.read_text()))
  except FileNotFoundError:
    return f"{saved_file} is missing, so the changed fields cannot be named"
  except ValueError as error:
    return f"{saved_file} does not parse ({error}), so the changed fields cannot be named"
  now = _flat_config(json.loads(config.to_json_best_effort()))
  changes = [f"{name}: {saved.get(name, '(absent)')!r} -> {now.get(name, '(absent)')!r}"
             for name in sorted(set(saved) | set(now)) if saved.get(name) != now.get(name)]
  return "; ".join(changes) if changes else "none (the shapes changed another way)"


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, task: Task | None = None,
          progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the stage `config.stage` in `workdir`; returns a summary.

  workdir/checkpoints  Orbax steps (resume from the latest)
  workdir/export       the trained component, written when the run reaches config.train.steps
  workdir/metrics.jsonl, workdir/tensorboard/, workdir/config.json (the config of the latest
                       start or resume, written once a resume's checkpoint was restored)
  """
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  train_config = with_defaults(config.train, TRAIN_DEFAULTS)
  total_steps = int(train_config["steps"])
  mesh = parallel.make_mesh(dict(config.get("mesh", MESH_DEFAULTS)))
  rules = tuple(tuple(rule) for rule in config.get("rules", parallel.DEFAULT_RULES))
  task = task or stages.make_task(config, mesh)
  accumulation = int(with_defaults(config.optim, OPTIM_DEFAULTS)["grad_accum"])
  tx, schedule = make_optimizer(config.optim, total_steps)

  model = task.model
  optimizer = Optimizer(model, tx, wrt=task.trainable)
  graphdef, state = nnx.split((model, optimizer))
  # Logical axis names per parameter (etalk_jax.parallel.logical); the optimizer's moments
  # follow their parameters.
  shardings = parallel.state_shardings(state, mesh, rules,
                                       family_axes=parallel.tree_axes((model, optimizer)))
  state = jax.device_put(state, shardings)
  nnx.update((model, optimizer), state)

  nonfinite = train_config["nonfinite"]
  if nonfinite not in NONFINITE_MODES:
    raise UserError(f"config.train.nonfinite={nonfinite!r}: use one of {NONFINITE_MODES}")
  config_file = workdir / "config.json"
  rng = jax.random.key(int(train_config["seed"]))
  start = 0
  checkpoint_every = int(train_config["checkpoint_every"])
  checkpointer = TrainCheckpointer(workdir / "checkpoints", max_to_keep=int(train_config["keep"]))
  if checkpointer.latest_step() is not None:
    try:
      restored = checkpointer.restore(model=model, optimizer=optimizer, iterator=task.batches,
                                      rng=rng)
    except CheckpointMismatch as error:
      checkpointer.close()
      shown = "; ".join(error.mismatches[:4]) + (
          f"; and {len(error.mismatches) - 4} more" if len(error.mismatches) > 4 else "")
      raise UserError(
          f"{workdir}: cannot resume: this config changes the shapes of {len(error.mismatches)} "
          f"saved arrays ({shown}). Fields that differ from the run's config.json: "
          f"{config_changes(config_file, config)}. Resume with the saved values or use a fresh "
          f"--workdir") from error
    except BaseException:
      checkpointer.close()
      raise
    start, rng = restored.step, restored.rng
    log.info("resumed %s from step %d", task.name, start)
    state = nnx.state((model, optimizer))
  # Only now: a refused resume leaves the config the checkpoints were saved with.
  if jax.process_index() == 0:
    config_file.write_text(config.to_json_best_effort(indent=2))

  step_fn = jax.jit(make_step(task, graphdef, accumulation, schedule,
                              skip_nonfinite=nonfinite == "skip"),
                    out_shardings=(shardings, None), donate_argnums=(0,))
  eval_every = int(train_config["eval_every"])
  held_out_fn = None
  if eval_every > 0:
    if task.held_out is None:
      raise UserError(f"config.train.eval_every={eval_every}: stage {task.name} has no held-out "
                      "data; set it to 0")
    held_out_fn = jax.jit(make_held_out_loss(task, graphdef))
    held_out_key = jax.random.fold_in(jax.random.key(int(train_config["seed"])), HELD_OUT_STREAM)
  writer = MetricWriter(workdir)
  log_every = int(train_config["log_every"])
  peak = peak_flops_per_device(float(train_config["peak_tflops"]))
  compiled, flops_per_step, compile_seconds = None, None, 0.0
  summary: dict[str, Any] = {"stage": task.name, "start_step": start}
  window_start, window_steps = time.perf_counter(), 0
  last: dict[str, float] = {}
  bar = tqdm(total=total_steps, initial=start, desc=f"train {task.name}", unit="step",
             disable=not progress or jax.process_index() != 0, dynamic_ncols=True)

  def say(message: str) -> None:
    """A line for the user above the progress bar (process 0 only)."""
    if jax.process_index() != 0:
      return
    if progress:
      tqdm.write(f"   {message}")
    else:
      print(f"   {message}", flush=True)
  stopped = False
  # (step, loss, gradient norm, batch ids) of the steps not yet checked for NaN / inf: device
  # scalars, fetched together when the loop next syncs (see _nonfinite_steps).
  pending: list[tuple[int, jax.Array, jax.Array, str]] = []
  skipped: list[int] = []
  try:
    with StopRequest() as stop:
      for step in range(start + 1, total_steps + 1):
        key = jax.random.fold_in(rng, step)
        loaded = next(task.batches)
        if task.featurize_key:  # each host draws for its own examples
          host_batch = task.featurize(loaded, jax.random.fold_in(
              jax.random.fold_in(key, FEATURIZE_STREAM), jax.process_index()))
        else:
          host_batch = task.featurize(loaded)
        batch = _global_batch(host_batch, mesh)
        if compiled is None:
          # Compiled once, ahead of time, so that its cost analysis gives the FLOPs for MFU;
          # every step's batch has the same shapes. Said first: the bar sits at its first step
          # meanwhile, for minutes on a CPU.
          say(f"{task.name}: compiling the training step (once per run: seconds to minutes "
              "on a CPU; a second run of the same shapes loads it from the compilation cache)")
          began = time.perf_counter()
          # The mesh and the config's rules for the activation constraints inside models.
          with jax.set_mesh(mesh), use_rules(rules):
            compiled = step_fn.lower(state, batch, key).compile()
          compile_seconds = time.perf_counter() - began
          say(f"{task.name}: compiled in {compile_seconds:.0f} s")
          cost = compiled.cost_analysis()
          cost = cost[0] if isinstance(cost, (list, tuple)) else cost
          flops_per_step = float((cost or {}).get("flops", 0.0))
          window_start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        pending.append((step, metrics["loss"], metrics["grad_norm"], batch_ids(loaded)))
        window_steps += 1
        bar.update(1)
        stopping = stop.requested()
        logging_step = step % log_every == 0 or step == total_steps
        saving = step % checkpoint_every == 0 or step == total_steps or stopping
        if logging_step or saving:  # the loop syncs here anyway; before any save, it must
          for bad_step, loss, norm, ids in _nonfinite_steps(pending):
            if nonfinite == "stop":
              raise UserError(
                  f"step {bad_step}: the loss is {loss} and the gradient norm {norm} ({ids}); "
                  f"the run stopped before saving that state: the last checkpoint is step "
                  f"{checkpointer.latest_step()} in {checkpointer.directory}. Check those clips, "
                  f"lower config.optim.lr, or set config.train.nonfinite=skip to skip such "
                  f"updates")
            log.warning("step %d: loss %s, gradient norm %s (%s): update skipped", bad_step,
                        loss, norm, ids)
            writer.write(bad_step, {"skipped_nonfinite": 1.0})
            skipped.append(bad_step)
          pending.clear()
        if logging_step:
          metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - window_start
          metrics["steps_per_s"] = window_steps / elapsed
          metrics["examples_per_s"] = metrics["steps_per_s"] * task.batch_size
          if peak and flops_per_step:
            metrics["mfu"] = flops_per_step * metrics["steps_per_s"] / (peak * jax.device_count())
          writer.write(step, metrics)
          bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
          last = metrics
          window_start, window_steps = time.perf_counter(), 0
        if held_out_fn is not None and (step % eval_every == 0 or step == total_steps):
          held_out = held_out_metrics(task, held_out_fn, state, mesh, rules,
                                      int(train_config["eval_batches"]), held_out_key)
          writer.write(step, held_out)
          last = {**last, **held_out}
          window_start = time.perf_counter()  # the evaluation is not training time
        if saving:
          nnx.update((model, optimizer), state)
          checkpointer.save(step, model=model, optimizer=optimizer, iterator=task.batches,
                            rng=rng, force=True)
        if stopping:
          stopped = True
          summary["stopped_at"] = step
          break
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  nnx.update((model, optimizer), state)
  if not stopped:
    ema = ema_state(optimizer)
    if ema is not None:  # export the averaged weights
      trainable = nnx.state(model, task.trainable)
      nnx.replace_by_pure_dict(trainable, ema)
      nnx.update(model, trainable)
    if jax.process_index() == 0:
      # What an export killed midway left (weights.atomic_folder's temporary folders): never
      # read, only removed.
      for stale in [*workdir.glob(".export.partial-*"), *workdir.glob("export/.*.partial-*")]:
        shutil.rmtree(stale, ignore_errors=True)
      task.export(model, workdir / "export")
    summary["export"] = str(workdir / "export")
  summary.update(final_metrics=last, compile_seconds=round(compile_seconds, 2),
                 flops_per_step=flops_per_step, steps=total_steps, skipped_steps=skipped)
  return summary
