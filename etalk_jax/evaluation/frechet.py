"""The Fréchet distance between two Gaussians fitted to feature sets: FID (Inception pool3),
FVD (I3D logits) and E-FID (expression coefficients) all end here.

d² = |mu1 - mu2|² + Tr(S1 + S2 - 2 (S1 S2)^½), in float64, as pytorch-fid's
`calculate_frechet_distance` computes it (src/pytorch_fid/fid_score.py, v0.3.0) and StyleGAN-V's
`compute_fvd` (src/metrics/frechet_video_distance.py) does for FVD: the covariance is numpy's
unbiased one (`np.cov(rowvar=False)`), the matrix square root scipy's `sqrtm` (called without
`disp`, deprecated since SciPy 1.16); when the product is
near singular, `eps` is added to both diagonals before the root (pytorch-fid's fix), and an
imaginary part left by round-off is dropped unless it is large (then the inputs are broken).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
from scipy import linalg

from etalk_jax.errors import UserError

log = logging.getLogger(__name__)

# pytorch-fid's defaults: the diagonal offset for a singular product, and the largest imaginary
# component of the root's diagonal that is still round-off.
SINGULAR_OFFSET = 1e-6
IMAGINARY_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class GaussianStatistics:
  """Mean and covariance of a feature set (float64), and how many samples they come from."""
  mean: np.ndarray  # (d,)
  covariance: np.ndarray  # (d, d)
  count: int

  @classmethod
  def of(cls, features: np.ndarray, what: str = "features") -> "GaussianStatistics":
    """Statistics of `features` (n, d); a covariance needs at least two samples."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f"{what}: expected (samples, dims), got shape {features.shape}")
    if features.shape[0] < 2:
      raise UserError(f"{what}: a Fréchet distance needs at least 2 samples, got "
                      f"{features.shape[0]}; evaluate more videos or frames.")
    return cls(mean=features.mean(axis=0), covariance=np.cov(features, rowvar=False),
               count=int(features.shape[0]))


def frechet_distance(first: GaussianStatistics, second: GaussianStatistics,
                     eps: float = SINGULAR_OFFSET) -> float:
  """The Fréchet distance between the Gaussians `first` and `second` (float64 throughout)."""
  mean_1, mean_2 = np.atleast_1d(first.mean), np.atleast_1d(second.mean)
  cov_1, cov_2 = np.atleast_2d(first.covariance), np.atleast_2d(second.covariance)
  if mean_1.shape != mean_2.shape or cov_1.shape != cov_2.shape:
    raise ValueError(f"statistics of different sizes: {mean_1.shape} vs {mean_2.shape}")
  difference = mean_1 - mean_2
  with warnings.catch_warnings():
    # SciPy warns of a singular product (fewer samples than dimensions is usual for FVD and
    # per-split FID); as pytorch-fid's disp=False, the result's finiteness decides instead.
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    root = linalg.sqrtm(cov_1.dot(cov_2))
  if not np.isfinite(root).all():
    # The product is (near) singular, typical when there are fewer samples than dimensions.
    log.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
    offset = np.eye(cov_1.shape[0]) * eps
    root = linalg.sqrtm((cov_1 + offset).dot(cov_2 + offset))
  if np.iscomplexobj(root):
    largest = np.max(np.abs(root.imag))
    if not np.allclose(np.diagonal(root).imag, 0, atol=IMAGINARY_TOLERANCE):
      raise ValueError(f"Fréchet distance: the covariance root has an imaginary part of {largest}")
    root = root.real
  return float(difference.dot(difference) + np.trace(cov_1) + np.trace(cov_2)
               - 2 * np.trace(root))


def frechet_distance_of_features(first: np.ndarray, second: np.ndarray) -> float:
  """The Fréchet distance between the Gaussians fitted to two feature sets (n, d) and (m, d)."""
  return frechet_distance(GaussianStatistics.of(first, "first feature set"),
                          GaussianStatistics.of(second, "second feature set"))
