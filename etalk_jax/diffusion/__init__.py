"""Diffusion: SVD's EDM objective (edm.py) and the Euler / overlapping-window samplers
(sampling.py), model-agnostic: a model enters as a pure denoiser function."""

from etalk_jax.diffusion.edm import (
  EDMTrainingConfig,
  denoise,
  denoised_from_v,
  denoising_loss,
  drop_conditions,
  loss_weight,
  noise_conditioning,
  preconditioning,
  sample_sigmas,
  scale_model_input,
  v_target,
  weighted_loss,
)
from etalk_jax.diffusion.sampling import (
  WINDOWS_512,
  WINDOWS_1024,
  Guidance,
  ModelDenoiser,
  SamplerConfig,
  WindowConfig,
  WindowPlan,
  blend_weights,
  blend_windows,
  call_svd_unet,
  euler_step,
  guidance_scales,
  initial_noise_scale,
  karras_sigmas,
  model_denoiser,
  plan_windows,
  sample_clip,
  sample_video,
  sampler_sigmas,
  window_starts,
)

__all__ = [
    "EDMTrainingConfig", "denoise", "denoised_from_v", "denoising_loss",
    "drop_conditions", "loss_weight", "noise_conditioning", "preconditioning", "sample_sigmas",
    "scale_model_input", "v_target", "weighted_loss", "WINDOWS_512", "WINDOWS_1024", "Guidance",
    "ModelDenoiser", "SamplerConfig", "WindowConfig", "WindowPlan", "blend_weights",
    "blend_windows", "call_svd_unet", "euler_step", "guidance_scales", "initial_noise_scale",
    "karras_sigmas", "model_denoiser", "plan_windows", "sample_clip", "sample_video",
    "sampler_sigmas", "window_starts",
]
