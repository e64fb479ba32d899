"""Latent codecs (etalk_jax/svd/codec.py): pixel shuffle is exact; patch PCA is exact at full
rank, close with few channels, and survives its JSON spec (inline or in a file)."""

import json

import numpy as np

from data_pipeline import synthetic
from etalk_jax.svd.codec import PatchPCACodec, PixelShuffleCodec, codec_from_spec, to_uint8


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
