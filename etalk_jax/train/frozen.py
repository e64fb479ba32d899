"""The frozen encoders and the latent codec, built from their specs (folders, codec dicts,
audio feature fields): what the training stages (train/stages/common.py, from a config) and
`etalk precompute` (train/precompute.py, from its arguments) both load."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from etalk_jax import model_io
from etalk_jax.audio import FeatureConfig
from etalk_jax.codecs import codec_from_spec
from etalk_jax.errors import UserError
from etalk_jax.svd.codec import VAECodec
from etalk_jax.svd.params import load_vae
from etalk_jax.vision.params import ENCODERS_NAME, load_encoders, load_pdfgc
from etalk_jax.vision.pdfgc import AdaptedPDFGC


def feature_config(fields):
  """`FeatureConfig` from a config's audio_features dict (lists, as overrides give them, become
  tuples)."""
  return FeatureConfig(**{name: tuple(value) if isinstance(value, list) else value
                          for name, value in dict(fields).items()})


def vision_encoders_from_folder(folder, seed: int = 0):
  """The lip / expression encoders of a folder: `save_encoders`' (trained adapters), or a bare
  PD-FGC one wrapped with identity adapters (their output layers are zero-initialised, so `seed`
  does not change what they compute)."""
  record = model_io.read_config(folder).get("etalk_format", {})
  if record.get("model") == ENCODERS_NAME:
    return load_encoders(folder)
  trunk = load_pdfgc(folder)
  return AdaptedPDFGC(trunk.config, encoder=trunk, rngs=nnx.Rngs(seed))


def codec_weights_folder(spec: dict) -> Path | None:
  """The VAE folder a codec spec reads (DIR/vae when DIR holds one), None for weight-free codecs."""
  if spec.get("kind") != "vae":
    return None
  folder = Path(spec.get("folder", ""))
  return folder / "vae" if (folder / "vae").is_dir() else folder


def latent_codec_from_spec(spec: dict):
  """(codec, jitted encode) of a codec spec dict (what config.codec holds): {"kind":
  "pixel_shuffle", "factor": f}, {"kind": "patch_pca", "file": FILE} or {"kind": "vae",
  "folder": DIR} (a folder written by `etalk convert svd`, its vae/)."""
  spec = dict(spec)
  # Weight-free codecs; patch_pca as {"kind": "patch_pca", "file": codec.json}.
  if spec.get("kind") in ("pixel_shuffle", "patch_pca"):
    codec = codec_from_spec(spec)
    return codec, jax.jit(codec.encode)
  if spec.get("kind") == "vae":
    codec = VAECodec(load_vae(codec_weights_folder(spec)))
    graphdef, state = nnx.split(codec.vae)

    @jax.jit
    def encode(state, frames):
      return VAECodec(nnx.merge(graphdef, state)).encode(frames)

    return codec, lambda frames: encode(state, frames)
  raise UserError(f"config.codec.kind={spec.get('kind')!r}: use 'pixel_shuffle', 'patch_pca' "
                   "or 'vae'")
