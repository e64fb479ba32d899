"""The encoders' self-driven dropout reconstruction objective (docs/ARCHITECTURE.md §3.9)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from etalk_jax.ethd import ETHD, ETHDConfig
from etalk_jax.ethd.edi import area_downsample
from etalk_jax.ethd.objective import (
  DROP_EXPRESSION,
  DROP_LIP,
  KEEP_BOTH,
  choose_expression,
  choose_modes,
  drop_streams,
  encoder_reconstruction_loss,
  masked_weighted_loss,
  reconstruction_loss,
  reconstruction_mask,
)
from etalk_jax.svd import UNetConfig
from etalk_jax.vision.pdfgc import ADAPTER_PARAMS, PDFGC_SMALL, AdaptedPDFGC

TINY_UNET = UNetConfig(
    sample_size=4, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",),
    up_block_types=("CrossAttnUpBlockSpatioTemporal",),
    block_out_channels=(32,), addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12, layers_per_block=1, cross_attention_dim=16,
    transformer_layers_per_block=1, num_attention_heads=2, num_frames=2)
PIXELS, LATENT, FRAMES = 16, 4, 3


def _masks(batch):
  """Face: the left half minus a mouth square; lip: that square, which covers latent (2, 1)
  fully and half of latent (2, 2)."""
  lip = np.zeros((batch, PIXELS, PIXELS), np.float32)
  lip[:, 8:12, 4:10] = 1
  face = np.zeros_like(lip)
  face[:, :, :8] = 1
  face = face * (1 - lip)
  return face, lip


def test_mask_selection_per_mode():
  face, lip = _masks(3)
  modes = jnp.array([DROP_LIP, DROP_EXPRESSION, KEEP_BOTH])
  mask = np.asarray(reconstruction_mask(modes, face, lip, LATENT, LATENT))
  np.testing.assert_array_equal(mask[0], area_downsample(face, LATENT, LATENT)[0])
  np.testing.assert_array_equal(mask[1], area_downsample(lip, LATENT, LATENT)[1])
  np.testing.assert_array_equal(mask[2], np.ones((LATENT, LATENT)))
  assert mask[1, 2, 1] == 1 and mask[1, 2, 2] == 0.5 and mask[1].sum() == 1.5
  assert mask[0, :, 2:].max() == 0 and mask[0, 2, 1] == 0  # face minus mouth
  # uint8 masks as the loader gives them
  uint8 = reconstruction_mask(modes, face.astype(np.uint8), lip.astype(np.uint8), LATENT, LATENT)
  np.testing.assert_array_equal(uint8, mask)


def test_drop_streams_zeroes_the_dropped_latents():
  lip, expression = jnp.ones((3, FRAMES, 5)), jnp.full((3, FRAMES, 2), 2.0)
  lip, expression = drop_streams(jnp.array([DROP_LIP, DROP_EXPRESSION, KEEP_BOTH]), lip,
                                 expression)
  assert lip.sum(axis=(1, 2)).tolist() == [0, 15, 15]
  assert expression.sum(axis=(1, 2)).tolist() == [12, 0, 12]


def test_choose_modes():
  modes = np.asarray(choose_modes(jax.random.key(0), 3000))
  assert set(modes.tolist()) == {0, 1, 2}
  np.testing.assert_allclose(np.bincount(modes) / 3000, [1 / 3] * 3, atol=0.03)
  only = choose_modes(jax.random.key(1), 50, (0.0, 1.0, 0.0))
  assert set(np.asarray(only).tolist()) == {DROP_EXPRESSION}


def test_masked_loss_is_a_mean_over_the_masked_area():
  clean = jnp.zeros((2, FRAMES, LATENT, LATENT, 4))
  face, lip = _masks(2)
  mask = reconstruction_mask(jnp.array([DROP_EXPRESSION, KEEP_BOTH]), face, lip, LATENT, LATENT)
  sigma = jnp.array([1.0, 1.0])  # EDM weight 2
  assert np.isclose(masked_weighted_loss(clean + 1, clean, sigma, mask), 2.0)
  empty = jnp.zeros((2, LATENT, LATENT))
  assert masked_weighted_loss(clean + 1, clean, sigma, empty) == 0


def _fake_inputs(batch, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  face, lip = _masks(batch)
  return dict(clean=normal(batch, FRAMES, LATENT, LATENT, 4),
              reference_latents=normal(batch, LATENT, LATENT, 4),
              lip_latents=normal(batch, FRAMES, 5), expression=normal(batch, FRAMES, 2),
              reference_expression=normal(batch, 2), face_mask=face, lip_mask=lip)


def test_loss_ignores_everything_outside_the_chosen_mask():
  """The renderer's output gets a learnable offset per latent: its gradient is zero exactly where
  the mode's latent mask is zero, and a perturbation there leaves the loss unchanged."""
  inputs = _fake_inputs(3)
  modes = jnp.array([DROP_LIP, DROP_EXPRESSION, KEEP_BOTH])
  seen = {}

  def loss_with_offset(offset):
    def renderer(sample, c_noise, lip, expression, reference_expression, face_mask):
      seen.update(lip=lip, expression=expression, channels=sample.shape[-1])
      return sample[..., :4] * 0.5 + jnp.sin(c_noise)[:, None, None, None, None] + offset
    return reconstruction_loss(renderer, key=jax.random.key(0), modes=modes, **inputs)[0]

  zero = jnp.zeros((3, FRAMES, LATENT, LATENT, 4))
  gradient = np.asarray(jax.grad(loss_with_offset)(zero))
  mask = np.asarray(reconstruction_mask(modes, inputs["face_mask"], inputs["lip_mask"],
                                        LATENT, LATENT))
  touched = np.abs(gradient).max(axis=(1, 4)) > 0  # (batch, h, w)
  np.testing.assert_array_equal(touched, mask > 0)
  outside = np.broadcast_to((mask == 0)[:, None, :, :, None], zero.shape)
  perturbed = jnp.asarray(np.where(outside, 100.0, 0.0), jnp.float32)
  assert np.isclose(loss_with_offset(perturbed), loss_with_offset(zero), rtol=1e-6)
  assert not np.isclose(loss_with_offset(zero + 0.1), loss_with_offset(zero))
  # The renderer saw the reference latent beside the noisy one and the dropped streams as zeros.
  assert seen["channels"] == 8
  assert np.abs(np.asarray(seen["lip"])[0]).max() == 0 and np.abs(seen["lip"][1]).max() > 0
  assert np.abs(np.asarray(seen["expression"])[1]).max() == 0
  assert np.abs(np.asarray(seen["expression"])[2]).max() > 0


def _tiny_ethd(lip_dim, expression_dim, rngs):
  return ETHD(ETHDConfig(unet=TINY_UNET, lip_dim=lip_dim, expression_dim=expression_dim),
              rngs=rngs)


def test_objective_runs_under_jit_with_tiny_ethd():
  """Under jit with fixed modes and sigmas (one compile, two calls) the loss follows the masks:
  all KEEP_BOTH scores whole frames; sample 0 in DROP_EXPRESSION scores only its lip region."""
  ethd = _tiny_ethd(5, 2, nnx.Rngs(0))
  inputs = _fake_inputs(3)
  sigma = jnp.array([0.5, 1.0, 2.0])
  at = nnx.jit(lambda ethd, modes: reconstruction_loss(ethd, key=jax.random.key(1), modes=modes,
                                                       sigma=sigma, **inputs))
  keep, aux = at(ethd, jnp.full((3,), KEEP_BOTH))
  assert np.isfinite(keep) and keep > 0
  assert aux["modes"].shape == (3,) and aux["sigma"].shape == (3,)
  lips, _ = at(ethd, jnp.array([DROP_EXPRESSION, KEEP_BOTH, KEEP_BOTH]))
  assert np.isfinite(lips) and not np.isclose(lips, keep, rtol=1e-4)


def test_loss_equals_the_hand_computed_value_with_per_frame_masks():
  """A renderer that predicts v = 0 on clean = 0 latents denoises to x / (sigma² + 1), so the
  EDM-weighted error is noise² / (sigma² + 1): the loss is that, averaged over each frame's own
  mask (frame f's lip mask shifted down f pixel rows, the head moving), then over the batch."""
  inputs = _fake_inputs(2)
  clean = jnp.zeros_like(inputs["clean"])
  face, lip = _masks(2)
  frame_lip = np.stack([np.roll(lip, 4 * f, axis=1) for f in range(FRAMES)], axis=1)
  frame_face = np.stack([np.roll(face, 4 * f, axis=1) for f in range(FRAMES)], axis=1)
  modes, sigma = jnp.array([DROP_EXPRESSION, DROP_LIP]), jnp.array([0.5, 2.0])
  key = jax.random.key(4)
  loss, _ = reconstruction_loss(lambda sample, *_: jnp.zeros(sample.shape[:-1] + (4,)),
                                **{**inputs, "clean": clean}, key=key, modes=modes, sigma=sigma,
                                loss_masks=(frame_face, frame_lip))
  noise = np.asarray(jax.random.normal(jax.random.split(key, 3)[2], clean.shape, jnp.float32))
  expected = []
  for sample, masks in ((0, frame_lip), (1, frame_face)):
    weights = np.stack([masks[sample, f].reshape(LATENT, 4, LATENT, 4).mean(axis=(1, 3))
                        for f in range(FRAMES)])[..., None] * np.ones(4)
    error = noise[sample] ** 2 / (float(sigma[sample]) ** 2 + 1)
    expected.append((weights * error).sum() / weights.sum())
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  # The reference's masks alone (the old behaviour) score other latents: a different value.
  static, _ = reconstruction_loss(lambda sample, *_: jnp.zeros(sample.shape[:-1] + (4,)),
                                  **{**inputs, "clean": clean}, key=key, modes=modes, sigma=sigma)
  assert not np.isclose(static, loss, rtol=1e-3)


@pytest.mark.slow
def test_objective_with_tiny_ethd_and_encoders_trains_both_adapters_under_jit():
  rngs = nnx.Rngs(0)
  encoders = AdaptedPDFGC(PDFGC_SMALL, rngs=rngs)
  codes = encoders(jnp.zeros((1, PDFGC_SMALL.image_size, PDFGC_SMALL.image_size, 3)))
  ethd = _tiny_ethd(codes.lip.shape[-1], codes.expression.shape[-1], rngs)
  batch = 2
  inputs = _fake_inputs(batch)
  crops = np.random.default_rng(1).uniform(
      -1, 1, (batch, FRAMES + 1, PDFGC_SMALL.image_size, PDFGC_SMALL.image_size, 3)
  ).astype(np.float32)
  modes = jnp.array([DROP_LIP, DROP_EXPRESSION])  # sample 0 trains e_v, sample 1 trains l_v

  @nnx.jit
  def loss_and_grads(encoders, ethd, key):
    def loss_fn(encoders, ethd):
      loss, _ = encoder_reconstruction_loss(
          encoders, ethd, inputs["clean"], inputs["reference_latents"], crops[:, :FRAMES],
          crops[:, FRAMES], inputs["face_mask"], inputs["lip_mask"], key, modes=modes)
      return loss
    return nnx.value_and_grad(loss_fn, argnums=(0, 1))(encoders, ethd)

  loss, (encoder_grads, ethd_grads) = loss_and_grads(encoders, ethd, jax.random.key(3))
  assert np.isfinite(loss) and loss > 0
  adapters = nnx.state(encoders, ADAPTER_PARAMS)
  adapter_grads = {".".join(map(str, path)): np.abs(np.asarray(value)).max()
                   for path, value in nnx.to_flat_state(encoder_grads)
                   if path in dict(nnx.to_flat_state(adapters))}
  assert adapter_grads["lip_adapter.output.kernel"] > 0
  assert adapter_grads["expression_adapter.output.kernel"] > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(ethd_grads))


def test_choose_expression():
  truth = jnp.ones((10_000, 4, 30))
  predicted = -jnp.ones((10_000, 4, 30))
  chosen = np.asarray(jax.jit(choose_expression)(jax.random.key(0), truth, predicted))
  per_sample = chosen[:, 0, 0]
  assert (chosen == per_sample[:, None, None]).all()
  assert abs((per_sample == 1).mean() - 0.6) < 0.02
