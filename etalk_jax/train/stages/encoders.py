"""Stage `encoders`: the lip and expression adapters, pre-trained by self-driven dropout image
reconstruction (docs/ARCHITECTURE.md §2, §3.9) with an ETHD as the renderer that trains beside
them.

Data: loader windows (frames, reference, face / lip masks) -> latents through the latent codec
on the host (the video's as the renderer's diffusion target, `ETHDConfig.to_target`; the
reference's by `encode_reference`, SVD's noise-augmented conditioning for the VAE, its noise from
the step's key). Loss:
`etalk_jax.ethd.objective.encoder_reconstruction_loss` (per sample: drop l_v, drop e_v, or keep
both; the loss inside the face mask, the lip mask or the whole frame). The loss masks are every
driving frame's own (from its landmarks, area-downsampled to the latent grid on the host), not
the reference's: the head moves within a window, and a reference-frame mouth region would score
cheek and miss lips. EDI's face mask stays the reference's, as at inference. The reference comes
from the window's own clip (`config.data.cross_clip_reference` 0): the reconstruction is
self-driven. Only the adapters and the
renderer train; the PD-FGC trunk stays frozen.
Export: export/encoders (`vision.params.load_encoders`) and export/renderer (`load_ethd`), which
the ETHD stage may start from (`--config.ethd.init=ethd:<workdir>/export/renderer`).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from etalk_jax.ethd.model import save_ethd
from etalk_jax.ethd.objective import ReconstructionConfig, encoder_reconstruction_loss
from etalk_jax.train.loop import Task
from etalk_jax.train.stages import common
from etalk_jax.vision.alignment import pdfgc_inputs
from etalk_jax.vision.params import save_encoders
from etalk_jax.vision.pdfgc import ADAPTER_PARAMS


class EncodersWithRenderer(nnx.Module):
  """The two trained parts of this stage under one root, so one optimizer sees both."""

  def __init__(self, encoders, renderer):
    self.encoders = encoders
    self.renderer = renderer


TRAINABLE = nnx.Any(ADAPTER_PARAMS, nnx.All(nnx.Param, nnx.PathContains("renderer")))


def encoder_inputs(frames: jnp.ndarray, landmarks: jnp.ndarray, size: int) -> jnp.ndarray:
  """uint8 frames `(..., R, R, 3)` and each frame's own landmarks `(..., 478, 2)` in [0, 1] crop
  coordinates (the loader's) -> the encoders' [-1, 1] input at `size` pixels: PD-FGC's alignment
  and crop (`pdfgc_inputs`), on device inside the step."""
  return pdfgc_inputs(frames, landmarks * frames.shape[-2], size)


def make_task(config, mesh) -> Task:
  common.require_ethd_init(config)
  encoders = common.vision_encoders(config)
  size = encoders.config.image_size
  lip_of_frames = nnx.jit(lambda encoders, frames: encoders(frames).lip)
  lip_stats = common.measure_lip_statistics(  # l_v of the untrained adapters
      config, lambda batch: lip_of_frames(
          encoders, encoder_inputs(batch["frames"].reshape((-1,) + batch["frames"].shape[2:]),
                                   batch["landmarks"].reshape((-1,) + batch["landmarks"].shape[2:]),
                                   size)))
  renderer = common.build_ethd(config, mesh, encoders.config.feature_dim,
                               encoders.config.expression_dim, lip_stats)
  model = EncodersWithRenderer(encoders, renderer)
  codec, encode = common.latent_codec(config)
  # The reference as SVD conditions on it, augmented as the renderer's added time ids announce.
  encode_reference = common.reference_encoder(codec, renderer.ethd_config.noise_aug_strength)
  options = ReconstructionConfig(
      mode_probabilities=tuple(config.mode_probabilities),
      **{name: float(value) for name, value in dict(config.sigma).items()})

  def featurize(batch, key):
    reference_latents = np.asarray(encode_reference(batch["reference"], key))
    latents = common.encode_video(encode, batch["frames"])
    height, width = latents.shape[2:4]
    return {"latents": renderer.ethd_config.to_target(latents, reference_latents[:, None]),
            "reference_latents": reference_latents,
            "frames": batch["frames"], "reference": batch["reference"],
            "landmarks": batch["landmarks"], "reference_landmarks": batch["reference_landmarks"],
            "face_mask": batch["face_mask"], "lip_mask": batch["lip_mask"],
            "frame_face_mask": common.masks_on_grid(batch["frame_face_mask"], height, width),
            "frame_lip_mask": common.masks_on_grid(batch["frame_lip_mask"], height, width)}

  def loss(model, batch, key):
    value, info = encoder_reconstruction_loss(
        model.encoders, model.renderer, batch["latents"], batch["reference_latents"],
        encoder_inputs(batch["frames"], batch["landmarks"], size),
        encoder_inputs(batch["reference"], batch["reference_landmarks"], size),
        batch["face_mask"], batch["lip_mask"], key, config=options,
        loss_masks=(batch["frame_face_mask"], batch["frame_lip_mask"]))
    return value, {"sigma_mean": jnp.mean(info["sigma"])}

  def export(model, folder: Path):
    save_encoders(model.encoders, Path(folder) / "encoders", overwrite=True)
    save_ethd(model.renderer, Path(folder) / "renderer", overwrite=True)

  return Task(name="encoders", model=model, trainable=TRAINABLE, loss=loss,
              batches=common.loader_iterator(config, frame_masks=True), featurize=featurize,
              held_out=lambda: common.loader_iterator(common.held_out_config(config),
                                                      frame_masks=True),
              featurize_key=True, export=export, batch_size=int(config.data.batch_size))
