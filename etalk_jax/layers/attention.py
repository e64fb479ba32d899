"""The one attention entry point of the project, and the diffusers-style attention module.

`dot_product_attention(..., implementation=...)` takes the implementation a model's `Compute`
asks for and runs each call on what it can run:
  auto   - the backend's best: cuDNN flash attention on a GPU, splash on a TPU, XLA on the CPU.
  xla    - XLA's own ops on every backend: plain softmax attention for short key sequences and,
           from `BLOCKED_MIN_LENGTH` keys on, `blocked_attention` (an online softmax over key
           blocks with flash attention's backward), which never holds the (heads, q, kv) logits.
  cudnn  - cuDNN flash attention through `jax.nn.dot_product_attention`: a CUDA GPU, bf16 / fp16,
           head sizes that are multiples of 8 up to 128. Masks are broadcast to the full
           (q, kv) extent and odd lengths padded by one masked key / dropped query, as jax's
           cuDNN checks require (ETHD's 5-token windows, wav2vec2's padding masks).
  splash - the Pallas splash kernel: a TPU, no mask or bias, both lengths multiples of 128; under
           a mesh (`jax.set_mesh`) it runs in `shard_map` over the mesh axes the batch divides.
A call that a kernel cannot run falls back to the xla path, with one log line per distinct
reason. The choice is `choose_attention`, a pure function of (requested implementation,
backend, shapes, dtype, mask / bias shapes), so it is tested for "gpu" and "tpu" on the CPU;
`target_backend("tpu")` makes calls choose for another platform while lowering a program for it
(`jax.export(..., platforms=("tpu",))`), and `record_attention_calls()` lists what a traced model
asked for and got.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.pallas.ops.tpu.splash_attention import (
  splash_attention_kernel,
  splash_attention_mask,
)
from jax.sharding import PartitionSpec

from etalk_jax.errors import UserError
from etalk_jax.layers.compute import ATTENTION_IMPLEMENTATIONS, FP32, Compute
from etalk_jax.layers.norm import group_norm

log = logging.getLogger(__name__)

BACKEND_KERNELS = {"gpu": "cudnn", "tpu": "splash"}  # what "auto" asks for on each backend
# From this many keys on, the xla path runs `blocked_attention`; below it one block would hold
# all keys anyway. Keys per step: 128 on the CPU (beat 64, 256, 512 on 1k-3k keys); 512 on
# accelerators, whose matrix units want wide tiles (benchmarks/device_check.py times 256-1024).
BLOCKED_MIN_LENGTH = 1024
KEY_BLOCK = {"cpu": 128, "gpu": 512, "tpu": 512}
CPU_KEY_BLOCK = KEY_BLOCK["cpu"]
SPLASH_BLOCK = 128
CUDNN_MAX_HEAD_DIM = 128  # jax's flash check: 128 before Hopper (256 from Hopper on)
# A mask or bias goes to cuDNN as a full (q, kv) bias; above this many bytes the blocked path,
# which never materialises one, is used instead.
CUDNN_MAX_BIAS_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
  """What one call runs: "plain" (softmax over all keys at once), "blocked" (`block` keys per
  step), "cudnn" or "splash"; `reason` says why the requested kernel was not taken."""
  implementation: str
  block: int | None = None
  reason: str | None = None


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """One traced call of `dot_product_attention`, as `record_attention_calls` lists it."""
  requested: str
  backend: str
  query_shape: tuple[int, ...]
  key_shape: tuple[int, ...]
  dtype: str
  mask_shape: tuple[int, ...] | None
  bias_shape: tuple[int, ...] | None
  choice: AttentionChoice


_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "attention_target_backend", default=None)
_RECORDERS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar(
    "attention_recorders", default=())


@contextlib.contextmanager
def target_backend(backend: str) -> Iterator[None]:
  """Calls traced inside choose kernels for `backend` ("cpu", "gpu", "tpu") rather than for the
  platform this process runs on: for lowering a program for another platform on this host."""
  if backend not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"target_backend: {backend!r} is not one of 'cpu', 'gpu', 'tpu'")
  token = _TARGET_BACKEND.set(backend)
  try:
    yield
  finally:
    _TARGET_BACKEND.reset(token)


def current_backend() -> str:
  return _TARGET_BACKEND.get() or jax.default_backend()


@contextlib.contextmanager
def record_attention_calls() -> Iterator[list[AttentionCall]]:
  """Collects an `AttentionCall` for every `dot_product_attention` traced inside (run the model
  under `jax.eval_shape` to list a full-size model's calls without computing anything)."""
  calls: list[AttentionCall] = []
  token = _RECORDERS.set(_RECORDERS.get() + (calls,))
  try:
    yield calls
  finally:
    _RECORDERS.reset(token)


@functools.lru_cache(maxsize=None)
def _log_once(level: int, message: str) -> None:
  log.log(level, message)


def _as_4d(shape: Sequence[int] | None) -> tuple[int, ...] | None:
  return None if shape is None else (1,) * (4 - len(shape)) + tuple(shape)


def _cudnn_refusal(query_shape, key_shape, dtype, mask_shape, bias_shape) -> str | None:
  if np.dtype(dtype) not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
    return (f"cuDNN needs bf16/fp16 inputs, got {np.dtype(dtype).name} (Compute.bf16() computes "
            "in bf16)")
  head_dim = query_shape[-1]
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    return (f"cuDNN needs a head size that is a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}, "
            f"got {head_dim}")
  if mask_shape is not None or bias_shape is not None:
    q_len, kv_len = query_shape[1] + query_shape[1] % 2, key_shape[1] + key_shape[1] % 2
    lead = [max(m, b) for m, b in zip((_as_4d(mask_shape) or (1, 1))[:2],
                                       (_as_4d(bias_shape) or (1, 1))[:2])]
    bias_bytes = lead[0] * lead[1] * q_len * kv_len * 2
    if bias_bytes > CUDNN_MAX_BIAS_BYTES:
      return (f"cuDNN would take this mask / bias as a {bias_bytes / 2**30:.1f} GiB bias over "
              f"every (query, key) pair")
  return None


def _splash_refusal(query_shape, key_shape, mask_shape, bias_shape) -> str | None:
  if mask_shape is not None or bias_shape is not None:
    return "splash runs attention without a mask or bias"
  if query_shape[1] % SPLASH_BLOCK or key_shape[1] % SPLASH_BLOCK:
    return (f"splash needs query and key lengths that are multiples of {SPLASH_BLOCK}, got "
            f"{query_shape[1]} and {key_shape[1]}")
  return None


def choose_attention(requested: str, backend: str, query_shape: Sequence[int],
                     key_shape: Sequence[int], dtype, mask_shape: Sequence[int] | None = None,
                     bias_shape: Sequence[int] | None = None) -> AttentionChoice:
  """What a call of these shapes runs on `backend` when `requested` is asked for (shapes are
  `(batch, length, heads, head_dim)`; mask / bias broadcastable to `(batch, heads, q, kv)`)."""
  if requested not in ATTENTION_IMPLEMENTATIONS:
    raise UserError(f"attention implementation {requested!r} is unknown; choose one of "
                    f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
  kernel = BACKEND_KERNELS.get(backend) if requested == "auto" else requested
  reason = None
  if kernel == "cudnn":
    reason = (f"cuDNN needs a CUDA GPU (backend is {backend!r})" if backend != "gpu" else
              _cudnn_refusal(query_shape, key_shape, dtype, mask_shape, bias_shape))
  elif kernel == "splash":
    reason = (f"splash needs a TPU (backend is {backend!r})" if backend != "tpu" else
              _splash_refusal(query_shape, key_shape, mask_shape, bias_shape))
  if kernel in ("cudnn", "splash") and reason is None:
    return AttentionChoice(kernel)
  if key_shape[1] >= BLOCKED_MIN_LENGTH:
    return AttentionChoice("blocked", KEY_BLOCK.get(backend, CPU_KEY_BLOCK), reason)
  return AttentionChoice("plain", None, reason)


def cudnn_operands(query, key, value, mask=None, bias=None):
  """The arguments `dot_product_attention` gives `jax.nn.dot_product_attention(...,
  implementation="cudnn")`: jax's cuDNN path turns the mask into a bias that must span every
  (query, key) pair, and with a bias it needs even lengths when training. So a mask (and a bias
  whose q or kv axis broadcasts) is broadcast to the full extent, and an odd key length gets one
  zero key that the mask hides, an odd query length one zero query whose output is dropped.
  Returns (query, key, value, mask, bias)."""
  if mask is None and bias is None:
    return query, key, value, None, None
  q_len, kv_len = query.shape[1], key.shape[1]
  pad_q, pad_kv = q_len % 2, kv_len % 2
  full = lambda x: jnp.broadcast_to(x, x.shape[:2] + (q_len, kv_len))  # noqa: E731
  mask = full(jnp.ones((1, 1, 1, 1), bool) if mask is None else
              jnp.reshape(mask, _as_4d(mask.shape)))
  if bias is not None:
    bias = full(jnp.reshape(bias, _as_4d(bias.shape))).astype(query.dtype)
  if pad_q or pad_kv:
    pad_rows = ((0, 0), (0, pad_q), (0, 0), (0, 0))
    pad_keys = ((0, 0), (0, pad_kv), (0, 0), (0, 0))
    query = jnp.pad(query, pad_rows)
    key, value = jnp.pad(key, pad_keys), jnp.pad(value, pad_keys)
    # A padded query row may attend to every real key (its output is dropped); a padded key is
    # hidden from every query.
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, 0)), constant_values=True)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad_kv)), constant_values=False)
    if bias is not None:
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad_q), (0, pad_kv)))
  return query, key, value, mask, bias


def _cudnn_attention(query, key, value, mask, bias):
  query_in, key_in, value_in, mask_in, bias_in = cudnn_operands(query, key, value, mask, bias)
  out = jax.nn.dot_product_attention(query_in, key_in, value_in, bias=bias_in, mask=mask_in,
                                     implementation="cudnn")
  return out[:, :query.shape[1]]


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          mask: jax.Array | None = None,
                          bias: jax.Array | None = None,
                          implementation: str = "auto") -> jax.Array:
  """Scaled dot-product attention on `(batch, length, heads, head_dim)` arrays.

  `mask` is boolean, broadcastable to `(batch, heads, q_length, kv_length)`; True = may attend.
  `bias` is added to the scaled logits, broadcastable to the same shape (WavLM's gated relative
  position bias). `implementation`: see the module docstring.
  """
  backend = current_backend()
  mask_shape = None if mask is None else tuple(mask.shape)
  bias_shape = None if bias is None else tuple(bias.shape)
  choice = choose_attention(implementation, backend, query.shape, key.shape, query.dtype,
                            mask_shape, bias_shape)
  for calls in _RECORDERS.get():
    calls.append(AttentionCall(implementation, backend, tuple(query.shape), tuple(key.shape),
                               np.dtype(query.dtype).name, mask_shape, bias_shape, choice))
  if choice.reason is not None:
    # An explicit request that cannot run is worth a warning; "auto" falling back is expected.
    level = logging.INFO if implementation == "auto" else logging.WARNING
    _log_once(level, f"attention {implementation!r}: {choice.reason}; using the xla path for "
                     f"these calls.")
  if choice.implementation == "splash":
    return splash_attention(query, key, value)
  if choice.implementation == "cudnn":
    return _cudnn_attention(query, key, value, mask, bias)
  if choice.implementation == "blocked":
    return blocked_attention(query, key, value, mask=mask, bias=bias, block=choice.block)
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                      implementation="xla")


def _key_blocks(x: jax.Array | None, blocks: int, block: int, fill) -> jax.Array | None:
  """(..., kv_length) mask or bias -> (blocks, ..., block), padded with `fill`; None stays None."""
  if x is None:
    return None
  pad = blocks * block - x.shape[-1]
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=fill)
  x = x.reshape(x.shape[:-1] + (blocks, block))
  return jnp.moveaxis(x, -2, 0)


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                      mask: jax.Array | None = None, bias: jax.Array | None = None,
                      block: int = CPU_KEY_BLOCK) -> jax.Array:
  """`jax.nn.dot_product_attention(implementation="xla")`, one block of keys at a time.

  An online softmax over key blocks (as flash attention does) never materialises the
  (heads, q, kv) logits: on an accelerator it bounds memory (ETHD's top-level spatial attention
  at 512² x 120 frames would hold 120·5·4096² fp32 logits, ~40 GB, in one call), and on the CPU
  it makes long self-attention (wav2vec2 over a minute of speech: 3000 steps) 2-3x faster. Same
  masking rule as jax.nn: masked logits get a large finite negative, so a fully masked row
  averages all keys as it does there.

  The gradient is flash attention's too (a custom VJP): the backward pass keeps only q, k, v,
  the output and each row's log-sum-exp, and recomputes one key block's logits at a time, so
  training holds no (heads, q, kv) array either (the spatial attention of a 120-frame clip at
  64² latents would otherwise keep 120·5·4096² logits per layer). A bias gets its gradient;
  masks do not need one.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_len = key.shape[1]
  blocks = -(-kv_len // block)

  def key_blocks(x):  # (b, kv, h, d) -> (blocks, b, h, block, d), zero padded
    x = jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, blocks * block - kv_len), (0, 0)))
    return jnp.moveaxis(x.reshape(batch, heads, blocks, block, head_dim), 2, 0)

  in_range = _key_blocks(jnp.ones((kv_len,), bool), blocks, block, False)
  if mask is not None:
    mask = _key_blocks(jnp.broadcast_to(mask, mask.shape[:-1] + (kv_len,)), blocks, block, False)
  if bias is not None:
    bias = _key_blocks(jnp.broadcast_to(bias, bias.shape[:-1] + (kv_len,)).astype(jnp.float32),
                       blocks, block, 0.0)
  out = _flash(jnp.swapaxes(query, 1, 2), key_blocks(key), key_blocks(value), in_range, mask,
               bias)
  return jnp.swapaxes(out, 1, 2).astype(query.dtype)


_LARGE_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _block_logits(q, k, valid, mask, bias):
  """Scaled logits of one key block, masked as jax.nn masks (fp32, `(b, h, q, block)`)."""
  scale = jnp.float32(q.shape[-1] ** -0.5)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.float32(_LARGE_NEGATIVE))
  return jnp.where(valid, logits, -jnp.inf)  # padding past the last key: weight exactly 0


def _flash_forward(q, k_blocks, v_blocks, valid, mask, bias):
  """q `(b, h, q, d)`, keys / values `(blocks, b, h, block, d)`, per-block valid / mask / bias
  -> (output fp32 `(b, h, q, d)`, log-sum-exp of each row `(b, h, q, 1)`)."""
  def step(carry, xs):
    running_max, normaliser, acc = carry
    k, v, block_valid, block_mask, block_bias = xs
    logits = _block_logits(q, k, block_valid, block_mask, block_bias)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1, keepdims=True))
    correction = jnp.exp(running_max - new_max)
    probs = jnp.exp(logits - new_max)
    normaliser = normaliser * correction + jnp.sum(probs, axis=-1, keepdims=True)
    acc = acc * correction + jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v,
                                        preferred_element_type=jnp.float32)
    return (new_max, normaliser, acc), None

  rows = q.shape[:3] + (1,)
  init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  (running_max, normaliser, acc), _ = jax.lax.scan(
      step, init, (k_blocks, v_blocks, valid, mask, bias))
  return acc / normaliser, running_max + jnp.log(normaliser)


@jax.custom_vjp
def _flash(q, k_blocks, v_blocks, valid, mask, bias):
  return _flash_forward(q, k_blocks, v_blocks, valid, mask, bias)[0]


def _flash_fwd(q, k_blocks, v_blocks, valid, mask, bias):
  out, log_sum_exp = _flash_forward(q, k_blocks, v_blocks, valid, mask, bias)
  return out, (q, k_blocks, v_blocks, valid, mask, bias, out, log_sum_exp)


def _sum_to(x, shape):
  """Sum a broadcast result back to the operand's `shape` (the bias's gradient)."""
  axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True)


def _flash_bwd(residuals, d_out):
  q, k_blocks, v_blocks, valid, mask, bias, out, log_sum_exp = residuals
  scale = jnp.float32(q.shape[-1] ** -0.5)
  d_out = d_out.astype(jnp.float32)
  row_dot = jnp.sum(d_out * out, axis=-1, keepdims=True)  # D_i = Σ_d dO·O

  def step(d_q, xs):
    k, v, block_valid, block_mask, block_bias = xs
    probs = jnp.exp(_block_logits(q, k, block_valid, block_mask, block_bias) - log_sum_exp)
    d_v = jnp.einsum("bhqk,bhqd->bhkd", probs, d_out)
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - row_dot)
    if block_mask is not None:  # masked logits are constants
      d_logits = jnp.where(block_mask, d_logits, 0.0)
    d_q = d_q + jnp.einsum("bhqk,bhkd->bhqd", d_logits, k,
                           preferred_element_type=jnp.float32) * scale
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q, preferred_element_type=jnp.float32) * scale
    d_bias = None if block_bias is None else _sum_to(d_logits, block_bias.shape)
    return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias)

  d_q, (d_k, d_v, d_bias) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32),
                                         (k_blocks, v_blocks, valid, mask, bias))
  return d_q.astype(q.dtype), d_k, d_v, None, None, d_bias


_flash.defvjp(_flash_fwd, _flash_bwd)


def _splash_local(query, key, value, *, interpret: bool):
  """Unmasked attention of `(batch, length, heads, head_dim)` arrays through the splash kernel
  (one device's share)."""
  _, q_len, heads, head_dim = query.shape
  kv_len = key.shape[1]
  full = splash_attention_mask.MultiHeadMask(
      [splash_attention_mask.FullMask((q_len, kv_len)) for _ in range(heads)])
  kernel = splash_attention_kernel.make_splash_mha(full, head_shards=1, q_seq_shards=1,
                                                   interpret=interpret)
  # The kernel applies no softmax scale and works per example on (heads, length, head_dim).
  query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
  out = jax.vmap(kernel)(to_heads_first(query), to_heads_first(key), to_heads_first(value))
  return to_heads_first(out).astype(query.dtype)


def batch_mesh_axes(mesh, batch: int) -> tuple[str, ...]:
  """The axes of `mesh` (in its order, size > 1) whose product still divides `batch`: what a
  per-example kernel is split over. Activations' rows hold (batch, frames) folded together and
  are sharded over such axes (data, fsdp, context), so no resharding is needed to enter."""
  axes, size = [], 1
  for name, axis_size in mesh.shape.items():
    if axis_size > 1 and batch % (size * axis_size) == 0:
      axes.append(name)
      size *= axis_size
  return tuple(axes)


def splash_attention(query, key, value, *, interpret: bool = False):
  """Unmasked multi-head attention through the Pallas TPU splash kernel.

  A Pallas kernel is opaque to XLA's partitioner, so under a mesh (`jax.set_mesh`, as the train
  loop sets) the kernel runs in `shard_map`, each device on its share of the batch. The mesh
  axes the batch does not divide see the inputs replicated. `interpret=True` runs the kernel in
  the Pallas interpreter (any backend): how the tests check this path without a TPU.
  """
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else batch_mesh_axes(mesh, query.shape[0])
  if not axes:
    return local(query, key, value)
  spec = PartitionSpec(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(query, key, value)


class Attention(nnx.Module):
  """Multi-head attention with diffusers' `Attention` parameter layout.

  to_q / to_k / to_v / to_out, an optional GroupNorm before the projections and an optional
  residual (the VAE's mid-block attention). Input `(batch, length, dim)` or `(batch, h, w, dim)`.
  """

  def __init__(self, query_dim: int, *, heads: int, dim_head: int,
               cross_attention_dim: int | None = None, qkv_bias: bool = False,
               out_bias: bool = True, norm_num_groups: int | None = None,
               norm_eps: float = 1e-5, residual_connection: bool = False,
               compute: Compute = FP32, rngs: nnx.Rngs):
    inner_dim = heads * dim_head
    context_dim = cross_attention_dim or query_dim
    self.heads = heads
    self.residual_connection = residual_connection
    self.implementation = compute.attention
    kw = compute.dense_kwargs()
    self.group_norm = (group_norm(query_dim, norm_eps, groups=norm_num_groups, compute=compute,
                                  rngs=rngs) if norm_num_groups else None)
    self.to_q = nnx.Linear(query_dim, inner_dim, use_bias=qkv_bias, rngs=rngs, **kw)
    self.to_k = nnx.Linear(context_dim, inner_dim, use_bias=qkv_bias, rngs=rngs, **kw)
    self.to_v = nnx.Linear(context_dim, inner_dim, use_bias=qkv_bias, rngs=rngs, **kw)
    self.to_out = nnx.Linear(inner_dim, query_dim, use_bias=out_bias, rngs=rngs, **kw)

  def __call__(self, hidden: jax.Array, context: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    spatial_shape = None
    if hidden.ndim == 4:
      spatial_shape = hidden.shape
      hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
    residual = hidden
    if self.group_norm is not None:
      hidden = self.group_norm(hidden)
    context = hidden if context is None else context
    split_heads = lambda x: x.reshape(*x.shape[:-1], self.heads, -1)
    query = split_heads(self.to_q(hidden))
    key = split_heads(self.to_k(context))
    value = split_heads(self.to_v(context))
    out = dot_product_attention(query, key, value, mask=mask, implementation=self.implementation)
    out = self.to_out(out.reshape(*out.shape[:-2], -1))
    if self.residual_connection:
      out = out + residual
    if spatial_shape is not None:
      out = out.reshape(spatial_shape)
    return out
