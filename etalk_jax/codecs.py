"""The latent codecs by kind, and the weight-free stand-ins for SVD's VAE.

`codec_from_spec` builds the codec a `pipeline.json` (or a training config's `config.codec`)
names: `{"kind": "vae"}` (SVD's VAE, weights in `vae/`: `etalk_jax.svd.codec.VAECodec`),
`{"kind": "pixel_shuffle", "factor": 4}` or `{"kind": "patch_pca", ...}` (or `{"kind":
"patch_pca", "file": codec.json}`, a fitted codec's spec in a file).

`PixelShuffleCodec` is an exact, weight-free stand-in: `factor`x`factor` pixel patches folded
into channels (space-to-depth), so a 64 px frame becomes a 16 x 16 x 48 latent and decodes back
exactly; its `scale` plays the VAE's scaling_factor (pixels in [-1, 1] have a std near 0.4 on
faces; x2 brings the latents near the unit variance EDM's preconditioning assumes).
`PatchPCACodec` projects those patches on their first principal components, fitted on training
frames: what the CPU demo trains on (`etalk demo` fits it on its dataset), because no pretrained
VAE can be downloaded there and a random-weight VAE would not reconstruct a face. Both encode the
reference as they encode the clip, without noise (see `etalk_jax.svd.codec`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np

from etalk_jax.errors import UserError
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.svd.codec import VAECodec, to_unit_range
from etalk_jax.svd.params import load_vae


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



def codec_from_spec(spec: dict[str, Any], folder: str | Path | None = None,
                    compute: Compute = FP32):
  """The codec a `pipeline.json` names; a VAE codec loads its weights from `folder/vae` and
  computes as `compute` says (the weight-free codecs ignore it)."""
  kind = spec.get("kind")
  if kind == "pixel_shuffle":
    return PixelShuffleCodec(int(spec.get("factor", 4)), float(spec.get("scale", 2.0)))
  if kind == "patch_pca":
    if "file" in spec:  # a JSON file holding this spec (what a training config names)
      spec = json.loads(Path(spec["file"]).read_text())
    return PatchPCACodec(int(spec["factor"]), np.asarray(spec["basis"], np.float32),
                         np.asarray(spec["mean"], np.float32), float(spec["scale"]))
  if kind == "vae":
    if folder is None:
      raise UserError("a VAE codec needs the checkpoint folder holding vae/")
    return VAECodec(load_vae(Path(folder) / "vae", compute),
                    int(spec.get("decode_chunk_frames", 14)))
  raise UserError(f"unknown latent codec {kind!r} in pipeline.json; use 'vae', "
                   f"'pixel_shuffle' or 'patch_pca'")
