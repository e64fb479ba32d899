import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from etalk_jax.train import optim


def test_dynamic_maps_match_bitsandbytes():
  signed, unsigned = optim.dynamic_map(True), optim.dynamic_map(False)
  for code in (signed, unsigned):
    assert code.shape == (256,) and np.all(np.diff(code) >= 0)
    assert 0.0 in code and code[-1] == 1.0
  # Values of bitsandbytes' create_dynamic_map(signed=...): the top decade's last bin midpoints
  # and the smallest non-zero codes (10^-6 x the midpoint of one / two bins of [0.1, 1]).
  np.testing.assert_allclose(signed[0], -(1 - 0.9 / 128), rtol=1e-6)
  np.testing.assert_allclose(unsigned[-2], 1 - 0.9 / 256, rtol=1e-6)
  np.testing.assert_allclose(np.min(np.abs(signed[signed != 0])), 0.55e-6, rtol=1e-5)
  np.testing.assert_allclose(unsigned[1], 0.325e-6, rtol=1e-5)
  assert unsigned.min() == 0.0


@pytest.mark.parametrize("signed, bound", [(True, 0.00704), (False, 0.00352)])
def test_round_trip_error_is_bounded_per_block(signed, bound):
  # Magnitudes spanning 6 decades, with one large outlier: block-wise scaling keeps it from
  # destroying the precision of the other blocks.
  key_value, key_scale = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_value, (37, 301)) * 10.0 ** jax.random.uniform(
      key_scale, (37, 301), minval=-6, maxval=0)
  x = x.at[0, 0].set(1e3)
  if not signed:
    x = jnp.abs(x)
  quantized = optim.quantize(x, signed=signed)
  assert quantized.codes.shape == x.shape and quantized.codes.dtype == jnp.uint8
  assert quantized.absmax.shape == (-(-x.size // optim.BLOCK_SIZE),)
  restored = optim.dequantize(quantized, signed=signed)
  error = np.abs(np.asarray(restored - x)).reshape(-1)
  absmax = np.repeat(np.asarray(quantized.absmax), optim.BLOCK_SIZE)[:x.size]
  # Nearest-code rounding: at most half the widest gap of the map, times the block's absmax.
  assert np.all(error <= bound * absmax + 1e-12)
  # Away from the outlier's block, the error follows the other blocks' own scale.
  rest = np.abs(np.asarray(x)).reshape(-1)[optim.BLOCK_SIZE:]
  assert error[optim.BLOCK_SIZE:].max() < 0.01 * rest.max() < 1e-4 * 1e3
  zeros = optim.quantize(jnp.zeros((4, 100)), signed=signed)
  np.testing.assert_array_equal(optim.dequantize(zeros, signed=signed), 0.0)


def _regression_problem():
  """A noisy teacher MLP, 32 -> 128 -> 128 -> 16, and a student of the same shape: 2 x 4096+
  element matrices (8-bit moments), biases and 128 x 16 output (fp32 moments). 2048 examples x 16
  outputs against ~23k parameters, so the student cannot simply interpolate the noise."""
  keys = jax.random.split(jax.random.key(0), 6)
  sizes = [(32, 128), (128, 128), (128, 16)]
  def init(key_offset):
    return [{"w": jax.random.normal(keys[key_offset + i], shape) / np.sqrt(shape[0]),
             "b": jnp.zeros(shape[1])} for i, shape in enumerate(sizes)]
  def apply(params, x):
    for layer in params[:-1]:
      x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]
  teacher = init(0)
  x = jax.random.normal(jax.random.key(1), (2048, 32))
  y = apply(teacher, x) + 0.1 * jax.random.normal(jax.random.key(2), (2048, 16))
  student = init(3)
  loss = lambda params: jnp.mean((apply(params, x) - y) ** 2)
  return student, loss


def _train(tx, params, loss, steps):
  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state, value = step(params, opt_state)
  return float(loss(params)), opt_state


def test_tracks_fp32_adam_on_regression():
  params, loss = _regression_problem()
  initial = float(loss(params))
  reference, _ = _train(optax.adam(3e-3), params, loss, 300)
  ours, state = _train(optim.adam_8bit(3e-3), params, loss, 300)
  assert reference < 0.2 * initial
  print(f"final loss: 8-bit Adam {ours:.5g}, fp32 Adam {reference:.5g}, initial {initial:.4g}")
  assert abs(ours / reference - 1) < 0.05, (ours, reference)
  adam_state = state[0]
  assert isinstance(adam_state.mu[0]["w"], optim.QuantizedTensor)
  assert isinstance(adam_state.nu[1]["w"], optim.QuantizedTensor)
  assert adam_state.mu[2]["w"].dtype == jnp.float32  # 128 elements: fp32 moments


def _state_bytes(tx, params) -> int:
  shapes = jax.eval_shape(tx.init, params)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def test_state_is_under_30_percent_of_fp32_adam():
  # A transformer block's worth of SVD-sized matrices, with biases and norm scales.
  params = {"qkv": jax.ShapeDtypeStruct((1280, 3840), jnp.float32),
            "out": jax.ShapeDtypeStruct((1280, 1280), jnp.float32),
            "ff_in": jax.ShapeDtypeStruct((1280, 10240), jnp.float32),
            "ff_out": jax.ShapeDtypeStruct((5120, 1280), jnp.float32),
            "conv": jax.ShapeDtypeStruct((3, 3, 640, 1280), jnp.float32),
            "bias": jax.ShapeDtypeStruct((1280,), jnp.float32),
            "norm_scale": jax.ShapeDtypeStruct((1280,), jnp.float32)}
  ratio = _state_bytes(optim.adam_8bit(1e-5), params) / _state_bytes(optax.adam(1e-5), params)
  assert ratio <= 0.30, ratio
  assert ratio > 0.25  # 2 uint8 moments + one fp32 absmax per 256 elements: ~25.4%


def test_decoupled_weight_decay_and_schedule():
  params = {"w": jnp.ones((64, 64))}
  zero_grads = {"w": jnp.zeros((64, 64))}
  tx = optim.adam_8bit(optax.constant_schedule(0.1), weight_decay=0.5)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # No gradient: the update is the decay alone, -lr * wd * param.
  np.testing.assert_allclose(updates["w"], -0.05, rtol=1e-6)


class _Mlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(16, 512, rngs=rngs)
    self.out = nnx.Linear(512, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def test_nnx_optimizer_under_jit():
  model = _Mlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optim.adam_8bit(1e-2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(0), (64, 16))
  y = jax.random.normal(jax.random.key(1), (64, 4))

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < 0.7 * losses[0]
  assert int(optimizer.step[...]) == 20
  codes = [leaf for leaf in jax.tree.leaves(nnx.state(optimizer)) if leaf.dtype == jnp.uint8]
  assert {c.shape for c in codes} == {(16, 512)}  # mu and nu of the only large kernel



def test_optimizer_state_keeps_its_structure_through_a_jitted_step_and_a_checkpoint():
  """The train loop's pure step over `nnx.state((model, optimizer))`: with 8-bit moments
  (a 16x512 kernel) the state a step returns has the structure it was given, so one compiled
  step runs again on its own output, and the stepped state's pure dict (what a checkpoint
  stores) goes back into a fresh optimizer. Plain `nnx.Optimizer` turns the moments'
  QuantizedTensor into nnx.State on the first update and fails both."""
  x = jax.random.normal(jax.random.key(0), (8, 16))
  for cls, keeps in ((optim.Optimizer, True), (nnx.Optimizer, False)):
    model = _Mlp(nnx.Rngs(0))
    graphdef, state = nnx.split((model, cls(model, optim.adam_8bit(1e-2), wrt=nnx.Param)))

    def step(state):
      model, optimizer = nnx.merge(graphdef, state)
      optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))
      return nnx.state((model, optimizer))

    after = jax.eval_shape(step, state)
    assert (jax.tree.structure(after) == jax.tree.structure(state)) is keeps
    if keeps:
      compiled = jax.jit(step).lower(state).compile()
      stepped = compiled(compiled(state))  # a structure mismatch raises here
      fresh_model = _Mlp(nnx.Rngs(1))
      fresh = nnx.state(optim.Optimizer(fresh_model, optim.adam_8bit(1e-2), wrt=nnx.Param))
      _, stepped_optimizer = nnx.merge(graphdef, stepped)
      nnx.replace_by_pure_dict(fresh, nnx.to_pure_dict(nnx.state(stepped_optimizer)))
      codes = [leaf for leaf in jax.tree.leaves(fresh) if leaf.dtype == jnp.uint8]
      assert len(codes) == 2 and int(fresh["step"][...]) == 2
