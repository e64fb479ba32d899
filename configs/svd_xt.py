"""Stable Video Diffusion XT (img2vid-xt): the UNet and temporal VAE that ETHD starts from.

Fields mirror diffusers' config.json files of `stable-video-diffusion-img2vid-xt` (unet/, vae/).
Convert the released weights (a diffusers pipeline folder you downloaded) with

  etalk convert svd --src stable-video-diffusion-img2vid-xt --dst checkpoints/svd_xt

which writes checkpoints/svd_xt/{unet,vae}/ (config.json + Orbax state) and prints
"unet: 1428 tensors, 1,524,623,082 parameters" and "vae: 374 tensors, 97,742,847 parameters".
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.unet = dict(
      sample_size=96, in_channels=8, out_channels=4,
      down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
      up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
      block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256,
      projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
      transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20), num_frames=25)
  config.vae = dict(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
      block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
      sample_size=768, scaling_factor=0.18215, force_upcast=True)
  # How the models compute: "auto" = cuDNN on GPUs (bf16 calls), splash on TPUs, XLA elsewhere
  # (see etalk_jax/layers/attention.py); "xla" everywhere.
  config.attention = "auto"
  return config
