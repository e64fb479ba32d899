"""The Fréchet distance as the metric repositories compute it, for the arithmetic's parity test.

Written from reading pytorch-fid (mseitzer/pytorch-fid, src/pytorch_fid/fid_score.py, v0.3.0:
`calculate_activation_statistics`' mean / covariance and `calculate_frechet_distance`) and
StyleGAN-V (universome/stylegan-v, src/metrics/frechet_video_distance.py: `compute_stats`,
`compute_fvd`), with their names. Both call `scipy.linalg.sqrtm(..., disp=False)`; SciPy 1.16
deprecated `disp`, so the root is taken without it (the same value). pytorch-fid itself cannot be
imported here: its package imports torchvision, whose wheel needs CUDA libraries.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


def calculate_activation_statistics_of(act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mu = np.mean(act, axis=0)
  sigma = np.cov(act, rowvar=False)
  return mu, sigma


def calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  tr_covmean = np.trace(covmean)
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


def compute_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  feats = feats.astype(np.float64)
  mu = feats.mean(axis=0)
  sigma = np.cov(feats, rowvar=False)
  return mu, sigma


def compute_fvd(feats_fake: np.ndarray, feats_real: np.ndarray) -> float:
  mu_gen, sigma_gen = compute_stats(feats_fake)
  mu_real, sigma_real = compute_stats(feats_real)
  m = np.square(mu_gen - mu_real).sum()
  s = linalg.sqrtm(np.dot(sigma_gen, sigma_real))
  fid = np.real(m + np.trace(sigma_gen + sigma_real - s * 2))
  return float(fid)
