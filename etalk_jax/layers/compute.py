"""How a model computes: activation dtype, stored-weight dtype, attention implementation.

Passed to every block's constructor so that one object switches a whole model between fp32 on the
CPU (parity tests) and bf16 compute over fp32 master weights with flash attention on a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class Compute:
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"attention implementation {self.attention!r} is unknown; choose one of "
          f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")

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


FP32 = Compute()
