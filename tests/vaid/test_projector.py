"""The audio-lip Perceiver projector: shapes, per-frame independence, config sizes, and the
pull / push losses on inputs whose values are known by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from etalk_jax import model_io
from etalk_jax.layers.compute import Compute
from etalk_jax.vaid.projector import (
  PROJECTOR_FULL,
  PROJECTOR_TINY,
  AudioLipProjector,
  ProjectorConfig,
  projector_loss,
  pull_loss,
  push_loss,
)

CONFIG = PROJECTOR_TINY
AUDIO = np.random.default_rng(0).normal(
    size=(2, 6, CONFIG.window, CONFIG.audio_layers, CONFIG.audio_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def projector():
  return AudioLipProjector(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def apply(projector):
  graphdef, state = nnx.split(projector)
  return jax.jit(lambda state, audio: nnx.merge(graphdef, state)(audio)), state


def test_shapes_and_dtypes(projector, apply):
  fn, state = apply
  lip = fn(state, AUDIO)
  assert lip.shape == (2, 6, CONFIG.output_dim) and lip.dtype == jnp.float32
  assert projector.position_embedding.shape == (CONFIG.window, CONFIG.audio_layers,
                                                CONFIG.audio_dim)
  # One frame with no leading axes works too, and gives that frame's row.
  np.testing.assert_allclose(projector(AUDIO[1, 2]), lip[1, 2], atol=1e-5)
  half = AudioLipProjector(CONFIG, compute=Compute(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert half(AUDIO[:, :2]).dtype == jnp.bfloat16


def test_wrong_audio_shape_is_a_clear_error(projector):
  with pytest.raises(ValueError, match="window, layers, hidden"):
    projector(AUDIO[..., :-1])


def test_frames_only_see_their_own_window(apply):
  fn, state = apply
  changed = AUDIO.copy()
  changed[0, 3] += 1.0
  before, after = np.asarray(fn(state, AUDIO)), np.asarray(fn(state, changed))
  moved = np.abs(after - before).max(axis=-1)
  assert moved[0, 3] > 1e-3
  moved[0, 3] = 0.0
  assert moved.max() == 0.0


def test_full_size_parameter_count():
  model = model_io.abstract(lambda rngs: AudioLipProjector(PROJECTOR_FULL, rngs=rngs))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  d, ff = 768, 768 * 4
  block = 2 * 2 * d + 4 * d * d + d + 2 * d + (d * ff + ff + ff * d + d)
  expected = 5 * 12 * 768 + (768 * d + d) + d + 4 * block + 2 * d + (d * 512 + 512)
  assert count == expected


def test_config_round_trip_and_errors():
  assert ProjectorConfig.from_dict(CONFIG.to_dict()) == CONFIG
  with pytest.raises(ValueError, match="multiple of num_heads"):
    ProjectorConfig(dim=30, num_heads=8)
  with pytest.raises(ValueError, match="unknown V-AID projector config fields: bogus"):
    ProjectorConfig.from_dict({"bogus": 1})


def test_pull_loss_is_mean_absolute_error():
  lip_audio = jnp.array([[1.0, -2.0], [0.5, 0.0]])
  lip_vision = jnp.array([[0.0, 0.0], [0.5, 3.0]])
  assert float(pull_loss(lip_audio, lip_vision)) == pytest.approx((1 + 2 + 0 + 3) / 4)
  with pytest.raises(ValueError, match="same shape"):
    pull_loss(lip_audio, lip_vision[:1])


def test_push_loss_on_known_correlations():
  a = np.array([1.0, -1.0, 1.0, -1.0])
  b = np.array([1.0, 1.0, -1.0, -1.0])   # uncorrelated with a over these 4 frames
  # l_a features (a, b, -a), e_a features (a, 3b + 7): correlations [[1, 0], [0, 1], [-1, 0]].
  lip = np.stack([a, b, -a], axis=-1)
  expression = np.stack([a, 3 * b + 7], axis=-1)
  assert float(push_loss(lip, expression)) == pytest.approx(3 / 6, abs=1e-4)
  assert float(push_loss(np.stack([a], -1), np.stack([b], -1))) == pytest.approx(0.0, abs=1e-7)
  # Frames may come with leading (batch, frames) axes; a constant feature counts as 0.
  constant = np.stack([a, np.full(4, 2.0)], axis=-1)
  assert float(push_loss(constant.reshape(2, 2, 2), np.stack([-a], -1).reshape(2, 2, 1))
               ) == pytest.approx(1 / 2, abs=1e-4)


def test_projector_loss_push_off_by_default():
  rng = np.random.default_rng(1)
  lip_audio, lip_vision = rng.normal(size=(2, 8, 4)), rng.normal(size=(2, 8, 4))
  expression = rng.normal(size=(2, 8, 3))
  total, parts = projector_loss(CONFIG, lip_audio, lip_vision, expression)
  assert set(parts) == {"pull"} and float(total) == float(parts["pull"])
  pushing = dataclasses.replace(CONFIG, use_push=True)
  total, parts = projector_loss(pushing, lip_audio, lip_vision, expression)
  assert float(total) == pytest.approx(float(parts["pull"]) + 0.1 * float(parts["push"]))
  assert float(parts["push"]) > 0
  with pytest.raises(ValueError, match="pass e_a"):
    projector_loss(pushing, lip_audio, lip_vision)
