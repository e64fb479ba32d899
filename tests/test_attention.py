"""The attention entry point: the xla path, fallbacks off their hardware, splash in interpret mode."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from etalk_jax.layers import attention
from etalk_jax.layers.compute import Compute


def naive_attention(q, k, v, mask=None):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def random_qkv(q_len=7, kv_len=5, heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  shape = lambda n: (2, n, heads, head_dim)
  return (rng.standard_normal(shape(q_len), np.float32),
          rng.standard_normal(shape(kv_len), np.float32),
          rng.standard_normal(shape(kv_len), np.float32))


def test_xla_matches_softmax_attention_with_and_without_mask():
  q, k, v = random_qkv()
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v), naive_attention(q, k, v),
                             rtol=1e-5, atol=1e-6)
  band = np.abs(np.arange(7)[:, None] - np.arange(5)[None, :]) <= 2  # a banded mask
  got = attention.dot_product_attention(q, k, v, mask=band[None, None])
  np.testing.assert_allclose(got, naive_attention(q, k, v, band[None, None]), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("implementation", ["cudnn", "splash"])
def test_accelerator_implementations_fall_back_on_cpu_with_a_message(implementation, caplog):
  assert jax.default_backend() == "cpu"
  attention._warn_once.cache_clear()
  q, k, v = random_qkv()
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    got = attention.dot_product_attention(q, k, v, implementation=implementation)
  np.testing.assert_allclose(got, naive_attention(q, k, v), rtol=1e-5, atol=1e-6)
  assert f"attention '{implementation}' needs" in caplog.text and "using 'xla'" in caplog.text


def test_unknown_implementation_is_rejected():
  q, k, v = random_qkv()
  with pytest.raises(ValueError, match="unknown"):
    attention.dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="unknown"):
    Compute(attention="flash")


def test_splash_kernel_in_interpret_mode_equals_xla():
  q, k, v = random_qkv(q_len=128, kv_len=256, heads=2, head_dim=128, seed=1)
  got = attention.splash_attention(q, k, v, interpret=True)
  np.testing.assert_allclose(got, naive_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_long_keys_on_cpu_take_the_blocked_path_and_match_softmax_attention():
  q, k, v = random_qkv(q_len=40, kv_len=1100, heads=2, head_dim=8, seed=2)  # 3 key blocks, padded
  rng = np.random.default_rng(3)
  mask = rng.random((2, 1, 40, 1100)) > 0.3
  mask[0, 0, 5] = False  # a fully masked row: jax.nn averages all keys; so must we
  bias = rng.standard_normal((1, 2, 40, 1100)).astype(np.float32)
  assert k.shape[1] >= attention.CPU_BLOCKED_MIN_LENGTH
  got = attention.dot_product_attention(q, k, v, mask=mask, bias=bias)
  expected = jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="xla")
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6)
  unmasked = attention.blocked_attention(q, k, v)
  np.testing.assert_allclose(unmasked, naive_attention(q, k, v), rtol=1e-5, atol=2e-6)


def test_blocked_attention_gradients_match_softmax_attention():
  """The custom VJP (one key block at a time) gives jax.nn's gradients for q, k, v and a bias,
  with a mask and padded key blocks."""
  q, k, v = random_qkv(q_len=6, kv_len=300, heads=2, head_dim=8, seed=4)
  rng = np.random.default_rng(5)
  mask = rng.random((2, 1, 6, 300)) > 0.2
  bias = rng.standard_normal((1, 2, 6, 300)).astype(np.float32)
  weights = rng.standard_normal(q.shape).astype(np.float32)

  def loss(attend, q, k, v, bias):
    return (attend(q, k, v, bias) * weights).sum()

  blocked = lambda q, k, v, b: attention.blocked_attention(  # noqa: E731
      q, k, v, mask=mask, bias=b, block=128)
  reference = lambda q, k, v, b: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, mask=mask, bias=b)
  got = jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
  expected = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
