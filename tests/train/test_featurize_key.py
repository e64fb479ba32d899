"""A featurize that draws (`Task.featurize_key`: the reference frame's noise augmentation) gets a
key of the step's RNG, so a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from etalk_jax.train import loop


class _Scale(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(2, 1, rngs=rngs)


def _run(workdir, steps: int, drawn: dict) -> None:
  batches = iter(grain.MapDataset.source(list(range(100))).map(
      lambda i: {"x": np.full((2, 2), i, np.float32)}).to_iter_dataset())

  def featurize(batch, key):
    noise = np.asarray(jax.random.normal(key, (2, 2)))
    drawn[int(batch["x"][0, 0])] = noise
    return {"x": batch["x"] + noise}

  def loss(model, batch, key):
    del key
    return jnp.mean(model.linear(batch["x"]) ** 2), {}

  task = loop.Task(name="keyed", model=_Scale(nnx.Rngs(0)), trainable=nnx.Param, loss=loss,
                   batches=batches, export=lambda model, folder: None, featurize=featurize,
                   featurize_key=True, batch_size=2)
  config = ml_collections.ConfigDict({
      "train": {"steps": steps, "seed": 3, "checkpoint_every": 2, "log_every": 2},
      "optim": {"name": "adam", "lr": 0.01}, "mesh": {"data": -1}})
  loop.train(config, workdir, task=task, progress=False)


def test_featurize_draws_from_the_step_key_and_resumes(tmp_path):
  straight, resumed = {}, {}
  _run(tmp_path / "straight", 4, straight)
  _run(tmp_path / "resumed", 2, resumed)
  _run(tmp_path / "resumed", 4, resumed)  # resumes at step 2: batches 2 and 3
  assert sorted(straight) == sorted(resumed) == [0, 1, 2, 3]
  for index in range(4):
    np.testing.assert_array_equal(resumed[index], straight[index])
  step_key = jax.random.fold_in(jax.random.key(3), 1)  # batch 0 is step 1's
  expected = jax.random.normal(jax.random.fold_in(
      jax.random.fold_in(step_key, loop.FEATURIZE_STREAM), jax.process_index()), (2, 2))
  np.testing.assert_array_equal(straight[0], np.asarray(expected))
  assert not np.array_equal(straight[0], straight[1])
