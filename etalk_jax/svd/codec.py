"""SVD's VAE as a latent codec: video frames <-> the latents ETHD denoises, and the pixel range
the codecs share (`to_unit_range`, `to_uint8`).

`VAECodec` is the real codec (docs/ARCHITECTURE.md §1): SVD's temporal VAE, posterior mode times
`scaling_factor` to encode, the temporal decoder in chunks to decode. The weight-free stand-ins
(pixel shuffle, patch PCA) and `codec_from_spec`, which builds any of them from `pipeline.json`'s
codec record, are in `etalk_jax.codecs`. Every codec takes uint8 or [-1, 1] float frames
`(frames, H, W, 3)` and gives float32 latents `(frames, H / f, W / f, channels)`.

Two encodings per codec: `encode` gives the latents the diffusion denoises (the clip's frames:
for the VAE the posterior mode times `scaling_factor`, SVD's training target), and
`encode_reference` gives what is concatenated beside them on the channels (the reference frame).
For the VAE that is SVD's image conditioning exactly (docs/ARCHITECTURE.md §3.12): the *unscaled*
posterior mode of the frame after `noise_aug_strength x noise` is added in pixel space ([-1, 1]),
as diffusers' `StableVideoDiffusionPipeline` makes it; the strength is the one the added time ids
announce (`ETHDConfig.noise_aug_strength`). Callers draw `noise` (standard normal, the frames'
shape) from their RNG: training from the step's key, inference from the seed
(`reference_noise`). The weight-free codecs keep their own convention: the reference is encoded
as the clip is, without noise (a model trained from scratch on them needs nothing else).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etalk_jax.svd.vae import TemporalVAE, decode_in_chunks


def to_unit_range(frames: Any) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1], in XLA; float input is taken as already in [-1, 1].
  (Host batches of uint8 pixels: `etalk_jax.vaid.data.unit_range_on_host`.)"""
  frames = jnp.asarray(frames)
  if frames.dtype == jnp.uint8:
    return frames.astype(jnp.float32) / 127.5 - 1.0
  return frames.astype(jnp.float32)


def reference_noise(key: jax.Array, frames: Any) -> jax.Array:
  """Standard normal pixel noise of `frames`' shape `(..., H, W, 3)`: the noise `encode_reference`
  augments a reference frame with, drawn from `key`."""
  return jax.random.normal(key, jnp.shape(frames), jnp.float32)


def to_uint8(frames: Any) -> np.ndarray:
  """[-1, 1] float frames -> uint8 pixels (clipped, rounded)."""
  return np.asarray(jnp.clip(jnp.round((jnp.asarray(frames) + 1.0) * 127.5), 0, 255), np.uint8)


@dataclasses.dataclass(frozen=True)
class VAECodec:
  """SVD's temporal VAE: `encode` for the clip (scaled mode), `encode_reference` for the
  conditioning frame (unscaled mode of the noise-augmented frame, as SVD's pipeline)."""
  vae: TemporalVAE
  decode_chunk_frames: int = 14  # frames decoded as one clip (diffusers' decode_chunk_size)

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def latent_channels(self) -> int:
    return self.vae.config.latent_channels

  def spec(self) -> dict[str, Any]:
    return {"kind": "vae", "decode_chunk_frames": self.decode_chunk_frames}

  def encode(self, frames: Any) -> jax.Array:
    """Frames `(frames, H, W, 3)` -> the posterior's mode times `scaling_factor`: the latents
    SVD denoises (its training targets)."""
    return self.vae.encode(to_unit_range(frames)).mode() * self.vae.config.scaling_factor

  def encode_reference(self, frames: Any, noise: Any, noise_aug_strength: float) -> jax.Array:
    """Conditioning frames `(n, H, W, 3)` -> SVD's image latents: the posterior's mode, NOT
    scaled, of `frames + noise_aug_strength * noise` in [-1, 1] pixels (diffusers'
    `_encode_vae_image(image + noise_aug_strength * randn)`); `noise` standard normal of the
    frames' shape (`reference_noise`)."""
    pixels = to_unit_range(frames)
    noisy = pixels + noise_aug_strength * jnp.asarray(noise, jnp.float32)
    return self.vae.encode(noisy).mode()

  def decode(self, latents: Any) -> jax.Array:
    latents = jnp.asarray(latents, jnp.float32) / self.vae.config.scaling_factor
    return decode_in_chunks(self.vae, latents, self.decode_chunk_frames)
