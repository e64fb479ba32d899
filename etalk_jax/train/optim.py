"""8-bit Adam (bitsandbytes' Adam8bit, the paper's optimizer) as an optax transformation.

Both Adam moments are stored block-wise quantised: the tensor is read in row-major order in blocks
of `BLOCK_SIZE` elements, each block is divided by its absolute maximum (kept in fp32) and every
normalised value is stored as the uint8 index of the nearest entry of a 256-entry dynamic
quantisation map (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022). The
first moment uses the signed map, the second (never negative) the unsigned one, which spends the
sign bit on precision. As in bitsandbytes, each step dequantises, runs the fp32 Adam update,
steps with the fp32 moments and requantises them, and tensors with fewer than `MIN_8BIT_SIZE`
elements (biases, norm scales) keep fp32 moments: their state is negligible and they are the
most sensitive to quantisation.

Block size 256: bitsandbytes' block-wise optimizer kernels use 256 (2048 / 4096 are only the
defaults of its stand-alone `quantize_blockwise`). Smaller blocks confine an outlier's loss of
precision to fewer neighbours, and the fp32 absmax costs only 4 / 256 = 1.6% extra bytes.

The uint8 codes keep their parameter's shape (blocks run over the flattened tensor, padded at
the end), so a sharding rule that maps a parameter's shape to a PartitionSpec applies to its
moments unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096


@functools.cache
def dynamic_map(signed: bool) -> np.ndarray:
  """bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted
  values in [-1, 1] (signed) or [0, 1] (unsigned).

  Each of 7 decades 10^-6 .. 10^0 is split linearly into 2^i (signed) or 2^(i+1) (unsigned)
  bins between 0.1 and 1 of the decade, and the code is each bin's midpoint: dense near the
  block's maximum, still non-zero down to ~1e-7 of it. Plus 0 and 1.
  """
  exponent_bits = 7
  values = []
  for i in range(exponent_bits):
    bins = 2 ** i if signed else 2 ** (i + 1)
    edges = np.linspace(0.1, 1, bins + 1, dtype=np.float32)
    means = (edges[:-1] + edges[1:]) / 2
    scale = np.float32(10.0 ** (i - exponent_bits + 1))
    values.extend((scale * means).tolist())
    if signed:
      values.extend((-scale * means).tolist())
  values += [0.0, 1.0]
  if len(values) != 256:
    raise AssertionError(f"dynamic map has {len(values)} entries, not 256")
  return np.sort(np.asarray(values, np.float32))


class QuantizedTensor(NamedTuple):
  """A tensor stored block-wise: `codes` (uint8, the tensor's shape) index the dynamic map;
  `absmax` (fp32, one per block of `BLOCK_SIZE` flattened elements) scales each block."""
  codes: jax.Array
  absmax: jax.Array


def _blocks(x: jax.Array) -> jax.Array:
  flat = x.reshape(-1)
  padding = -flat.size % BLOCK_SIZE
  return jnp.pad(flat, (0, padding)).reshape(-1, BLOCK_SIZE)


def quantize(x: jax.Array, *, signed: bool) -> QuantizedTensor:
  """Nearest-code block-wise quantisation of `x` (fp32)."""
  code = jnp.asarray(dynamic_map(signed))
  blocks = _blocks(x.astype(jnp.float32))
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  # An all-zero block divides by 1 instead: its codes are then those of 0.
  normalised = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  midpoints = (code[1:] + code[:-1]) / 2
  codes = jnp.searchsorted(midpoints, normalised).astype(jnp.uint8)
  return QuantizedTensor(codes.reshape(-1)[:x.size].reshape(x.shape), absmax)


def dequantize(q: QuantizedTensor, *, signed: bool) -> jax.Array:
  code = jnp.asarray(dynamic_map(signed))
  values = _blocks(code[q.codes.astype(jnp.int32)]) * q.absmax[:, None]
  return values.reshape(-1)[:q.codes.size].reshape(q.codes.shape)


def _as_quantized(moment: Any) -> QuantizedTensor:
  # nnx.Optimizer hands the state back with each QuantizedTensor turned into an nnx.State.
  if isinstance(moment, QuantizedTensor):
    return moment
  return QuantizedTensor(codes=moment["codes"], absmax=moment["absmax"])


class ScaleByAdam8bitState(NamedTuple):
  count: jax.Array
  mu: Any  # per leaf: QuantizedTensor (signed map) or an fp32 array for small tensors
  nu: Any  # per leaf: QuantizedTensor (unsigned map) or an fp32 array


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                       min_8bit_size: int = MIN_8BIT_SIZE) -> optax.GradientTransformation:
  """Like `optax.scale_by_adam`, with block-wise 8-bit moments for tensors of at least
  `min_8bit_size` elements."""

  def init_moment(param, signed):
    if param.size < min_8bit_size:
      return jnp.zeros(param.shape, jnp.float32)
    return quantize(jnp.zeros(param.shape, jnp.float32), signed=signed)

  def init_fn(params):
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: init_moment(p, True), params),
        nu=jax.tree.map(lambda p: init_moment(p, False), params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu_correction = 1 - b1 ** count.astype(jnp.float32)
    nu_correction = 1 - b2 ** count.astype(jnp.float32)

    def leaf(grad, mu, nu):
      grad32 = grad.astype(jnp.float32)
      quantised = grad.size >= min_8bit_size
      mu32 = dequantize(_as_quantized(mu), signed=True) if quantised else mu
      nu32 = dequantize(_as_quantized(nu), signed=False) if quantised else nu
      mu32 = b1 * mu32 + (1 - b1) * grad32
      nu32 = b2 * nu32 + (1 - b2) * grad32 * grad32
      # The step uses the fp32 moments; only what is carried to the next step is quantised.
      step = (mu32 / mu_correction) / (jnp.sqrt(nu32 / nu_correction) + eps)
      if quantised:
        mu32, nu32 = quantize(mu32, signed=True), quantize(nu32, signed=False)
      return step.astype(grad.dtype), mu32, nu32

    # Flattened up to the gradients' structure, each moment is one leaf: an array or a whole
    # QuantizedTensor.
    structure = jax.tree.structure(updates)
    results = [leaf(*args) for args in zip(structure.flatten_up_to(updates),
                                             structure.flatten_up_to(state.mu),
                                             structure.flatten_up_to(state.nu))]
    steps, mu, nu = ([r[i] for r in results] for i in range(3))
    return structure.unflatten(steps), ScaleByAdam8bitState(
        count=count, mu=structure.unflatten(mu), nu=structure.unflatten(nu))

  return optax.GradientTransformation(init_fn, update_fn)


def adam_8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, *, weight_decay: float = 0.0,
              min_8bit_size: int = MIN_8BIT_SIZE) -> optax.GradientTransformation:
  """bitsandbytes' Adam8bit / AdamW8bit: weight decay, when non-zero, is decoupled (AdamW), as
  in bitsandbytes' kernels. `learning_rate` may be an optax schedule."""
  parts = [scale_by_adam_8bit(b1, b2, eps, min_8bit_size=min_8bit_size)]
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)



class Optimizer(nnx.Optimizer):
  """`nnx.Optimizer` whose state keeps the structure `tx.init` gave it through every update.

  `nnx.Optimizer.update` stores the new optax state through `nnx.state`, which turns NamedTuple
  nodes inside it (8-bit Adam's `QuantizedTensor` moments) into `nnx.State`s. The state after
  the first update would then be another pytree than the initial one: a step compiled for the
  first rejects its own output, shardings derived from it do not fit, and `nnx.to_pure_dict` of
  it cannot be put back with `nnx.replace_by_pure_dict` (checkpoint restore). Each update here
  puts the moments back as `QuantizedTensor`s.
  """

  def update(self, model, grads, /, **kwargs):
    updates = super().update(model, grads, **kwargs)
    for variable in jax.tree.leaves(self.opt_state,
                                    is_leaf=lambda x: isinstance(x, nnx.Variable)):
      value = variable.get_value()
      if not isinstance(value, QuantizedTensor) and _is_quantized_mapping(value):
        variable.set_value(_as_quantized(value))
    return updates


def _is_quantized_mapping(value: Any) -> bool:
  try:
    return set(value.keys()) == set(QuantizedTensor._fields)
  except AttributeError:
    return False
