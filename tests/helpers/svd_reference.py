"""Tiny random-init diffusers SVD models and their inputs, shared by the SVD tests."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
  AutoencoderKLTemporalDecoder,
  EulerDiscreteScheduler,
  UNetSpatioTemporalConditionModel,
)

# Three levels, two layers per block, per-level heads, batch 2 x 3 frames: the main case.
UNET_THREE_LEVELS = dict(
    sample_size=16, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                      "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 64, 64), addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24, layers_per_block=2, cross_attention_dim=40,
    transformer_layers_per_block=1, num_attention_heads=(2, 4, 4), num_frames=3)

# Two levels, one layer per block, two transformer layers, attention at the bottom level only.
UNET_TWO_LEVELS = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
    up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
    block_out_channels=(32, 64), addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12, layers_per_block=1, cross_attention_dim=16,
    transformer_layers_per_block=2, num_attention_heads=2, num_frames=2)

VAE_TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                block_out_channels=(32, 64), layers_per_block=1, latent_channels=4)
VAE_THREE_LEVELS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=4)


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Moves every parameter off its init (norm scales of 1, zero biases, alpha 0.5), so that a
  mapping error anywhere changes the output."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      noise = torch.randn(param.shape, generator=generator)
      scale = param.std() if param.numel() > 1 and param.std() > 0 else torch.tensor(0.1)
      param.add_(noise * 0.5 * scale)
  return model.eval()


def make_unet(fields: dict, seed: int = 0):
  torch.manual_seed(seed)
  return perturb(UNetSpatioTemporalConditionModel(**fields), seed)


def make_vae(fields: dict, seed: int = 0):
  torch.manual_seed(seed)
  return perturb(AutoencoderKLTemporalDecoder(**fields), seed)


def svd_scheduler():
  """SVD-XT's scheduler_config.json, field for field."""
  return EulerDiscreteScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
      prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
      use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0, interpolation_type="linear",
      timestep_type="continuous", num_train_timesteps=1000)


def unet_inputs(fields: dict, batch: int = 2, frames: int | None = None, context_len: int = 2,
                seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  frames = frames or fields["num_frames"]
  size = fields["sample_size"]
  ids = fields["projection_class_embeddings_input_dim"] // fields["addition_time_embed_dim"]
  return {
      "sample": rng.standard_normal((batch, frames, size, size, fields["in_channels"]),
                                    dtype=np.float32),
      "timestep": np.float32(0.25 * np.log(3.7)),
      "encoder_hidden_states": rng.standard_normal(
          (batch, context_len, fields["cross_attention_dim"]), dtype=np.float32),
      "added_time_ids": np.tile(np.array([[6.0, 127.0, 0.02]] * (ids // 3), np.float32)
                                .reshape(1, -1), (batch, 1)),
  }


def run_torch_unet(model, inputs: dict[str, np.ndarray], *, autocast_bf16: bool = False
                   ) -> np.ndarray:
  """The diffusers UNet on the device its parameters are on (channels-last in and out), in
  fp32 or under bf16 autocast."""
  device = next(model.parameters()).device
  to_device = lambda x: torch.as_tensor(x).to(device)
  with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast_bf16):
    out = model(to_device(inputs["sample"]).permute(0, 1, 4, 2, 3),
                to_device(inputs["timestep"]),
                to_device(inputs["encoder_hidden_states"]),
                to_device(inputs["added_time_ids"])).sample
  return out.permute(0, 1, 3, 4, 2).float().cpu().numpy()


def svd_context_as_tokens(inputs, window=5, reference=None):
  """SVD's one context embedding per clip as ETHD's lip, expression and reference tokens."""
  batch, frames = inputs["sample"].shape[:2]
  embedding = inputs["encoder_hidden_states"]  # (batch, 1, dim)
  per_frame = np.repeat(embedding[:, None], frames, axis=1).reshape(batch * frames, 1, -1)
  tokens = np.repeat(per_frame, window, axis=1)
  conditions = {
      "expression_tokens": tokens,
      "expression_mask": np.ones((batch * frames, 1, 1, window), bool),
      "reference_tokens": per_frame if reference is None else reference,
      "face_mask": np.ones((batch,) + inputs["sample"].shape[2:4], np.float32),
  }
  return tokens, conditions


def relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())
