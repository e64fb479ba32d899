"""Di-CTE: shapes, what AdaLN-zero initialisation implies, the cosine schedule, DDIM against a
NumPy reference, the clean-prefix training semantics, and long generation that compiles its
window loop once."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from etalk_jax import model_io
from etalk_jax.layers.compute import Compute
from etalk_jax.vaid.dicte import (
  DICTE_FULL,
  DICTE_TINY,
  DiCTE,
  DiCTEConfig,
  cosine_alpha_bars,
  ddim_step,
  denoise_window,
  dicte_loss,
  generate_expressions,
  masked_x0_loss,
  sampling_schedule,
  sampling_timesteps,
  training_inputs,
  window_count,
)

CONFIG = DICTE_TINY
FRAMES = CONFIG.window_frames
RNG = np.random.default_rng(0)
AUDIO = RNG.normal(size=(2, FRAMES, CONFIG.window, CONFIG.audio_layers,
                         CONFIG.audio_dim)).astype(np.float32)
IMAGE = RNG.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
CONDITION = RNG.normal(size=(2, CONFIG.condition_dim)).astype(np.float32)
EXPRESSION = RNG.normal(size=(2, FRAMES, CONFIG.expression_dim)).astype(np.float32)


def _randomise_modulations(model: DiCTE, seed: int = 1) -> DiCTE:
  """A copy whose zero-initialised AdaLN layers hold random weights (a trained-like model)."""
  model = nnx.clone(model)
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for layer in [block.modulation for block in model.blocks] + [model.output_modulation]:
    layer.kernel[...] = 0.2 * jax.random.normal(next(keys), layer.kernel.shape)
    layer.bias[...] = 0.2 * jax.random.normal(next(keys), layer.bias.shape)
  return model


@pytest.fixture(scope="module")
def model():
  return DiCTE(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def trained_like(model):
  return _randomise_modulations(model)


@pytest.fixture(scope="module")
def apply():
  """One jitted forward, shared by every model of the tiny structure."""
  @jax.jit
  def forward(model, noisy, timesteps):
    return model(noisy, timesteps, AUDIO, IMAGE, CONDITION)
  return forward


def test_shapes_and_dtypes(model, apply):
  out = apply(model, EXPRESSION, jnp.array([10, 500]))
  assert out.shape == EXPRESSION.shape and out.dtype == jnp.float32
  context = model.context(AUDIO[:, :5], IMAGE)
  assert context.shape == (2, 5, CONFIG.dim)
  assert model.identity(IMAGE).shape == (2, CONFIG.dim)
  assert model.conditioning(jnp.int32(3), CONDITION).shape == (2, 2 * CONFIG.dim)
  half = DiCTE(CONFIG, compute=Compute(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert half(EXPRESSION[:, :4], 7, AUDIO[:, :4], IMAGE, CONDITION).dtype == jnp.bfloat16


def test_clear_errors(model):
  too_long = np.concatenate([AUDIO, AUDIO[:, :1]], axis=1)
  with pytest.raises(ValueError, match="at most window_frames"):
    model.context(too_long, IMAGE)
  with pytest.raises(ValueError, match="audio windows of shape"):
    model.context(AUDIO[..., :-1], IMAGE)
  with pytest.raises(ValueError, match="prefix_frames"):
    DiCTEConfig(window_frames=20, prefix_frames=20)


def test_adaln_zero_init_makes_each_frame_a_function_of_its_own_token(model, apply,
                                                                      trained_like):
  """Zero gates: every block is the identity, so the output is output_proj(LN(token)): the same
  for every timestep and condition, and frame i depends on frame i's inputs alone."""
  base = np.asarray(apply(model, EXPRESSION, jnp.array([0, 0])))
  other_time = np.asarray(apply(model, EXPRESSION, jnp.array([999, 400])))
  other_condition = model(EXPRESSION, jnp.array([0, 0]), AUDIO, IMAGE, -3 * CONDITION)
  np.testing.assert_array_equal(other_time, base)
  np.testing.assert_allclose(other_condition, base, atol=1e-6)
  tokens = model.expression_proj(EXPRESSION) + model.context(AUDIO, IMAGE)
  np.testing.assert_allclose(model.output_proj(model.output_norm(tokens)), base, atol=1e-5)
  changed = EXPRESSION.copy()
  changed[1, 5] += 1.0
  moved = np.abs(np.asarray(apply(model, changed, jnp.array([0, 0]))) - base).max(axis=-1)
  assert moved[1, 5] > 1e-3 and np.delete(moved.ravel(), FRAMES + 5).max() == 0.0
  # Not vacuous: with non-zero modulation the timestep and the other frames matter.
  trained = np.asarray(apply(trained_like, EXPRESSION, jnp.array([0, 0])))
  assert np.abs(np.asarray(apply(trained_like, EXPRESSION, jnp.array([999, 400]))) - trained
                ).max() > 1e-3
  moved = np.abs(np.asarray(apply(trained_like, changed, jnp.array([0, 0]))) - trained)
  assert moved[1, 0].max() > 1e-5


def test_cosine_schedule_and_trailing_timesteps():
  alpha_bars = cosine_alpha_bars(1000)
  f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
  np.testing.assert_allclose(alpha_bars[:500], [f(t + 1) / f(0) for t in range(500)],
                             rtol=1e-10)
  assert np.all(np.diff(alpha_bars) < 0) and alpha_bars[-1] < 1e-8
  timesteps = sampling_timesteps(1000, 25)
  assert timesteps[0] == 999 and timesteps[-1] == 39 and np.all(np.diff(timesteps) == -40)
  steps, alpha_bar, alpha_bar_prev = sampling_schedule(DICTE_FULL)
  assert steps.shape == alpha_bar.shape == alpha_bar_prev.shape == (25,)
  assert alpha_bar_prev[-1] == 1.0 and np.all(alpha_bar_prev[:-1] == alpha_bar[1:])


def _ddim_reference(x_t, x0, alpha_bar, alpha_bar_prev):
  """DDIM (Song et al. 2021, eq. 12) with eta = 0, so sigma_t = 0, in float64."""
  eps = (x_t - np.sqrt(alpha_bar) * x0) / np.sqrt(1 - alpha_bar)
  direction = np.sqrt(1 - alpha_bar_prev - 0.0 ** 2) * eps
  return np.sqrt(alpha_bar_prev) * x0 + direction


def test_ddim_step_matches_numpy_reference():
  rng = np.random.default_rng(3)
  x_t, x0 = rng.normal(size=(2, 2, 7, 30))
  for alpha_bar, alpha_bar_prev in [(0.1, 0.3), (0.9, 0.99), (0.5, 1.0), (2.4e-9, 3.9e-3)]:
    ours = ddim_step(jnp.asarray(x_t, jnp.float32), jnp.asarray(x0, jnp.float32),
                     jnp.float32(alpha_bar), jnp.float32(alpha_bar_prev))
    np.testing.assert_allclose(ours, _ddim_reference(x_t, x0, alpha_bar, alpha_bar_prev),
                               rtol=2e-5, atol=2e-5 * np.sqrt(1 / alpha_bar))
  # ᾱ_prev = 1 (the last step) returns the prediction itself.
  np.testing.assert_allclose(ddim_step(x_t, x0, 0.4, 1.0), x0, atol=1e-6)


def test_denoise_window_is_the_ddim_loop(trained_like):
  """The jitted fori_loop equals a NumPy DDIM loop that calls the model step by step."""
  timesteps, alpha_bar, alpha_bar_prev = sampling_schedule(CONFIG)
  noise = np.random.default_rng(4).normal(size=EXPRESSION.shape).astype(np.float32)
  graphdef, state = nnx.split(trained_like)
  ours = denoise_window(graphdef, state, noise, np.zeros_like(noise),
                        np.zeros((1, FRAMES, 1), bool), AUDIO, IMAGE, CONDITION,
                        timesteps, alpha_bar, alpha_bar_prev)
  context = trained_like.context(AUDIO, IMAGE)
  x = noise.astype(np.float64)
  for t, a, a_prev in zip(timesteps, alpha_bar, alpha_bar_prev):
    x0 = np.asarray(trained_like.denoise(jnp.asarray(x, jnp.float32), t, context, CONDITION),
                    np.float64)
    x = _ddim_reference(x, x0, np.float64(a), np.float64(a_prev))
  np.testing.assert_allclose(ours, x, atol=1e-4 * np.abs(x).max())


def test_training_inputs_hold_the_prefix_clean_without_loss():
  key = jax.random.key(5)
  always = dataclasses.replace(CONFIG, prefix_probability=1.0)
  noisy, timesteps, loss_mask = training_inputs(key, EXPRESSION, always)
  prefix = CONFIG.prefix_frames
  np.testing.assert_array_equal(noisy[:, :prefix], EXPRESSION[:, :prefix])
  assert np.all(np.asarray(noisy[:, prefix:]) != EXPRESSION[:, prefix:])
  np.testing.assert_array_equal(loss_mask[:, :prefix], 0.0)
  np.testing.assert_array_equal(loss_mask[:, prefix:], 1.0)
  assert timesteps.shape == (2,) and np.all((0 <= timesteps) & (timesteps < 1000))
  never = dataclasses.replace(CONFIG, prefix_probability=0.0)
  noisy, _, loss_mask = training_inputs(key, EXPRESSION, never)
  np.testing.assert_array_equal(loss_mask, 1.0)
  assert np.all(np.asarray(noisy) != EXPRESSION)
  # The default: about 80% of windows carry their prefix.
  _, _, loss_mask = training_inputs(key, np.zeros((4000, FRAMES, 30), np.float32), CONFIG)
  assert abs(float((loss_mask[:, 0] == 0).mean()) - 0.8) < 0.03


def test_no_loss_on_the_clean_prefix():
  rng = np.random.default_rng(6)
  predicted, target = rng.normal(size=(2, 2, FRAMES, 30))
  loss_mask = np.ones((2, FRAMES), np.float32)
  loss_mask[0, :CONFIG.prefix_frames] = 0.0
  loss = float(masked_x0_loss(predicted, target, loss_mask))
  weight = loss_mask[..., None]
  assert loss == pytest.approx(float((weight * (predicted - target) ** 2).sum()
                                     / (weight.sum() * 30)), rel=1e-6)
  moved = predicted.copy()
  moved[0, :CONFIG.prefix_frames] += 10.0
  assert float(masked_x0_loss(moved, target, loss_mask)) == loss
  moved[1, 0] += 10.0
  assert float(masked_x0_loss(moved, target, loss_mask)) > loss


def test_dicte_loss_ignores_the_prefix_target(model):
  """With the prefix always on, ground truth in the prefix enters only as clean input: the
  loss's gradient w.r.t. the *target* there is zero."""
  always = DiCTE(dataclasses.replace(CONFIG, prefix_probability=1.0), rngs=nnx.Rngs(0))
  key = jax.random.key(7)
  noisy, timesteps, loss_mask = training_inputs(key, EXPRESSION, always.config)
  predicted = always(noisy, timesteps, AUDIO, IMAGE, CONDITION)
  grad = jax.grad(lambda target: masked_x0_loss(predicted, target, loss_mask))(
      jnp.asarray(EXPRESSION))
  assert np.all(np.asarray(grad[:, :CONFIG.prefix_frames]) == 0)
  assert np.abs(np.asarray(grad[:, CONFIG.prefix_frames:])).max() > 0
  total = dicte_loss(always, key, EXPRESSION, AUDIO, IMAGE, CONDITION)
  assert float(total) == pytest.approx(float(masked_x0_loss(predicted, EXPRESSION, loss_mask)),
                                       rel=1e-5)


def test_long_generation_compiles_the_window_loop_once(trained_like):
  frames = 30  # windows of 12 frames, 4 held clean: 4 windows
  assert window_count(frames, CONFIG) == 4 and window_count(12, CONFIG) == 1
  rng = np.random.default_rng(8)
  audio = rng.normal(size=(2, 62, CONFIG.window, CONFIG.audio_layers, CONFIG.audio_dim)
                     ).astype(np.float32)
  key = jax.random.key(9)
  before = denoise_window._cache_size()
  out = generate_expressions(trained_like, key, audio[:, :frames], IMAGE, CONDITION)
  assert out.shape == (2, frames, 30) and bool(jnp.isfinite(out).all())
  assert denoise_window._cache_size() - before <= 1  # 0 if another test compiled it already

  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if event == (
      "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    again = generate_expressions(trained_like, key, audio[:, :frames], IMAGE, CONDITION)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []  # the same length again compiles nothing at all
  longer = generate_expressions(trained_like, key, audio, IMAGE, CONDITION)  # 7 windows
  np.testing.assert_array_equal(again, out)
  assert denoise_window._cache_size() - before <= 1
  assert longer.shape == (2, 62, 30)
  # Windows are deterministic given the key: the longer clip's first windows are the same.
  np.testing.assert_allclose(longer[:, :28], out[:, :28], atol=1e-5)
  # The first window alone is the one-window generation of its 12 frames.
  single = generate_expressions(trained_like, key, audio[:, :FRAMES], IMAGE, CONDITION)
  np.testing.assert_allclose(out[:, :FRAMES], single, atol=1e-5)


def test_held_prefix_is_kept_exactly(trained_like):
  timesteps, alpha_bar, alpha_bar_prev = sampling_schedule(CONFIG)
  graphdef, state = nnx.split(trained_like)
  prefix = np.random.default_rng(10).normal(size=EXPRESSION.shape).astype(np.float32)
  mask = (np.arange(FRAMES) < CONFIG.prefix_frames)[None, :, None]
  out = np.asarray(denoise_window(graphdef, state, EXPRESSION, prefix, mask, AUDIO, IMAGE,
                                  CONDITION, timesteps, alpha_bar, alpha_bar_prev))
  np.testing.assert_array_equal(out[:, :CONFIG.prefix_frames], prefix[:, :CONFIG.prefix_frames])
  free = np.asarray(denoise_window(graphdef, state, EXPRESSION, prefix, np.zeros_like(mask),
                                   AUDIO, IMAGE, CONDITION, timesteps, alpha_bar,
                                   alpha_bar_prev))
  # The prefix conditions the rest of the window through attention.
  assert np.abs(out[:, CONFIG.prefix_frames:] - free[:, CONFIG.prefix_frames:]).max() > 1e-5


def test_full_size_parameter_count():
  model = model_io.abstract(lambda rngs: DiCTE(DICTE_FULL, rngs=rngs))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  d = 512
  block = 4 * (d * d + d) + (d * 4 * d + 4 * d + 4 * d * d + d) + (2 * d * 6 * d + 6 * d)
  identity = sum(9 * c_in * c_out + c_out for c_in, c_out in
                 zip((3, 32, 64, 128), (32, 64, 128, 256))) + 256 * d + d
  expected = ((30 * d + d) + (768 * d + d) + identity + 220 * d
              + (256 * d + d + d * d + d) + (30 * d + d + d * d + d)
              + 8 * block + (2 * d * 2 * d + 2 * d) + (d * 30 + 30))
  assert count == expected
