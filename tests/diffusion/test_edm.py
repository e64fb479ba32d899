"""EDM objective: preconditioning against diffusers' SVD scheduler, sigma sampling, loss weighting,
condition dropout and the expression choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from etalk_jax.diffusion import edm
from tests.helpers.svd_reference import svd_scheduler


def test_preconditioning_matches_diffusers_step():
  scheduler = svd_scheduler()
  scheduler.set_timesteps(6)
  rng = np.random.default_rng(0)
  for index, t in enumerate(scheduler.timesteps):
    sigma = float(scheduler.sigmas[index])
    noisy = rng.standard_normal((1, 2, 3, 3, 4), np.float32) * np.float32(sigma)
    output = rng.standard_normal(noisy.shape, np.float32)
    reference = scheduler.step(torch.from_numpy(output), t, torch.from_numpy(noisy))
    denoised = edm.denoised_from_v(jnp.asarray(output), jnp.asarray(noisy), sigma)
    np.testing.assert_allclose(denoised, reference.pred_original_sample.numpy(), rtol=1e-5,
                               atol=1e-5)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
    np.testing.assert_allclose(c_out * output + c_skip * noisy, denoised, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_noise, t.item(), rtol=1e-6, atol=1e-7)


def test_denoise_and_v_target_invert_each_other():
  clean = jax.random.normal(jax.random.key(0), (3, 2, 4, 4, 4))
  noise = jax.random.normal(jax.random.key(1), clean.shape)
  sigma = jnp.array([0.01, 1.0, 80.0])
  noisy = clean + sigma[:, None, None, None, None] * noise
  target = edm.v_target(clean, noise, sigma)
  seen = {}

  def oracle(scaled, c_noise, extra):
    seen["scaled"], seen["c_noise"], seen["extra"] = scaled, c_noise, extra
    return target

  denoised = edm.denoise(oracle, noisy, sigma, "context")
  np.testing.assert_allclose(denoised, clean, atol=2e-5)
  np.testing.assert_allclose(seen["scaled"], noisy / np.sqrt(sigma**2 + 1)[:, None, None, None,
                                                                            None], rtol=1e-6)
  np.testing.assert_allclose(seen["c_noise"], 0.25 * np.log(sigma), rtol=1e-6)
  assert seen["extra"] == "context"


def test_log_normal_sigmas():
  sigmas = edm.sample_sigmas(jax.random.key(0), (200_000,))
  log_sigma = np.log(np.asarray(sigmas))
  assert abs(log_sigma.mean() - 0.7) < 0.02 and abs(log_sigma.std() - 1.6) < 0.02


def test_weighted_loss_with_lip_mask():
  rng = np.random.default_rng(0)
  denoised = rng.standard_normal((2, 2, 4, 4, 4), np.float32)
  clean = rng.standard_normal(denoised.shape, np.float32)
  sigma = np.array([0.5, 3.0], np.float32)
  mask = np.zeros((2, 2, 4, 4, 1), np.float32)
  mask[:, :, 1:3, 1:3] = 1
  weight = ((sigma**2 + 1) / sigma**2)[:, None, None, None, None]
  expected = np.mean(weight * (1 + 2.0 * mask) * (denoised - clean) ** 2)
  got = edm.weighted_loss(denoised, clean, sigma, lip_mask=mask, lip_weight=2.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  plain = np.mean(weight * (denoised - clean) ** 2)
  np.testing.assert_allclose(edm.weighted_loss(denoised, clean, sigma, lip_mask=mask), plain,
                             rtol=1e-5)


def test_denoising_loss_is_jittable_and_differentiable():
  clean = jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 4))

  @jax.jit
  def loss(scale, key):
    return edm.denoising_loss(lambda x, c_noise: scale * x, clean, key, p_mean=0.7, p_std=1.6)

  value, grad = jax.value_and_grad(loss)(jnp.float32(0.3), jax.random.key(1))
  assert np.isfinite(value) and np.isfinite(grad) and grad != 0
  # Same key, same loss; the pieces recombined by hand agree.
  sigma_key, noise_key = jax.random.split(jax.random.key(1))
  sigma = edm.sample_sigmas(sigma_key, (2,))
  noisy = clean + sigma[:, None, None, None, None] * jax.random.normal(noise_key, clean.shape)
  by_hand = edm.weighted_loss(edm.denoise(lambda x, c: 0.3 * x, noisy, sigma), clean, sigma)
  np.testing.assert_allclose(value, by_hand, rtol=1e-5)


def test_condition_dropout():
  batch = 20_000
  conditions = {"lip": jnp.ones((batch, 3, 5)), "expression": jnp.ones((batch, 3)),
                "reference": jnp.ones((batch, 1, 2, 2, 4)), "time_ids": jnp.ones((batch, 3))}
  probabilities = dict(edm.EDMTrainingConfig().dropout)
  drop = jax.jit(lambda key, values: edm.drop_conditions(key, values, probabilities))
  dropped, keep = drop(jax.random.key(0), conditions)
  for name in ("lip", "expression", "reference"):
    assert abs(1 - float(keep[name].mean()) - 0.05) < 0.006
    kept = np.asarray(keep[name])
    values = np.asarray(dropped[name]).reshape(batch, -1)
    assert (values[kept] == 1).all() and (values[~kept] == 0).all()
  assert bool(keep["time_ids"].all())
  # Independent per condition.
  both = float((~keep["lip"] & ~keep["expression"]).mean())
  assert both < 0.006


@pytest.mark.parametrize("sigma", [0.002, 1.0, 700.0])
def test_loss_weight(sigma):
  np.testing.assert_allclose(edm.loss_weight(sigma), (sigma**2 + 1) / sigma**2, rtol=1e-6)
