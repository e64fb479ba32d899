"""Feature extraction for the metrics: a network's forward jitted once for a fixed batch, the batch
split over this host's devices (the weights replicated), applied to host arrays of any length.

Every chunk has the same shape (the last one is padded with zeros and its padding dropped), so
a whole evaluation compiles each network once, whatever the number of frames or videos.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class BatchedForward:
  """`forward(model, inputs)` over a host array's leading axis, `batch_size` rows per call.

  The batch is rounded up to a multiple of the local devices and split over them (data
  parallel); `model`'s state is put on every device once.
  """

  def __init__(self, model: nnx.Module, forward: Callable[[nnx.Module, Any], Any],
               batch_size: int):
    devices = jax.local_devices()
    self.batch_size = -(-max(int(batch_size), 1) // len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("batch",))
    self._rows = NamedSharding(mesh, PartitionSpec("batch"))
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    self._forward = jax.jit(lambda state, inputs: forward(nnx.merge(graphdef, state), inputs),
                            out_shardings=self._rows)

  def __call__(self, inputs: np.ndarray) -> np.ndarray:
    """forward of every row of `inputs` (n, ...) -> (n, ...) on the host, float32."""
    inputs = np.asarray(inputs)
    outputs = []
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      rows = len(chunk)
      if rows < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - rows,) + chunk.shape[1:],
                                                chunk.dtype)])
      result = self._forward(self._state, jax.device_put(chunk, self._rows))
      outputs.append(np.asarray(result, np.float32)[:rows])
    if not outputs:
      raise ValueError("no inputs")
    return np.concatenate(outputs)
