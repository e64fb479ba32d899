"""The held-out loss (config.train.eval_every): the training loss on a fresh iterator of held-out
batches, with fixed keys, logged as held_out/* beside the training metrics."""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from etalk_jax.errors import UserError
from etalk_jax.train import loop


class _Linear(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 1, rngs=rngs)


def _batches(offset: float):
  return iter(grain.MapDataset.source(list(range(100))).map(
      lambda i: {"x": np.full((2, 2), i + offset, np.float32)}).to_iter_dataset())


def _loss(model, batch, key):
  # The key enters the loss, so the test sees which keys the held-out batches get.
  target = jax.random.normal(key, (2, 1))
  error = jnp.mean((model.linear(batch["x"]) - target) ** 2)
  return error, {"error_x2": 2 * error}


def _task(held_out=True):
  return loop.Task(name="linear", model=_Linear(nnx.Rngs(0)), trainable=nnx.Param, loss=_loss,
                   batches=_batches(0.0), export=lambda model, folder: None, batch_size=2,
                   held_out=(lambda: _batches(0.5)) if held_out else None)


def _config(eval_every: int):
  return ml_collections.ConfigDict({
      "train": {"steps": 4, "seed": 3, "checkpoint_every": 4, "log_every": 4,
                "eval_every": eval_every, "eval_batches": 2},
      "optim": {"name": "adam", "lr": 0.01}, "mesh": {"data": -1}})


def test_held_out_loss_is_logged_with_fixed_keys(tmp_path):
  task = _task()
  loop.train(_config(2), tmp_path, task=task, progress=False)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(line["step"], "held_out/loss" in line) for line in lines] == [
      (2, True), (4, False), (4, True)]
  # At the last step the model holds the final parameters: recompute the held-out loss from
  # them, on the first two held-out batches with the documented keys.
  base = jax.random.fold_in(jax.random.key(3), loop.HELD_OUT_STREAM)
  batches = _batches(0.5)
  expected = np.mean([float(_loss(task.model, next(batches), jax.random.fold_in(base, i))[0])
                      for i in range(2)])
  np.testing.assert_allclose(lines[-1]["held_out/loss"], expected, rtol=1e-6)
  np.testing.assert_allclose(lines[-1]["held_out/error_x2"], 2 * expected, rtol=1e-6)
  assert lines[0]["held_out/loss"] != lines[-1]["held_out/loss"]  # the parameters moved


def test_held_out_loss_needs_held_out_data(tmp_path):
  with pytest.raises(UserError, match="no held-out data"):
    loop.train(_config(2), tmp_path, task=_task(held_out=False), progress=False)
