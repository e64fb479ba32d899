"""Learning checks on tiny random data (CPU, ~40 s): the projector's pull loss and Di-CTE's x0
loss fall at least 10x when the targets are a fixed function of the audio (so both losses can
reach ~0: Di-CTE's x0 is then predictable from the context at every noise level)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from etalk_jax.vaid.dicte import DICTE_TINY, DiCTE, dicte_loss
from etalk_jax.vaid.projector import PROJECTOR_TINY, AudioLipProjector, pull_loss

pytestmark = pytest.mark.slow


def _fixed_map(rng, inputs: np.ndarray, out_dim: int, gain: float) -> np.ndarray:
  weight = rng.normal(size=(inputs.shape[-1], out_dim)) / np.sqrt(inputs.shape[-1])
  return np.tanh(gain * inputs @ weight).astype(np.float32)


def _fell(losses: list[float]) -> float:
  return float(np.mean(losses[:3]) / np.mean(losses[-10:]))


def test_projector_pull_loss_falls_tenfold():
  config = PROJECTOR_TINY
  rng = np.random.default_rng(0)
  audio = rng.normal(size=(4, 16, config.window, config.audio_layers, config.audio_dim)
                     ).astype(np.float32)
  lip = _fixed_map(rng, audio.reshape(4, 16, -1), config.output_dim, gain=2.0)
  model = AudioLipProjector(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: pull_loss(m(audio), lip))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(250)]
  assert _fell(losses) >= 10, losses[::25]


def test_dicte_loss_falls_tenfold():
  config = DICTE_TINY
  rng = np.random.default_rng(1)
  frames = config.window_frames
  audio = rng.normal(size=(8, frames, config.window, config.audio_layers, config.audio_dim)
                     ).astype(np.float32)
  expression = _fixed_map(rng, audio.mean(axis=(2, 3)), config.expression_dim, gain=4.0)
  image = rng.uniform(-1, 1, (8, 16, 16, config.image_channels)).astype(np.float32)
  condition = rng.normal(size=(8, config.condition_dim)).astype(np.float32)
  model = DiCTE(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, key):
    loss, grads = nnx.value_and_grad(
        lambda m: dicte_loss(m, key, expression, audio, image, condition))(model)
    optimizer.update(model, grads)
    return loss

  key = jax.random.key(0)
  losses = [float(train_step(model, optimizer, jax.random.fold_in(key, i))) for i in range(300)]
  assert _fell(losses) >= 10, losses[::30]
