"""The Fréchet distance (FID, FVD, E-FID) against pytorch-fid's and StyleGAN-V's arithmetic on
the same features, and the protocol's pairing and padding."""

from __future__ import annotations

import numpy as np
import pytest

from etalk_jax.errors import UserError
from etalk_jax.evaluation.frechet import (
  GaussianStatistics,
  frechet_distance,
  frechet_distance_of_features,
)
from etalk_jax.evaluation.protocol import PROTOCOLS, pad_frames, pair_videos
from tests.helpers.frechet_reference import (
  calculate_activation_statistics_of,
  calculate_frechet_distance,
  compute_fvd,
)


def _features(seed: int, count: int, dims: int, shift: float) -> np.ndarray:
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(dims, dims)) / np.sqrt(dims)
  return (rng.normal(size=(count, dims)) @ mixing + shift).astype(np.float32)


@pytest.mark.parametrize("count, dims", [(300, 64), (40, 64), (12, 400)])
def test_equals_pytorch_fid_and_stylegan_v(count, dims):
  """More samples than dimensions, fewer (a singular covariance: FVD over a few videos)."""
  generated, real = _features(0, count, dims, 0.3), _features(1, count + 5, dims, 0.0)
  ours = frechet_distance_of_features(generated, real)
  mu1, sigma1 = calculate_activation_statistics_of(generated.astype(np.float64))
  mu2, sigma2 = calculate_activation_statistics_of(real.astype(np.float64))
  np.testing.assert_allclose(ours, calculate_frechet_distance(mu1, sigma1, mu2, sigma2),
                             rtol=1e-9)
  np.testing.assert_allclose(ours, compute_fvd(generated, real), rtol=1e-6)
  assert ours > 1.0
  assert abs(frechet_distance_of_features(real, real)) < 1e-6 * ours


def test_statistics_and_errors():
  features = _features(2, 50, 8, 1.0)
  statistics = GaussianStatistics.of(features)
  np.testing.assert_allclose(statistics.covariance, np.cov(features.astype(np.float64),
                                                           rowvar=False))
  assert statistics.count == 50 and statistics.mean.dtype == np.float64
  with pytest.raises(UserError, match="at least 2 samples"):
    GaussianStatistics.of(features[:1])
  with pytest.raises(ValueError, match="different sizes"):
    frechet_distance(statistics, GaussianStatistics.of(features[:, :4]))


def test_protocols_pairing_and_padding(tmp_path):
  hdtf, mead = PROTOCOLS["hdtf"], PROTOCOLS["mead"]
  assert (hdtf.frames, hdtf.fvd_frames, mead.frames, mead.fvd_frames) == (144, 128, 76, 72)
  # MEAD: a 60-frame clip is driven by 76 frames of speech (zero-padded, §7.1) and cut to 60.
  assert (mead.driving_frames(60), mead.trim(60), mead.driving_frames(200), mead.trim(200)) == (
      76, 60, 76, 76)
  frames = np.ones((5, 2, 2, 3), np.uint8)
  padded, was_padded = pad_frames(frames, 8)
  assert was_padded and padded.shape == (8, 2, 2, 3) and not padded[5:].any()
  assert pad_frames(frames, 3)[0].shape == (3, 2, 2, 3) and not pad_frames(frames, 3)[1]

  generated, reference = tmp_path / "generated", tmp_path / "reference"
  generated.mkdir()
  reference.mkdir()
  for name in ("a.mp4", "b.mp4"):
    (generated / name).write_bytes(b"")
    (reference / name).write_bytes(b"")
  (reference / "notes.txt").write_text("not a video")
  assert [name for name, _, _ in pair_videos(generated, reference)] == ["a", "b"]
  (generated / "c.mov").write_bytes(b"")
  with pytest.raises(UserError, match="generated without ground truth: c"):
    pair_videos(generated, reference)
  with pytest.raises(UserError, match="holds no videos"):
    pair_videos(generated, tmp_path)
