"""Latent codecs (etalk_jax/codecs.py, etalk_jax/svd/codec.py): pixel shuffle is exact; patch PCA
is exact at full rank, close with few channels, and survives its JSON spec (inline or in a file);
the reference latent is SVD's conditioning for the VAE and the plain encoding for the weight-free
codecs."""

import json

import jax
import numpy as np
import torch

from data_pipeline import synthetic
from etalk_jax.codecs import PatchPCACodec, PixelShuffleCodec, codec_from_spec
from etalk_jax.svd.codec import VAECodec, reference_noise, to_uint8
from etalk_jax.svd.params import vae_from_diffusers
from tests.helpers.svd_reference import VAE_TINY, make_vae, relative_error


def _frames() -> np.ndarray:
  return synthetic.make_clip(synthetic.make_identity(0), "happy", 3, 16, 64).frames


def test_pixel_shuffle_round_trip_is_exact():
  frames = _frames()
  codec = PixelShuffleCodec(4, 2.0)
  latents = codec.encode(frames)
  assert latents.shape == (16, 16, 16, 48)
  np.testing.assert_array_equal(to_uint8(codec.decode(latents)), frames)


def test_patch_pca_fits_few_channels_and_round_trips_its_spec(tmp_path):
  frames = _frames()
  pixels = frames.astype(np.float32) / 127.5 - 1
  full = PatchPCACodec.fit(frames, 48)
  np.testing.assert_allclose(np.asarray(full.decode(full.encode(frames))), pixels, atol=1e-4)
  small = PatchPCACodec.fit(frames, 12)
  latents = np.asarray(small.encode(frames))
  assert latents.shape == (16, 16, 16, 12) and small.latent_channels == 12
  assert abs(float(latents.std()) - 1.0) < 0.05  # scaled to unit variance, as EDM assumes
  error = np.sqrt(np.mean((np.asarray(small.decode(latents)) - pixels) ** 2)) * 127.5
  assert error < 8.0, error  # grey levels
  (tmp_path / "codec.json").write_text(json.dumps(small.spec()))
  for spec in (small.spec(), {"kind": "patch_pca", "file": str(tmp_path / "codec.json")}):
    again = codec_from_spec(json.loads(json.dumps(spec)))
    np.testing.assert_allclose(np.asarray(again.encode(frames)), latents, atol=1e-5)


def test_weight_free_codecs_encode_the_reference_as_the_clip():
  """The demo's convention, unchanged: no noise augmentation, the same latents as `encode`."""
  frames = _frames()[:2]
  noise = np.ones(frames.shape, np.float32)
  for codec in (PixelShuffleCodec(4, 2.0), PatchPCACodec.fit(frames, 12)):
    np.testing.assert_array_equal(np.asarray(codec.encode_reference(frames, noise, 0.02)),
                                  np.asarray(codec.encode(frames)))


def test_vae_reference_is_svds_unscaled_mode_of_the_noise_augmented_frame():
  """diffusers' `StableVideoDiffusionPipeline._encode_vae_image(image + 0.02 * noise)`: the
  posterior mode of the augmented frame, not times scaling_factor."""
  frames = _frames()[:2, ::4, ::4]  # 16 px
  vae = make_vae(VAE_TINY)
  codec = VAECodec(vae_from_diffusers(vae))
  noise = np.asarray(reference_noise(jax.random.key(3), frames))
  assert noise.shape == frames.shape and abs(float(noise.std()) - 1.0) < 0.1
  ours = codec.encode_reference(frames, noise, 0.02)
  pixels = torch.from_numpy(frames.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
  with torch.no_grad():
    theirs = vae.encode(pixels + 0.02 * torch.from_numpy(noise).permute(0, 3, 1, 2)
                        ).latent_dist.mode().permute(0, 2, 3, 1).numpy()
  assert relative_error(ours, theirs) < 1e-5
  # encode (the clip's latents) stays SVD's scaled, un-noised mode.
  scaled = np.asarray(codec.encode(frames)) / vae.config.scaling_factor
  assert relative_error(codec.encode_reference(frames, 0 * noise, 0.02), scaled) < 1e-5
