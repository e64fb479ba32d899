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

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# Rematerialisation of a model's big blocks (the UNet's down / mid / up blocks): what the
# backward pass keeps of each block's forward. "none": everything (fastest, most memory);
# "blocks": only the block's inputs, the rest is recomputed; "blocks_save_dots": the block's
# matmul / conv outputs too (less recomputation, more memory).
REMAT_POLICIES = {
    "none": None,
    "blocks": jax.checkpoint_policies.nothing_saveable,
    "blocks_save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class Compute:
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"
  remat: str = "none"

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"attention implementation {self.attention!r} is unknown; choose one of "
          f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {self.remat!r} is unknown; choose one of "
                       f"{', '.join(REMAT_POLICIES)}")

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
  """`block(*args)`, rematerialised in the backward pass as the `remat` policy says."""
  if remat == "none":
    return block(*args)
  return nnx.remat(_call, policy=REMAT_POLICIES[remat])(block, *args)


FP32 = Compute()
