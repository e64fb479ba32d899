"""Latent codecs: video frames <-> the latents ETHD denoises.

`VAECodec` is the real one (ARCHITECTURE.md §1): SVD's temporal VAE, posterior mode times
`scaling_factor` to encode, the temporal decoder in chunks to decode. `PixelShuffleCodec` is an
exact, weight-free stand-in: `factor`x`factor` pixel patches folded into channels
(space-to-depth), so a 64 px frame becomes a 16 x 16 x 48 latent and decodes back exactly; its
`scale` plays the VAE's scaling_factor (pixels in [-1, 1] have a std near 0.4 on faces; x2 brings
the latents near the unit variance EDM's preconditioning assumes).
It is what the CPU demo trains on, because no pretrained VAE can be downloaded there and a
random-weight VAE would not reconstruct a face. Both take uint8 or [-1, 1] float frames
`(frames, H, W, 3)` and give float32 latents `(frames, H / f, W / f, channels)`.

Two encodings per codec: `encode` gives the latents the diffusion denoises (the clip's frames:
for the VAE the posterior mode times `scaling_factor`, SVD's training target), and
`encode_reference` gives what is concatenated beside them on the channels (the reference frame).
For the VAE that is SVD's image conditioning exactly (ARCHITECTURE.md §3.12): the *unscaled*
posterior mode of the frame after `noise_aug_strength x noise` is added in pixel space ([-1, 1]),
as diffusers' `StableVideoDiffusionPipeline` makes it; the strength is the one the added time ids
announce (`ETHDConfig.noise_aug_strength`). Callers draw `noise` (standard normal, the frames'
shape) from their RNG: training from the step's key, inference from the seed
(`reference_noise`). The weight-free codecs keep their own convention: the reference is encoded
as the clip is, without noise (a model trained from scratch on them needs nothing else).

The pipeline's `pipeline.json` names the codec as `{"kind": "vae"}` (weights in `vae/`) or
`{"kind": "pixel_shuffle", "factor": 4}`; `codec_from_spec` builds either.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np

from etalk_jax.errors import UserError
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.svd.vae import TemporalVAE, decode_in_chunks


def to_unit_range(frames: Any) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1]; float input is taken as already in [-1, 1]."""
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
class PixelShuffleCodec:
  """Space-to-depth times `scale` (see the module docstring). The reference latent is the frame's
  `encode`, un-noised: `encode_reference` ignores the noise (the demo's convention, unchanged)."""
  factor: int = 4
  scale: float = 2.0

  @property
  def downsample(self) -> int:
    return self.factor

  @property
  def latent_channels(self) -> int:
    return 3 * self.factor ** 2

  def spec(self) -> dict[str, Any]:
    return {"kind": "pixel_shuffle", "factor": self.factor, "scale": self.scale}

  def encode(self, frames: Any) -> jax.Array:
    pixels = to_unit_range(frames)
    height, width = pixels.shape[-3:-1]
    if height % self.factor or width % self.factor:
      raise UserError(f"frames of {height}x{width} pixels do not fold into {self.factor}x"
                      f"{self.factor} patches; use a resolution divisible by {self.factor}")
    return self.scale * einops.rearrange(pixels, "... (h p) (w q) c -> ... h w (p q c)",
                                         p=self.factor, q=self.factor)

  def encode_reference(self, frames: Any, noise: Any = None, noise_aug_strength: float = 0.0
                       ) -> jax.Array:
    """The reference latent: `encode(frames)`; `noise` and its strength are not used."""
    del noise, noise_aug_strength
    return self.encode(frames)

  def decode(self, latents: Any) -> jax.Array:
    return einops.rearrange(jnp.asarray(latents, jnp.float32) / self.scale,
                            "... h w (p q c) -> ... (h p) (w q) c", p=self.factor, q=self.factor)


@dataclasses.dataclass(frozen=True, eq=False)
class PatchPCACodec:
  """`factor`x`factor` patches projected on their first principal components (fitted on training
  frames by `fit`), divided by `scale` (the components' std): a linear autoencoder with few
  latent channels, as SVD's VAE has 4, so that a narrow UNet can model the noise of every
  channel (pixel shuffle's 48 channels outnumber a 32-wide UNet's features)."""
  factor: int
  basis: np.ndarray  # (channels, 3 factor²) orthonormal rows
  mean: np.ndarray  # (3 factor²,)
  scale: float

  @classmethod
  def fit(cls, frames: np.ndarray, channels: int, factor: int = 4) -> "PatchPCACodec":
    patches = np.asarray(PixelShuffleCodec(factor, 1.0).encode(frames)).reshape(-1,
                                                                               3 * factor ** 2)
    mean = patches.mean(axis=0)
    _, _, components = np.linalg.svd(patches - mean, full_matrices=False)
    basis = components[:channels].astype(np.float32)
    scale = float(((patches - mean) @ basis.T).std())
    return cls(factor, basis, mean.astype(np.float32), scale)

  @property
  def downsample(self) -> int:
    return self.factor

  @property
  def latent_channels(self) -> int:
    return int(self.basis.shape[0])

  def spec(self) -> dict[str, Any]:
    return {"kind": "patch_pca", "factor": self.factor, "scale": self.scale,
            "basis": self.basis.tolist(), "mean": self.mean.tolist()}

  def encode(self, frames: Any) -> jax.Array:
    patches = PixelShuffleCodec(self.factor, 1.0).encode(frames)
    return (patches - jnp.asarray(self.mean)) @ jnp.asarray(self.basis).T / self.scale

  def encode_reference(self, frames: Any, noise: Any = None, noise_aug_strength: float = 0.0
                       ) -> jax.Array:
    """The reference latent: `encode(frames)`; `noise` and its strength are not used."""
    del noise, noise_aug_strength
    return self.encode(frames)

  def decode(self, latents: Any) -> jax.Array:
    patches = jnp.asarray(latents, jnp.float32) * self.scale @ jnp.asarray(self.basis)
    return PixelShuffleCodec(self.factor, 1.0).decode(patches + jnp.asarray(self.mean))


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


def codec_from_spec(spec: dict[str, Any], folder: str | Path | None = None,
                    compute: Compute = FP32):
  """The codec a `pipeline.json` names; a VAE codec loads its weights from `folder/vae` and
  computes as `compute` says (the weight-free codecs ignore it)."""
  kind = spec.get("kind")
  if kind == "pixel_shuffle":
    return PixelShuffleCodec(int(spec.get("factor", 4)), float(spec.get("scale", 2.0)))
  if kind == "patch_pca":
    if "file" in spec:  # a JSON file holding this spec (what a training config names)
      import json  # noqa: PLC0415
      spec = json.loads(Path(spec["file"]).read_text())
    return PatchPCACodec(int(spec["factor"]), np.asarray(spec["basis"], np.float32),
                         np.asarray(spec["mean"], np.float32), float(spec["scale"]))
  if kind == "vae":
    if folder is None:
      raise UserError("a VAE codec needs the checkpoint folder holding vae/")
    from etalk_jax.svd.params import load_vae  # noqa: PLC0415
    return VAECodec(load_vae(Path(folder) / "vae", compute),
                    int(spec.get("decode_chunk_frames", 14)))
  raise UserError(f"unknown latent codec {kind!r} in pipeline.json; use 'vae', "
                  f"'pixel_shuffle' or 'patch_pca'")
