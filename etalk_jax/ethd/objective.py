"""The encoders' self-driven dropout reconstruction objective, with ETHD as the renderer.

docs/ARCHITECTURE.md §2 ("encoders ... pre-trained by self-driven dropout image reconstruction") and
§3.9. The lip and expression encoders (PD-FGC with adapters) read the ground-truth frames; their
`l_v` and `e_v` condition ETHD, which denoises the clip's latents (SVD's EDM formulation from
`etalk_jax.diffusion.edm`). Per sample, one of three modes:

  DROP_LIP         l_v zeroed -> loss inside the face mask only (face minus mouth): what the
                   expression stream alone must explain
  DROP_EXPRESSION  e_v zeroed -> loss inside the lip mask only: what the lip stream alone must
                   explain
  KEEP_BOTH        both kept  -> loss on the whole frame

"Drop" zeroes that stream's per-frame latents before ETHD's token projection, as
`edm.drop_conditions` does for guidance dropout (SVD's unconditional input is zeros too), so
one learned "absent" token per stream serves both. The reference expression e_ref (of the
reference frame, always available at inference) is kept in every mode. The pixel masks are
area-downsampled to the latent grid (`area_downsample`), so the loss weight of a latent is the
fraction of its pixels inside the mask, and each sample's loss is normalised by its mask area so
that small lip masks are not down-weighted against whole frames.

The ETHD stage's own objective (`audio_driven_loss`) is here too: SVD's EDM loss on ETHD driven
by the audio's lip tokens l_a and, per sample, the ground-truth expression or the one Di-CTE
generated (`choose_expression`), with classifier-free-guidance condition dropout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from etalk_jax.diffusion.edm import (
  denoise,
  denoising_loss,
  drop_conditions,
  loss_weight,
  sample_sigmas,
)
from etalk_jax.ethd.edi import area_downsample

DROP_LIP, DROP_EXPRESSION, KEEP_BOTH = 0, 1, 2
MODE_NAMES = ("drop_lip", "drop_expression", "keep_both")


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
  """Per-sample mode probabilities (drop lip, drop expression, keep both; the paper gives none,
  so equal) and SVD's log-normal training sigma."""
  mode_probabilities: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
  p_mean: float = 0.7
  p_std: float = 1.6


def choose_modes(key: jax.Array, batch: int,
                 probabilities: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
                 ) -> jax.Array:
  """`(batch,)` int32 modes (DROP_LIP, DROP_EXPRESSION, KEEP_BOTH) drawn independently."""
  logits = jnp.log(jnp.asarray(probabilities, jnp.float32))
  return jax.random.categorical(key, logits, shape=(batch,)).astype(jnp.int32)


def drop_streams(modes: jax.Array, lip_latents: jax.Array, expression: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Zeroes `(batch, frames, d)` l_v where the mode drops lip and e_v where it drops expression."""
  keep_lip = (modes != DROP_LIP)[:, None, None]
  keep_expression = (modes != DROP_EXPRESSION)[:, None, None]
  return (jnp.where(keep_lip, lip_latents, jnp.zeros_like(lip_latents)),
          jnp.where(keep_expression, expression, jnp.zeros_like(expression)))


def reconstruction_mask(modes: jax.Array, face_mask: jax.Array, lip_mask: jax.Array,
                        height: int, width: int) -> jax.Array:
  """Loss mask at latent resolution, `(batch, height, width)` for masks `(batch, H, W)` or
  `(batch, frames, height, width)` for per-frame masks `(batch, frames, H, W)`: the face mask for
  DROP_LIP, the lip mask for DROP_EXPRESSION, ones for KEEP_BOTH. Masks in [0, 1] (or 0/1 uint8)."""
  lead = face_mask.shape[:-2]

  def downsample(mask):
    mask = jnp.asarray(mask, jnp.float32).reshape((-1,) + mask.shape[-2:])
    return area_downsample(mask, height, width).reshape(lead + (height, width))

  face, lip = downsample(face_mask), downsample(lip_mask)
  mode = modes.reshape(modes.shape + (1,) * (face.ndim - 1))
  return jnp.where(mode == DROP_LIP, face,
                   jnp.where(mode == DROP_EXPRESSION, lip, jnp.ones_like(face)))


def masked_weighted_loss(denoised: jax.Array, clean: jax.Array, sigma: jax.Array,
                         mask: jax.Array) -> jax.Array:
  """EDM-weighted squared error on latents `(batch, frames, h, w, c)` inside `mask`, either
  `(batch, h, w)` (the same region on every frame) or `(batch, frames, h, w)` (each frame's own):
  per sample the weighted mean over the masked area, then the mean over the batch. A sample with
  an empty mask contributes 0."""
  error = jnp.square(denoised.astype(jnp.float32) - clean.astype(jnp.float32))
  channels = clean.shape[-1]
  mask = mask.astype(jnp.float32)
  mask = (mask[:, None] if mask.ndim == 3 else mask)[..., None]
  mask = jnp.broadcast_to(mask, clean.shape[:-1] + (1,))
  area = jnp.sum(mask, axis=(1, 2, 3, 4)) * channels
  per_sample = jnp.sum(mask * error, axis=(1, 2, 3, 4)) / jnp.maximum(area, 1e-6)
  return jnp.mean(loss_weight(sigma) * per_sample)


def reconstruction_loss(ethd, clean: jax.Array, reference_latents: jax.Array,
                        lip_latents: jax.Array, expression: jax.Array,
                        reference_expression: jax.Array, face_mask: jax.Array,
                        lip_mask: jax.Array, key: jax.Array, *,
                        config: ReconstructionConfig = ReconstructionConfig(),
                        modes: jax.Array | None = None, sigma: jax.Array | None = None,
                        loss_masks: tuple[jax.Array, jax.Array] | None = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One self-driven dropout reconstruction loss.

  ethd: an `ETHD` (or anything called like one); clean: the clip's scaled VAE latents
  `(batch, frames, h, w, 4)`; reference_latents: the reference frame's latent `(batch, h, w, 4)`,
  unscaled beside the noisy input as SVD concatenates it; lip_latents `(batch, frames, lip_dim)`
  and expression `(batch, frames, expression_dim)`: the encoders' l_v and e_v of the same
  frames; reference_expression `(batch, expression_dim)`: e_v of the reference frame;
  face_mask, lip_mask `(batch, H, W)` at pixel (or latent) resolution: the reference's, what
  ETHD's EDI reads as at inference, and the loss regions unless `loss_masks` (face, lip)
  `(batch, frames, H, W)` gives every driving frame's own (the loss must follow the frame's
  face, which moves away from the reference's). modes / sigma: fixed
  `(batch,)` values instead of random ones (tests, evaluation). Differentiable in the model
  and in the latents (so the encoders' adapters train through them).
  Returns (loss, {"modes", "sigma"}).
  """
  batch, frames, height, width, _ = clean.shape
  mode_key, sigma_key, noise_key = jax.random.split(key, 3)
  if modes is None:
    modes = choose_modes(mode_key, batch, config.mode_probabilities)
  if sigma is None:
    sigma = sample_sigmas(sigma_key, (batch,), config.p_mean, config.p_std)
  sigma = jnp.asarray(sigma, jnp.float32)
  lip_latents, expression = drop_streams(modes, lip_latents, expression)
  reference = jnp.broadcast_to(reference_latents[:, None], clean.shape[:-1] +
                               reference_latents.shape[-1:]).astype(clean.dtype)
  noise = jax.random.normal(noise_key, clean.shape, jnp.float32)
  noisy = clean + sigma[:, None, None, None, None] * noise

  def render(scaled, c_noise):
    return ethd(jnp.concatenate([scaled, reference], axis=-1), c_noise, lip_latents, expression,
                reference_expression, face_mask)

  denoised = denoise(render, noisy, sigma)
  mask = reconstruction_mask(modes, *(loss_masks or (face_mask, lip_mask)), height, width)
  return masked_weighted_loss(denoised, clean, sigma, mask), {"modes": modes, "sigma": sigma}


def encoder_reconstruction_loss(encoders, ethd, clean: jax.Array, reference_latents: jax.Array,
                                encoder_frames: jax.Array, encoder_reference: jax.Array,
                                face_mask: jax.Array, lip_mask: jax.Array, key: jax.Array, **options
                                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`reconstruction_loss` with l_v, e_v and e_ref from the encoders (`AdaptedPDFGC`) on the
  ground-truth frames' encoder crops `(batch, frames, S, S, 3)` and the reference crop
  `(batch, S, S, 3)`, in [-1, 1]. Differentiate in the adapters (`ADAPTER_PARAMS`), and in ETHD
  when it trains too."""
  batch, frames = encoder_frames.shape[:2]
  codes = encoders(encoder_frames.reshape((batch * frames,) + encoder_frames.shape[2:]))
  reference_expression = encoders(encoder_reference).expression
  return reconstruction_loss(
      ethd, clean, reference_latents, codes.lip.reshape(batch, frames, -1),
      codes.expression.reshape(batch, frames, -1), reference_expression, face_mask, lip_mask,
      key, **options)


def choose_expression(key: jax.Array, ground_truth: jax.Array, predicted: jax.Array,
                      probability: float = 0.6) -> jax.Array:
  """Per batch element: the ground-truth expression latents with `probability`, else the ones
  Di-CTE generated (ETHD learns to render both; docs/ARCHITECTURE.md §2)."""
  use_truth = jax.random.uniform(key, (ground_truth.shape[0],)) < probability
  use_truth = use_truth.reshape(use_truth.shape + (1,) * (ground_truth.ndim - 1))
  return jnp.where(use_truth, ground_truth, predicted)


def audio_driven_loss(ethd, clean: jax.Array, reference_latents: jax.Array, lip: jax.Array,
                      expression: jax.Array, predicted_expression: jax.Array,
                      reference_expression: jax.Array, face_mask: jax.Array, lip_mask: jax.Array,
                      key: jax.Array, *, truth_probability: float = 0.6, dropout: float = 0.05,
                      lip_weight: float = 0.0, p_mean: float = 0.7, p_std: float = 1.6
                      ) -> jax.Array:
  """The ETHD stage's loss: SVD's EDM objective (`edm.denoising_loss`) on ETHD driven by l_a.

  ethd: an `ETHD` (or anything called like one); clean: the clip's latent target
  `(batch, frames, h, w, 4)`; reference_latents `(batch, h, w, 4)`: the reference frame's latent,
  concatenated beside the noisy input; lip `(batch, frames, lip_dim)`: l_a; expression and
  predicted_expression `(batch, frames, expression_dim)`: the ground-truth e_v and Di-CTE's e_a,
  one of them per sample (`choose_expression` with `truth_probability`); reference_expression
  `(batch, expression_dim)`: e_ref; face_mask: the reference's, what ETHD's EDI reads; lip_mask
  at latent resolution, broadcastable to `(batch, frames, h, w)`: where `lip_weight` adds weight.
  Lip, expression and reference conditions are each dropped with `dropout` (classifier-free
  guidance). Differentiable in the model.
  """
  choice_key, dropout_key, noise_key = jax.random.split(key, 3)
  expression = choose_expression(choice_key, expression, predicted_expression, truth_probability)
  kept, _ = drop_conditions(
      dropout_key, {"lip": lip, "expression": expression, "reference": reference_latents},
      {"lip": dropout, "expression": dropout, "reference": dropout})
  reference = jnp.broadcast_to(kept["reference"][:, None], clean.shape)

  def render(scaled, c_noise):
    return ethd(jnp.concatenate([scaled, reference], axis=-1), c_noise, kept["lip"],
                kept["expression"], reference_expression, face_mask)

  return denoising_loss(render, clean, noise_key, lip_mask=lip_mask[..., None],
                        lip_weight=lip_weight, p_mean=p_mean, p_std=p_std)
