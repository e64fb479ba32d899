"""How a model computes: activation dtype, stored-weight dtype, attention implementation.

Passed to every block's constructor so that one object switches a whole model between fp32 on the
CPU (parity tests) and bf16 compute over fp32 master weights with flash attention on a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax.errors import UserError

# "auto": the best implementation of the backend a call runs on (cuDNN flash attention on a GPU,
# splash on a TPU, XLA on the CPU), each call falling back where its shapes do not fit;
# "xla": XLA's own ops on every backend (blocked online-softmax for long key sequences).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# Rematerialisation: what the backward pass keeps of the forward. "none": everything (fastest,
# most memory); "blocks": only the inputs of each of the UNet's big blocks (down / mid / up),
# the rest is recomputed; "blocks_save_dots": those inputs and the blocks' matmul / conv
# outputs (less recomputation, more memory); "layers": only the inputs of each res block and
# each transformer inside those blocks, so the backward pass holds one layer's internals at a
# time (long clips: 120 frames at 512²).
REMAT_POLICIES = {
    "none": None,
    "blocks": jax.checkpoint_policies.nothing_saveable,
    "blocks_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "layers": jax.checkpoint_policies.nothing_saveable,
}
BLOCK_REMAT = ("blocks", "blocks_save_dots")
LAYER_REMAT = ("layers",)


@dataclasses.dataclass(frozen=True)
class Compute:
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise UserError(
          f"attention implementation {self.attention!r} is unknown; choose one of "
          f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"remat policy {self.remat!r} is unknown; choose one of "
                      f"{', '.join(REMAT_POLICIES)}")

  @classmethod
  def bf16(cls, attention: str = "auto") -> "Compute":
    """bf16 compute over fp32 master weights with `attention` (default: the backend's best)."""
    return cls(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention=attention)

  @classmethod
  def gpu(cls) -> "Compute":
    """bf16 compute, fp32 master weights, cuDNN flash attention."""
    return cls(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention="cudnn")

  @classmethod
  def tpu(cls) -> "Compute":
    """bf16 compute, fp32 master weights, Pallas splash attention."""
    return cls(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention="splash")

  def dense_kwargs(self) -> dict:
    return {"dtype": self.dtype, "param_dtype": self.param_dtype}


def _call(block, *args):
  return block(*args)


def call_block(remat: str, block: nnx.Module, *args) -> Any:
  """`block(*args)` for one of a model's big blocks, rematerialised in the backward pass where
  the `remat` policy works at block granularity."""
  if remat not in BLOCK_REMAT:
    return block(*args)
  return nnx.remat(_call, policy=REMAT_POLICIES[remat])(block, *args)


def call_layer(remat: str, layer: nnx.Module, *args, call=_call) -> Any:
  """`call(layer, *args)` (default `layer(*args)`) for a layer inside a big block,
  rematerialised where the policy works at layer granularity. `call` closes over what is not
  an array (frame counts, keyword inputs)."""
  if remat not in LAYER_REMAT:
    return call(layer, *args)
  return nnx.remat(call, policy=REMAT_POLICIES[remat])(layer, *args)


FP32 = Compute()
