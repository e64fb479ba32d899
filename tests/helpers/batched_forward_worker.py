"""`evaluation.extract.BatchedForward` on 8 simulated CPU devices against a plain forward on one.
Run by tests/evaluation/test_extract.py in a subprocess whose XLA_FLAGS ask for 8 host devices
(set before jax is imported); prints one JSON line."""

import json

import jax
import numpy as np
from flax import nnx

from etalk_jax.evaluation.extract import BatchedForward
from etalk_jax.evaluation.face3d import FACE3D_SMALL, Face3DRecon, expression_coefficients

SEEN = []  # per-device input shapes, recorded while compiling


def main() -> None:
  model = Face3DRecon(FACE3D_SMALL, rngs=nnx.Rngs(0))
  size = FACE3D_SMALL.image_size
  faces = np.random.default_rng(0).uniform(0, 1, (11, size, size, 3)).astype(np.float32)

  def forward(model, images):
    SEEN.append(jax.typeof(images).shape)
    return expression_coefficients(model, images)

  batched = BatchedForward(model, forward, batch_size=3)  # rounded up to 8, one per device
  features = batched(faces)
  plain = np.asarray(nnx.jit(expression_coefficients)(model, faces))
  print(json.dumps({
      "devices": jax.device_count(), "batch_size": batched.batch_size,
      "compiles": len(SEEN), "shape": list(features.shape),
      "max_abs_difference": float(np.abs(features - plain).max()),
      "max_abs_value": float(np.abs(plain).max())}))


if __name__ == "__main__":
  main()
