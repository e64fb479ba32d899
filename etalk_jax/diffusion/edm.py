"""SVD's EDM formulation: v-prediction with EDM preconditioning (sigma_data = 1), the log-normal
noise-level distribution, the EDM-weighted loss and the condition-dropout helpers of ETHD
training (docs/ARCHITECTURE.md §3.7).

Everything is a pure function of arrays and explicit `jax.random` keys, so it runs under `jit`.
The formulas are written exactly as diffusers' `EulerDiscreteScheduler` (prediction_type
"v_prediction", timestep_type "continuous") evaluates them, which is what SVD was trained with:

  c_in    = 1 / sqrt(sigma^2 + 1)          (`scale_model_input`)
  c_noise = 0.25 ln sigma                  (the UNet's `timestep`)
  c_skip  = 1 / (sigma^2 + 1),  c_out = -sigma / sqrt(sigma^2 + 1)
  denoised = c_out * F(c_in x, c_noise) + c_skip * x
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EDMTrainingConfig:
  """ETHD's training-time noise and conditioning choices (docs/ARCHITECTURE.md §2 and §3.7)."""
  p_mean: float = 0.7  # log-normal sigma: ln sigma ~ N(p_mean, p_std^2)
  p_std: float = 1.6
  lip_weight: float = 0.0  # extra loss weight inside the lip mask (0 = off)
  dropout: tuple[tuple[str, float], ...] = (("lip", 0.05), ("expression", 0.05),
                                            ("reference", 0.05))
  ground_truth_expression_probability: float = 0.6


def _per_sample(sigma: jax.Array, ndim: int) -> jax.Array:
  """A scalar or per-batch `(batch,)` sigma, shaped to broadcast against a rank-`ndim` array."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def preconditioning(sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(c_skip, c_out, c_in, c_noise) of SVD's v-prediction EDM (sigma_data = 1)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  c_skip = 1.0 / (sigma**2 + 1)
  c_out = -sigma / (sigma**2 + 1) ** 0.5
  c_in = 1.0 / (sigma**2 + 1) ** 0.5
  return c_skip, c_out, c_in, noise_conditioning(sigma)


def noise_conditioning(sigma: jax.Array) -> jax.Array:
  """c_noise = 0.25 ln sigma: the `timestep` SVD's UNet receives."""
  return 0.25 * jnp.log(jnp.asarray(sigma, jnp.float32))


def scale_model_input(noisy: jax.Array, sigma: jax.Array) -> jax.Array:
  """c_in * x, written as diffusers' `scale_model_input` (a division, for bitwise closeness)."""
  sigma = _per_sample(sigma, noisy.ndim)
  return noisy / (sigma**2 + 1) ** 0.5


def denoised_from_v(model_output: jax.Array, noisy: jax.Array, sigma: jax.Array) -> jax.Array:
  """c_out * v + c_skip * x, in the operation order of diffusers' `step` (v_prediction)."""
  sigma = _per_sample(sigma, noisy.ndim)
  return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + noisy / (sigma**2 + 1)


def v_target(clean: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
  """The v-prediction target for x = clean + sigma * noise: the v with
  `denoised_from_v(v, x, sigma) == clean`, i.e. (noise - sigma * clean) / sqrt(sigma^2 + 1)
  (diffusers' `get_velocity` in sigma terms)."""
  sigma = _per_sample(sigma, clean.ndim)
  return (noise - sigma * clean) / (sigma**2 + 1) ** 0.5


def denoise(apply_fn: Callable[..., jax.Array], noisy: jax.Array, sigma: jax.Array, *args: Any,
            **kwargs: Any) -> jax.Array:
  """The preconditioned denoiser D(x; sigma) around a raw network F.

  `apply_fn(scaled_noisy, c_noise, *args, **kwargs)` returns the network's v-prediction for the
  scaled input (extra inputs such as a reference latent to concatenate, cross-attention
  contexts or added time ids pass through untouched). `sigma` is a scalar or `(batch,)`;
  `c_noise` is passed with the same shape.
  """
  model_output = apply_fn(scale_model_input(noisy, sigma), noise_conditioning(sigma), *args,
                          **kwargs)
  return denoised_from_v(model_output.astype(jnp.float32), noisy, sigma)


def sample_sigmas(key: jax.Array, shape: tuple[int, ...], p_mean: float = 0.7,
                  p_std: float = 1.6) -> jax.Array:
  """Training noise levels: ln sigma ~ N(p_mean, p_std^2) (EDM's log-normal; SVD's values)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))


def loss_weight(sigma: jax.Array) -> jax.Array:
  """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 with sigma_data = 1,
  which makes the weighted denoised-space loss a unit-variance loss on the network output."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return (sigma**2 + 1) / sigma**2


def weighted_loss(denoised: jax.Array, clean: jax.Array, sigma: jax.Array, *,
                  lip_mask: jax.Array | None = None, lip_weight: float = 0.0) -> jax.Array:
  """Mean of lambda(sigma) * (1 + lip_weight * lip_mask) * (denoised - clean)^2.

  `sigma`: scalar or `(batch,)`. `lip_mask`: values in [0, 1] at latent resolution, broadcastable
  to the latents (e.g. `(batch, frames, h, w, 1)`); the extra weight only applies where it is 1.
  """
  error = jnp.square(denoised.astype(jnp.float32) - clean.astype(jnp.float32))
  weight = _per_sample(loss_weight(sigma), clean.ndim)
  if lip_mask is not None and lip_weight:
    weight = weight * (1.0 + lip_weight * jnp.asarray(lip_mask, jnp.float32))
  return jnp.mean(weight * error)


def denoising_loss(apply_fn: Callable[..., jax.Array], clean: jax.Array, key: jax.Array,
                   *args: Any, p_mean: float = 0.7, p_std: float = 1.6,
                   lip_mask: jax.Array | None = None, lip_weight: float = 0.0,
                   **kwargs: Any) -> jax.Array:
  """One EDM training loss on clean latents `(batch, ...)`: a sigma per sample from the
  log-normal, x = clean + sigma * noise, D(x; sigma) through `denoise`, the weighted loss.

  `apply_fn`, `*args` and `**kwargs` are as in `denoise` (differentiate through a closure over
  the model or its parameters).
  """
  sigma_key, noise_key = jax.random.split(key)
  sigma = sample_sigmas(sigma_key, (clean.shape[0],), p_mean, p_std)
  noise = jax.random.normal(noise_key, clean.shape, jnp.float32)
  noisy = clean + _per_sample(sigma, clean.ndim) * noise
  denoised = denoise(apply_fn, noisy, sigma, *args, **kwargs)
  return weighted_loss(denoised, clean, sigma, lip_mask=lip_mask, lip_weight=lip_weight)


def drop_conditions(key: jax.Array, conditions: Mapping[str, jax.Array],
                    probabilities: Mapping[str, float]) -> tuple[dict[str, jax.Array],
                                                                 dict[str, jax.Array]]:
  """Condition dropout for classifier-free guidance: each named condition is replaced by zeros
  for a whole batch element with its own probability (independently per condition and sample).

  conditions: name -> array with the batch first (lip tokens, expression tokens, the reference
  latent...). Names missing from `probabilities` are never dropped. Returns the conditions with
  the dropped elements zeroed (SVD's unconditional input is zeros too) and the keep masks,
  name -> `(batch,)` bool, so a caller can also drop derived inputs consistently.
  """
  names = sorted(conditions)
  keys = jax.random.split(key, len(names))
  dropped, keep = {}, {}
  for name, name_key in zip(names, keys):
    value = conditions[name]
    keep[name] = jax.random.uniform(name_key, (value.shape[0],)) >= probabilities.get(name, 0.0)
    dropped[name] = jnp.where(_per_sample(keep[name], value.ndim), value,
                              jnp.zeros_like(value))
  return dropped, keep

