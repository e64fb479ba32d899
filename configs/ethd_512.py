"""Stage `ethd` (docs/ARCHITECTURE.md §3.5, §3.7): ETHD on SVD-XT's UNet at 512² with 120-frame
windows, the paper's setting (Adam8bit, lr 1e-5, batch 1 per device, ≈200 A100-hours on 8 A100).

  etalk train --config configs/ethd_512.py --workdir runs/ethd \\
      --config.data.dataset_dir=data --config.ethd.init=svd:checkpoints/svd_xt \\
      --config.codec.folder=checkpoints/svd_xt --config.encoders.audio=ckpt/wav2vec2 \\
      --config.encoders.vision=runs/encoders/export/encoders \\
      --config.vaid.projector=runs/projector/export --config.vaid.dicte=runs/dicte/export

starts from the converted SVD-XT UNet (1,577,631,658 parameters with ETHD's layers), shards it
FSDP over every device, computes in bf16 over fp32 master weights with every res block and
transformer block rematerialised (~60 GB per device at 120 frames: benchmarks/train_memory.py),
and writes runs/ethd/export (`etalk_jax.ethd.model.load_ethd`).
Without `--config.ethd.init` the full config refuses to start (a random 1.58 G ETHD is not what
the paper trains). Half the references come from another clip of the same identity in another
emotion (`config.data.cross_clip_reference`, docs/ARCHITECTURE.md §3.11).
`configs/ethd_512.py:tiny` is the CPU size `etalk demo` trains: a two-level UNet on 16x16
pixel-shuffle latents of 64 px frames, 8-frame windows; it runs without an initialisation.
"""

import importlib.util
from pathlib import Path

from etalk_jax.train.config import base_config, use_large_model_settings


def _svd_xt_unet(resolution: int = 512, frames: int = 120) -> dict:
  """configs/svd_xt.py's UNet at `resolution`² (latents 8x smaller) and `frames`-frame windows."""
  spec = importlib.util.spec_from_file_location("svd_xt", Path(__file__).with_name("svd_xt.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return dict(module.get_config().unet, sample_size=resolution // 8, num_frames=frames)


# 64 px frames as 16x16x48 pixel-shuffle latents; one cross-attention level and one plain one.
TINY_UNET = dict(
    sample_size=16, in_channels=96, out_channels=48,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 64), addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12, layers_per_block=1, cross_attention_dim=32,
    transformer_layers_per_block=1, num_attention_heads=2, num_frames=8)


def ethd_fields(full: bool, resolution: int = 512, frames: int = 120) -> dict:
  # latent_target "absolute" denoises the codec's latents as SVD does; "reference_relative"
  # denoises (latent - portrait's latent) * target_scale (what `etalk demo` trains).
  # lip_statistics_batches > 0: the stage measures the per-dimension mean / std of its lip
  # stream (l_v in the encoder stage, l_a here) on that many batches and ETHD standardises
  # the lip latents with them (ETHDConfig.lip_mean / lip_std); 0 leaves them as they are.
  # require_init: refuse to start without `init` (the full sizes start from SVD-XT's UNet; a
  # random one there is a silent waste of the budget); the tiny sizes train from random.
  return dict(unet=_svd_xt_unet(resolution, frames) if full else TINY_UNET, window=5,
              added_time_ids=(24.0, 127.0, 0.02), init="", require_init=full,
              latent_target="absolute", target_scale=1.0,
              lip_statistics_batches=0 if full else 16)


def get_config(variant: str = "full"):
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/ethd_512.py knows the variants 'full' and 'tiny', not {variant!r}.")
  full = variant == "full"
  config = base_config("ethd", steps=200_000 if full else 400, lr=1e-5 if full else 1e-3,
                       batch_size=1 if full else 2, window=120 if full else 8)
  if full:
    use_large_model_settings(config)
  config.ethd = ethd_fields(full)
  # SVD's VAE (a folder of `etalk convert svd`), or the weight-free pixel-shuffle stand-in.
  config.codec = (dict(kind="vae", folder="") if full else
                  dict(kind="pixel_shuffle", factor=4, scale=2.0))
  # Training noise levels, ln sigma ~ N(p_mean, p_std²): SVD's (0.7, 1.6) for 512² video
  # latents; lower for the demo's 16x16 ones of std ~0.8, where the mouth is decided.
  config.sigma = dict(p_mean=0.7, p_std=1.6) if full else dict(p_mean=0.3, p_std=1.2)
  add_ethd_stage_fields(config, full, windows=(120, 24))
  return config


def add_ethd_stage_fields(config, full: bool, windows: tuple[int, int]) -> None:
  """What the ETHD stage reads besides the model, the codec and sigma (shared with
  configs/ethd_1024.py); `windows` (frames, overlap): the inference windows of this resolution
  (`etalk_jax.diffusion.sampling.WINDOWS_512` / `WINDOWS_1024`), recorded with the run."""
  # Half the references from another clip of the identity (another emotion where there is one):
  # EDI then learns to swap E_ref for E_dri (§3.11), and half stay same-clip, the case of a
  # portrait already in the wanted emotion, where EDI's Δ must stay near 0.
  config.data.cross_clip_reference = 0.5
  config.encoders = dict(audio="", vision="", audio_features={})
  # Frozen V-AID exports. dicte_steps: Di-CTE's DDIM steps for the driving e_a; 0 takes the
  # export's own sample_steps (25, what inference samples with); the tiny size 10 for CPU time.
  config.vaid = dict(projector="", dicte="", dicte_steps=0 if full else 10)
  config.expression_from_truth = 0.6  # the paper: ground-truth e with 0.6, else Di-CTE's
  config.condition_dropout = 0.05  # each of lip / expression / reference, for optional guidance
  config.lip_weight = 0.0 if full else 20.0  # extra loss weight inside the lip mask
  config.windows = dict(frames=windows[0], overlap=windows[1])
