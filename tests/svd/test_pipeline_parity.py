"""End to end against diffusers' StableVideoDiffusionPipeline (docs/ARCHITECTURE.md §3.12).

A tiny random SVD (UNet, temporal VAE, SVD's Euler scheduler, a tiny random CLIP image encoder)
assembled into the real pipeline, guidance off, 25 steps. Ours: the converted UNet as ETHD at its
initial values (`ethd_from_svd`) fed the pipeline's CLIP image embedding as its lip and
expression tokens under a full face mask, the converted VAE's `encode_reference` of the same
image with the same noise augmentation, `sample_video` (one window) from the same initial noise,
and the codec's decode. Both the latents and the decoded frames must agree.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import PIL.Image
import torch
from diffusers import StableVideoDiffusionPipeline
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from etalk_jax.diffusion.sampling import SamplerConfig, WindowConfig, model_denoiser, sample_video
from etalk_jax.ethd import ETHDConfig, ethd_from_svd
from etalk_jax.pipeline import with_reference_latent
from etalk_jax.svd import unet_from_diffusers
from etalk_jax.svd.codec import VAECodec
from etalk_jax.svd.params import vae_from_diffusers
from tests.helpers.svd_reference import VAE_TINY, make_unet, make_vae, relative_error, svd_scheduler

FRAMES, SIZE, STEPS, SEED = 3, 16, 25, 7
EMBEDDING = 16  # CLIP's projection width = the UNet's cross-attention width
UNET = dict(
    sample_size=SIZE // 2, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 64), addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12, layers_per_block=1,
    cross_attention_dim=EMBEDDING, num_attention_heads=2, num_frames=FRAMES)


def tiny_svd_pipeline() -> StableVideoDiffusionPipeline:
  torch.manual_seed(0)
  clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      image_size=224, patch_size=32, projection_dim=EMBEDDING)).eval()
  pipe = StableVideoDiffusionPipeline(vae=make_vae(VAE_TINY, seed=1), image_encoder=clip,
                                      unet=make_unet(UNET, seed=2), scheduler=svd_scheduler(),
                                      feature_extractor=CLIPImageProcessor())
  pipe.set_progress_bar_config(disable=True)
  return pipe


def call_ethd_on_image_embedding(ethd, scaled_noisy, c_noise, frame_conditions,
                                 video_conditions):
  """`sample_video`'s denoiser: the pipeline's reference concatenation (`with_reference_latent`)
  and ETHD's UNet pass (`forward_tokens`) with SVD's one image embedding per clip as every
  frame's lip, driving and reference expression tokens, under a full face mask."""
  batch, frames, height, width = scaled_noisy.shape[:4]
  window = ethd.ethd_config.window
  embedding = video_conditions["image_embedding"]  # (batch, 1, dim)
  per_frame = jnp.broadcast_to(embedding[:, None], (batch, frames, 1, embedding.shape[-1])
                               ).reshape(batch * frames, 1, -1)
  tokens = jnp.repeat(per_frame, window, axis=1)
  conditions = {"expression_tokens": tokens,
                "expression_mask": jnp.ones((batch * frames, 1, 1, window), bool),
                "reference_tokens": per_frame,
                "face_mask": jnp.ones((batch, height, width), jnp.float32)}
  sample = with_reference_latent(scaled_noisy, video_conditions["reference_latent"])
  return ethd.forward_tokens(sample, c_noise, tokens, conditions)


def test_svd_pipeline_output_is_ours():
  pipe = tiny_svd_pipeline()
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  latents = torch.from_numpy(rng.standard_normal((1, FRAMES, 4, SIZE // 2, SIZE // 2),
                                                 dtype=np.float32))
  # With `latents` given, the pipeline's generator draws the augmentation noise only, first.
  augmentation = torch.randn((1, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(SEED))
  options = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS,
                 min_guidance_scale=1.0, max_guidance_scale=1.0, fps=25, motion_bucket_id=127,
                 noise_aug_strength=0.02, decode_chunk_size=FRAMES, latents=latents)
  with torch.no_grad():
    theirs = {output: pipe(PIL.Image.fromarray(image), output_type=output,
                           generator=torch.Generator().manual_seed(SEED), **options).frames
              for output in ("latent", "pt")}
    embedding = pipe._encode_image(PIL.Image.fromarray(image), "cpu", 1, False).numpy()
  their_latents = theirs["latent"].permute(0, 1, 3, 4, 2).numpy()
  their_frames = theirs["pt"].permute(0, 1, 3, 4, 2).numpy()  # [0, 1]

  unet = unet_from_diffusers(pipe.unet)
  ethd = ethd_from_svd(unet, ETHDConfig(unet=unet.config, lip_dim=8, expression_dim=6))
  # SVD's pipeline announces fps - 1 = 24, motion bucket 127 and augmentation 0.02: ETHD's ids.
  assert ethd.ethd_config.added_time_ids == (24.0, 127.0, 0.02)
  codec = VAECodec(vae_from_diffusers(pipe.vae), decode_chunk_frames=FRAMES)
  reference_latent = codec.encode_reference(image[None], augmentation.permute(0, 2, 3, 1).numpy(),
                                            ethd.ethd_config.noise_aug_strength)
  denoiser, params = model_denoiser(ethd, call_ethd_on_image_embedding)
  ours = sample_video(denoiser, params, latents.permute(0, 1, 3, 4, 2).numpy(), {},
                      {"reference_latent": reference_latent, "image_embedding": embedding},
                      sampler=SamplerConfig(steps=STEPS),
                      windows=WindowConfig(frames=FRAMES, overlap=0, min_window_groups=1))
  latent_error = relative_error(ours, their_latents)
  # The convention this replaced (the scaled mode of the un-noised image) is far off: the test
  # sees the reference latent.
  stale = sample_video(denoiser, params, latents.permute(0, 1, 3, 4, 2).numpy(), {},
                       {"reference_latent": codec.encode(image[None]),
                        "image_embedding": embedding},
                       sampler=SamplerConfig(steps=STEPS),
                       windows=WindowConfig(frames=FRAMES, overlap=0, min_window_groups=1))
  assert relative_error(stale, their_latents) > 1e-2
  our_frames = np.clip(np.asarray(codec.decode(ours[0])) / 2 + 0.5, 0.0, 1.0)
  frame_error = relative_error(our_frames, their_frames[0])
  print(f"SVD pipeline parity: latents {latent_error:.2e}, frames {frame_error:.2e}")
  assert latent_error < 1e-4
  assert frame_error < 1e-4
