"""Euler / Karras sampler parity with diffusers' EulerDiscreteScheduler configured as SVD's, the
window plan and blend weights, the windowed loop (equal to one clip for a per-frame denoiser,
one compile for lengths in one bucket) and the whole loop around a tiny random SVD UNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from etalk_jax.diffusion import edm, sampling
from etalk_jax.svd import unet_from_diffusers
from tests.helpers.svd_reference import UNET_TWO_LEVELS, make_unet, relative_error, svd_scheduler

STEPS = 25


def scaled_error(ours, reference) -> float:
  """Max abs error relative to max(1, |reference|): the latents span 700 down to ~1."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))


def fake_denoiser(params, scaled, c_noise, frame_conditions, video_conditions):
  """Per-frame (no mixing across frames): windows of any layout must reproduce one clip."""
  return (jnp.tanh(scaled * params) + 0.1 * c_noise + frame_conditions["bias"]
          + video_conditions["shift"][:, None, None, None, None])


def fake_denoiser_torch(params, scaled, c_noise, bias, shift):
  return torch.tanh(scaled * params) + 0.1 * c_noise + bias + shift[:, None, None, None, None]


def test_schedule_matches_diffusers():
  scheduler = svd_scheduler()
  scheduler.set_timesteps(STEPS)
  sigmas = sampling.sampler_sigmas(sampling.SamplerConfig())
  assert sigmas.shape == (STEPS + 1,)
  np.testing.assert_allclose(sigmas, scheduler.sigmas.numpy(), rtol=1e-6, atol=0)
  np.testing.assert_allclose(edm.noise_conditioning(sigmas[:-1]), scheduler.timesteps.numpy(),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(sampling.initial_noise_scale(jnp.asarray(sigmas)),
                             float(scheduler.init_noise_sigma), rtol=1e-6)


def test_every_step_matches_diffusers():
  scheduler = svd_scheduler()
  scheduler.set_timesteps(STEPS)
  sigmas = sampling.sampler_sigmas(sampling.SamplerConfig())
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, 3, 4, 4, 4), np.float32) * np.float32(
      scheduler.init_noise_sigma)
  ours, theirs = jnp.asarray(latents), torch.from_numpy(latents)
  worst = 0.0
  for i, t in enumerate(scheduler.timesteps):
    scaled_theirs = scheduler.scale_model_input(theirs, t)
    scaled_ours = edm.scale_model_input(ours, sigmas[i])
    worst = max(worst, scaled_error(scaled_ours, scaled_theirs.numpy()))
    # The same fake network output for both, drawn at the scale a v-prediction has.
    output = rng.standard_normal(latents.shape, np.float32)
    theirs = scheduler.step(torch.from_numpy(output), t, theirs).prev_sample
    ours = sampling.euler_step(jnp.asarray(output), ours, sigmas[i], sigmas[i + 1])
    worst = max(worst, scaled_error(ours, theirs.numpy()))
  print(f"per-step scaled error (max over 25 steps): {worst:.2e}")
  assert worst < 1e-5


def _diffusers_loop(noise, bias, shift, params, guidance_scale=None, unconditional=None):
  """SVD pipeline's denoising loop around the torch twin of `fake_denoiser`."""
  scheduler = svd_scheduler()
  scheduler.set_timesteps(STEPS)
  latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
  for t in scheduler.timesteps:
    scaled = scheduler.scale_model_input(latents, t)
    output = fake_denoiser_torch(params, scaled, t, torch.from_numpy(bias),
                                 torch.from_numpy(shift))
    if guidance_scale is not None:
      uncond = fake_denoiser_torch(params, scaled, t, torch.from_numpy(unconditional[0]),
                                   torch.from_numpy(unconditional[1]))
      scale = torch.from_numpy(guidance_scale)[None, :, None, None, None]
      output = uncond + scale * (output - uncond)
    latents = scheduler.step(output, t, latents).prev_sample
  return latents.numpy()


def _fake_inputs(frames, seed=0):
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((2, frames, 3, 3, 4), np.float32)
  bias = 0.3 * rng.standard_normal((2, frames, 1, 1, 4), np.float32)
  shift = np.array([0.1, -0.2], np.float32)
  return noise, bias, shift


def test_jitted_loop_matches_diffusers_pipeline_loop():
  noise, bias, shift = _fake_inputs(5)
  sigmas = jnp.asarray(sampling.sampler_sigmas(sampling.SamplerConfig()))
  ours = sampling.sample_clip(fake_denoiser, jnp.float32(0.7), noise, sigmas, {"bias": bias},
                              {"shift": shift})
  error = scaled_error(ours, _diffusers_loop(noise, bias, shift, 0.7))
  # Guided, SVD's linear per-frame scale (1 -> 3).
  scale = sampling.guidance_scales(5, 1.0, 3.0)
  unconditional = (np.zeros_like(bias), np.zeros_like(shift))
  guided = sampling.sample_clip(
      fake_denoiser, jnp.float32(0.7), noise, sigmas, {"bias": bias}, {"shift": shift},
      sampling.Guidance({"bias": unconditional[0]}, {"shift": unconditional[1]}, scale))
  guided_error = scaled_error(guided, _diffusers_loop(noise, bias, shift, 0.7, scale,
                                                      unconditional))
  print(f"25-step loop error: {error:.2e}, guided: {guided_error:.2e}")
  assert error < 1e-5 and guided_error < 1e-5


@pytest.mark.parametrize("frames,window,overlap", [
    (120, 120, 24), (121, 120, 24), (217, 120, 24), (500, 120, 24), (1000, 120, 24),
    (32, 32, 12), (33, 32, 12), (100, 32, 12), (57, 32, 12), (11, 4, 2), (9, 4, 2), (3, 4, 2)])
def test_windows_cover_and_blend_to_one(frames, window, overlap):
  config = sampling.WindowConfig(frames=window, overlap=overlap)
  plan = sampling.plan_windows(frames, config)
  starts, weights = plan.starts[:plan.windows], plan.weights[:plan.windows]
  assert starts[0] == 0 and starts[-1] + plan.window_frames == frames
  assert (np.diff(starts) <= window - overlap).all()  # every overlap is at least `overlap`
  assert (weights >= 0).all() and (plan.weights[plan.windows:] == 0).all()
  total = np.zeros(frames)
  for start, weight in zip(starts, weights):
    total[start:start + plan.window_frames] += weight
  np.testing.assert_allclose(total, 1.0, atol=1e-6)
  # A constant signal stays constant after blending (frames past the video are never read).
  windows = jnp.full((len(plan.starts), 2, plan.window_frames, 2, 2, 1), 3.5)
  video = sampling.blend_windows(windows, plan.starts, plan.weights, plan.buffer_frames)
  np.testing.assert_allclose(np.asarray(video)[:, :frames], 3.5, rtol=1e-6)


def test_two_window_overlap_is_a_linear_cross_fade():
  plan = sampling.plan_windows(216, sampling.WINDOWS_512)  # exactly two windows, overlap 24
  assert plan.windows == 2 and list(plan.starts[:2]) == [0, 96]
  fade_in = plan.weights[1, :24]
  np.testing.assert_allclose(fade_in, np.arange(1, 25) / 25, rtol=1e-6)
  np.testing.assert_allclose(plan.weights[0, 96:], 1 - fade_in, rtol=1e-6)
  assert (plan.weights[0, :96] == 1).all() and (plan.weights[1, 24:] == 1).all()


def test_buckets():
  config = sampling.WINDOWS_512
  plans = [sampling.plan_windows(frames, config) for frames in (121, 400, 792)]
  assert len({(p.buffer_frames, p.starts.shape, p.weights.shape) for p in plans}) == 1
  bigger = sampling.plan_windows(793, config)
  assert bigger.windows == 9 and bigger.starts.shape == (16,)


WINDOWS = sampling.WindowConfig(frames=4, overlap=2, windows_per_call=2, min_window_groups=4)


def test_windows_equal_one_clip_for_a_per_frame_denoiser_and_compile_once():
  sigmas = jnp.asarray(sampling.sampler_sigmas(sampling.SamplerConfig(steps=6)))
  sampler = sampling.SamplerConfig(steps=6)
  compiled_before = sampling._sample_windows._cache_size()
  for frames in (9, 11, 7):  # 4, 5 and 3 windows: all in the 4-group bucket (2 per call)
    noise, bias, shift = _fake_inputs(frames, seed=frames)
    windowed = sampling.sample_video(fake_denoiser, jnp.float32(0.7), noise, {"bias": bias},
                                     {"shift": shift}, sampler=sampler, windows=WINDOWS)
    clip = sampling.sample_clip(fake_denoiser, jnp.float32(0.7), noise, sigmas, {"bias": bias},
                                {"shift": shift})
    assert windowed.shape == noise.shape
    assert scaled_error(windowed, clip) < 1e-5
  assert sampling._sample_windows._cache_size() - compiled_before == 1


DENOISER_CALLS = []


def counting_denoiser(params, scaled, c_noise, frame_conditions, video_conditions):
  """fake_denoiser that records, from inside the compiled loop, each batch it really ran on."""
  jax.debug.callback(lambda batch: DENOISER_CALLS.append(int(batch)), scaled.shape[0])
  return fake_denoiser(params, scaled, c_noise, frame_conditions, video_conditions)


def test_padded_window_groups_skip_the_denoiser():
  noise, bias, shift = _fake_inputs(9)  # 4 windows = 2 groups of 2, bucket of 4 groups
  DENOISER_CALLS.clear()
  sampling.sample_video(counting_denoiser, jnp.float32(0.7), noise, {"bias": bias},
                        {"shift": shift}, sampler=sampling.SamplerConfig(steps=3),
                        windows=WINDOWS)
  jax.effects_barrier()
  assert DENOISER_CALLS == [2 * 2] * (2 * 3)  # 2 real groups x 3 steps, 2 windows x batch 2


def test_windows_with_guidance_equal_one_clip():
  frames = 6
  sampler = sampling.SamplerConfig(steps=4, min_guidance_scale=2.5, max_guidance_scale=2.5)
  noise, bias, shift = _fake_inputs(frames, seed=3)
  unconditional = ({"bias": np.zeros_like(bias)}, {"shift": np.zeros_like(shift)})
  windowed = sampling.sample_video(fake_denoiser, jnp.float32(0.7), noise, {"bias": bias},
                                   {"shift": shift}, sampler=sampler, windows=WINDOWS,
                                   unconditional=unconditional)
  clip = sampling.sample_clip(
      fake_denoiser, jnp.float32(0.7), noise, jnp.asarray(sampling.sampler_sigmas(sampler)),
      {"bias": bias}, {"shift": shift},
      sampling.Guidance(*unconditional, np.full(frames, 2.5, np.float32)))
  assert scaled_error(windowed, clip) < 1e-5
  with pytest.raises(ValueError, match="unconditional"):
    sampling.sample_video(fake_denoiser, jnp.float32(0.7), noise, {"bias": bias},
                          {"shift": shift}, sampler=sampler, windows=WINDOWS)


# The tiny UNet with SVD's 8 input channels (noisy + reference latent) and 3 added time ids.
UNET_FIELDS = dict(UNET_TWO_LEVELS, in_channels=8)


@pytest.fixture(scope="module")
def unet_pair():
  torch_unet = make_unet(UNET_FIELDS)
  return torch_unet, unet_from_diffusers(torch_unet)


def _unet_inputs(frames, seed=0):
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((1, frames, 4, 4, 4), np.float32)
  reference = rng.standard_normal((1, 1, 4, 4, 4), np.float32).repeat(frames, axis=1)
  context = rng.standard_normal((1, 1, UNET_FIELDS["cross_attention_dim"]), np.float32)
  time_ids = np.array([[6.0, 127.0, 0.02]], np.float32)
  return noise, {"reference_latents": reference}, {"encoder_hidden_states": context,
                                                   "added_time_ids": time_ids}


def test_unet_loop_matches_diffusers(unet_pair):
  torch_unet, unet = unet_pair
  steps = 3
  noise, frame_conditions, video_conditions = _unet_inputs(3)
  denoiser, params = sampling.model_denoiser(unet, sampling.call_svd_unet)
  sigmas = jnp.asarray(sampling.sampler_sigmas(sampling.SamplerConfig(steps=steps)))
  ours = sampling.sample_clip(denoiser, params, noise, sigmas, frame_conditions,
                              video_conditions)

  scheduler = svd_scheduler()
  scheduler.set_timesteps(steps)
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 2)))
  latents = to_torch(noise) * scheduler.init_noise_sigma
  reference = to_torch(frame_conditions["reference_latents"])
  with torch.no_grad():
    for t in scheduler.timesteps:
      scaled = torch.cat([scheduler.scale_model_input(latents, t), reference], dim=2)
      output = torch_unet(scaled, t, torch.from_numpy(video_conditions["encoder_hidden_states"]),
                          torch.from_numpy(video_conditions["added_time_ids"])).sample
      latents = scheduler.step(output, t, latents).prev_sample
  theirs = np.moveaxis(latents.numpy(), 2, -1)
  error = relative_error(ours, theirs)
  print(f"tiny UNet, {steps} steps, ours vs diffusers: {error:.2e}")
  assert error < 1e-4


def test_unet_windows_compile_once(unet_pair):
  _, unet = unet_pair
  sampler = sampling.SamplerConfig(steps=2)
  windows = sampling.WindowConfig(frames=3, overlap=1, windows_per_call=2, min_window_groups=2)
  compiled_before = sampling._sample_windows._cache_size()
  for frames in (5, 7):  # 2 and 3 windows: one bucket of 2 groups of 2
    noise, frame_conditions, video_conditions = _unet_inputs(frames, seed=frames)
    # A fresh split each time: equal graphdefs must hit the same executable.
    denoiser, params = sampling.model_denoiser(unet, sampling.call_svd_unet)
    latents = sampling.sample_video(denoiser, params, noise, frame_conditions, video_conditions,
                                    sampler=sampler, windows=windows)
    assert latents.shape == noise.shape and np.isfinite(np.asarray(latents)).all()
  assert sampling._sample_windows._cache_size() - compiled_before == 1
