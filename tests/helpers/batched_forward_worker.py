"""`evaluation.extract.BatchedForward` and SyncNet's scorer on 8 simulated CPU devices against a
plain forward.
Run by tests/evaluation/test_extract.py in a subprocess whose XLA_FLAGS ask for 8 host devices
(set before jax is imported); prints one JSON line."""

import json

import jax
import numpy as np
from flax import nnx

from etalk_jax.evaluation.extract import BatchedForward
from etalk_jax.evaluation.face3d import FACE3D_SMALL, Face3DRecon, expression_coefficients
from etalk_jax.evaluation.syncnet import (
  MFCC_PER_FRAME,
  MFCC_WINDOW,
  SYNCNET_SMALL,
  WINDOW_FRAMES,
  SyncNet,
  SyncNetScorer,
  syncnet_inputs,
)

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

  # SyncNet's windows: split over the devices by the scorer, against each window embedded on
  # its own by the plain network.
  rng = np.random.default_rng(1)
  size = SYNCNET_SMALL.image_size
  crops = rng.integers(0, 256, (30, size, size, 3), np.uint8)
  inputs = syncnet_inputs(crops, rng.normal(0, 0.1, 30 * 640).astype(np.float32))
  syncnet = SyncNet(SYNCNET_SMALL, rngs=nnx.Rngs(2))
  scorer = SyncNetScorer(syncnet, batch_size=3)
  lips, speech = scorer.features(inputs)
  video, mfccs, count = inputs
  lip_windows = np.stack([video[i:i + WINDOW_FRAMES] for i in range(count)])
  audio_windows = np.stack([mfccs[MFCC_PER_FRAME * i:MFCC_PER_FRAME * i + MFCC_WINDOW].T
                            for i in range(count)])[..., None]
  plain_lips = np.asarray(nnx.jit(lambda m, x: m.lip_embedding(x))(syncnet, lip_windows))
  plain_speech = np.asarray(nnx.jit(lambda m, x: m.audio_embedding(x))(syncnet, audio_windows))
  print(json.dumps({
      "devices": jax.device_count(), "batch_size": batched.batch_size,
      "compiles": len(SEEN), "shape": list(features.shape),
      "max_abs_difference": float(np.abs(features - plain).max()),
      "max_abs_value": float(np.abs(plain).max()),
      "sync_batch_size": scorer.batch_size, "sync_windows": int(count),
      "sync_difference": float(max(np.abs(lips - plain_lips).max(),
                                   np.abs(speech - plain_speech).max())),
      "sync_value": float(max(np.abs(plain_lips).max(), np.abs(plain_speech).max()))}))


if __name__ == "__main__":
  main()
