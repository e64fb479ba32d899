"""The one attention entry point of the project, and the diffusers-style attention module.

`dot_product_attention` switches implementation by name:
  xla    - `jax.nn.dot_product_attention(implementation="xla")`; runs everywhere (the default).
  cudnn  - cuDNN flash attention through `jax.nn.dot_product_attention`; needs a CUDA GPU, bf16 or
           fp16 inputs and a head size that is a multiple of 8 up to 128.
  splash - the Pallas splash-attention kernel; needs a TPU and lengths that are multiples of 128.
Where a request cannot run (no such hardware, an unsupported dtype, shape or mask), the call falls
back to `xla` and logs once why, so one config works on every machine.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax.layers.compute import ATTENTION_IMPLEMENTATIONS, FP32, Compute
from etalk_jax.layers.norm import group_norm

log = logging.getLogger(__name__)
SPLASH_BLOCK = 128
CPU_KEY_BLOCK = 128  # keys per step of `blocked_attention` (128 beat 64, 256, 512 on 1k-3k keys)
CPU_BLOCKED_MIN_LENGTH = 1024  # from this many keys on, the CPU runs `blocked_attention`


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  log.warning(message)


def _choose(implementation: str, query, key, mask, bias=None) -> str:
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is unknown; choose one of "
                     f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
  backend = jax.default_backend()
  if implementation == "auto":
    implementation = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")
  if implementation == "cudnn":
    if backend != "gpu":
      _warn_once(f"attention 'cudnn' needs a CUDA GPU (backend is {backend!r}); using 'xla'.")
      return "xla"
    if query.dtype not in (jnp.bfloat16, jnp.float16):
      _warn_once(f"attention 'cudnn' needs bf16/fp16 inputs (got {query.dtype}); using 'xla'. "
                 "Use Compute.gpu() for bf16 compute.")
      return "xla"
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 128:
      _warn_once(f"attention 'cudnn' needs a head size that is a multiple of 8 up to 128 "
                 f"(got {head_dim}); using 'xla' for these calls.")
      return "xla"
  if implementation == "splash":
    if backend != "tpu":
      _warn_once(f"attention 'splash' needs a TPU (backend is {backend!r}); using 'xla'.")
      return "xla"
    if (mask is not None or bias is not None or query.shape[1] % SPLASH_BLOCK
        or key.shape[1] % SPLASH_BLOCK):
      return "xla"  # short temporal / cross-attention sequences: not worth a kernel launch.
  return implementation


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          mask: jax.Array | None = None,
                          bias: jax.Array | None = None,
                          implementation: str = "xla") -> jax.Array:
  """Scaled dot-product attention on `(batch, length, heads, head_dim)` arrays.

  `mask` is boolean, broadcastable to `(batch, heads, q_length, kv_length)`; True = may attend.
  `bias` is added to the scaled logits, broadcastable to the same shape (WavLM's gated relative
  position bias); splash has no bias input, so a biased call runs on `xla` there.
  """
  chosen = _choose(implementation, query, key, mask, bias)
  if chosen == "splash":
    return splash_attention(query, key, value)
  if (chosen == "xla" and jax.default_backend() == "cpu"
      and key.shape[1] >= CPU_BLOCKED_MIN_LENGTH):
    return blocked_attention(query, key, value, mask=mask, bias=bias)
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                      implementation=chosen)


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
  (heads, q, kv) logits, which on the CPU makes long self-attention (wav2vec2 over a minute of
  speech: 3000 steps) 2-3x faster. Same masking rule as jax.nn: masked logits get a large
  finite negative, so a fully masked row averages all keys as it does there.

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


def splash_attention(query, key, value, *, interpret: bool = False):
  """Unmasked multi-head attention through the Pallas TPU splash kernel.

  `interpret=True` runs the kernel in the Pallas interpreter (any backend), which is how the tests
  check this path without a TPU.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  _, q_len, heads, head_dim = query.shape
  kv_len = key.shape[1]
  full = mask_lib.MultiHeadMask([mask_lib.FullMask((q_len, kv_len)) for _ in range(heads)])
  kernel = kernel_lib.make_splash_mha(full, head_shards=1, q_seq_shards=1, interpret=interpret)
  # The kernel applies no softmax scale and works per example on (heads, length, head_dim).
  query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(kernel)(to_heads_first(query), to_heads_first(key), to_heads_first(value))
  return to_heads_first(out).astype(query.dtype)


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
