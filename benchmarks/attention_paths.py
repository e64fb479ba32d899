"""Blocked (online-softmax, flash-style VJP) vs plain softmax attention on this machine's backend:
forward and forward + backward time, interleaved medians, and the ratio.

  .venv/bin/python benchmarks/attention_paths.py             # the shapes below, fp32
  .venv/bin/python benchmarks/attention_paths.py --repeats 9

Shapes `(batch, length, heads, head_dim)`, self-attention:
  wav2vec2_60s   (1, 3000, 12, 64)  one layer of wav2vec2-base over a minute of speech
  ethd_64px      (16, 1024, 2, 32)   a 32² latent level, 16 frames
  ethd_512_frame (2, 4096, 5, 64)   ETHD's top spatial attention at 512², 2 of its 120 frames
Both paths are what `layers.attention.dot_product_attention` runs for implementation "xla":
"plain" is `jax.nn.dot_product_attention(implementation="xla")`, "blocked" is
`blocked_attention` with the backend's block (`attention.KEY_BLOCK`). The gradient is of
sum(out * w) for q, k, v. Each measurement is the median of `--repeats` calls after a warm-up,
plain and blocked interleaved so that a busy machine slows both alike.

Figures only: nothing is asserted.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from etalk_jax.layers import attention

from svd_compare import interleaved_medians  # benchmarks/ sibling

SHAPES = {
    "wav2vec2_60s": (1, 3000, 12, 64),
    "ethd_64px": (16, 1024, 2, 32),
    "ethd_512_frame": (2, 4096, 5, 64),
}


def plain(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def blocked(q, k, v):
  return attention.blocked_attention(q, k, v, block=attention.KEY_BLOCK[jax.default_backend()])


def with_gradient(attend):
  def loss(q, k, v, weights):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * weights)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def calls(functions: dict, args) -> dict:
  """Each function applied to `args` and blocked on: what `interleaved_medians` times."""
  def blocked_call(fn):
    return lambda: jax.block_until_ready(fn(*args))
  return {name: blocked_call(fn) for name, fn in functions.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  backend = jax.default_backend()
  print(f"backend {backend}, {args.dtype}, blocked with {attention.KEY_BLOCK[backend]} keys per "
        f"block; medians of {args.repeats} interleaved calls")
  print(f"{'shape':<16} {'plain fwd ms':>12} {'blocked fwd ms':>14} {'ratio':>6} "
        f"{'plain f+b ms':>12} {'blocked f+b ms':>14} {'ratio':>6}")
  rng = np.random.default_rng(0)
  for name in args.shapes:
    shape = SHAPES[name]
    q, k, v, weights = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
    forward = interleaved_medians(calls({"plain": jax.jit(plain), "blocked": jax.jit(blocked)},
                                        (q, k, v)), args.repeats)
    backward = interleaved_medians(calls({"plain": with_gradient(plain),
                                          "blocked": with_gradient(blocked)},
                                         (q, k, v, weights.astype(jnp.float32))), args.repeats)
    print(f"{name:<16} {forward['plain'] * 1e3:>12.1f} {forward['blocked'] * 1e3:>14.1f} "
          f"{forward['blocked'] / forward['plain']:>6.2f} {backward['plain'] * 1e3:>12.1f} "
          f"{backward['blocked'] * 1e3:>14.1f} {backward['blocked'] / backward['plain']:>6.2f}",
          flush=True)


if __name__ == "__main__":
  main()
