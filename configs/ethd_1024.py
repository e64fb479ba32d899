"""Stage `ethd` (docs/ARCHITECTURE.md §3.5, §3.7) at the paper's second setting: 1024² frames
(128x128 latents) with 32-frame windows, overlapping by 12 at inference.

  etalk train --config configs/ethd_1024.py --workdir runs/ethd_1024 \\
      --config.data.dataset_dir=data1024 --config.ethd.init=svd:checkpoints/svd_xt \\
      --config.codec.folder=checkpoints/svd_xt --config.encoders.audio=ckpt/wav2vec2 \\
      --config.encoders.vision=runs/encoders/export/encoders \\
      --config.vaid.projector=runs/projector/export --config.vaid.dicte=runs/dicte/export

starts from the converted SVD-XT UNet (or `--config.ethd.init=ethd:runs/ethd/export`, the 512²
run, which has the same weights: only sample_size and num_frames differ), shards it FSDP over
every device in bf16 with every block rematerialised, and writes runs/ethd_1024/export. Without
`--config.ethd.init` it refuses to start. The dataset must be prepared at 1024 px.
`configs/ethd_1024.py:tiny` is a CPU size with the same shape of change from ethd_512:tiny: 64 px
frames as 32x32 pixel-shuffle latents (4x the latents of ethd_512:tiny) and 4x shorter
(2-frame) windows; it runs without an initialisation.
"""

import importlib.util
from pathlib import Path

from etalk_jax.train.config import base_config, use_large_model_settings

RESOLUTION, FRAMES, OVERLAP = 1024, 32, 12


def _ethd_512():
  spec = importlib.util.spec_from_file_location("ethd_512", Path(__file__).with_name("ethd_512.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(variant: str = "full"):
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/ethd_1024.py knows the variants 'full' and 'tiny', not {variant!r}.")
  full = variant == "full"
  ethd_512 = _ethd_512()
  config = base_config("ethd", steps=200_000 if full else 400, lr=1e-5 if full else 1e-3,
                       batch_size=1 if full else 2, window=FRAMES if full else 2)
  if full:
    use_large_model_settings(config)
  config.ethd = ethd_512.ethd_fields(full, RESOLUTION, FRAMES)
  if not full:  # 64 px frames -> 32x32x12 latents, 2-frame windows
    config.ethd.unet = dict(ethd_512.TINY_UNET, sample_size=32, in_channels=24, out_channels=12,
                            num_frames=2)
  config.codec = (dict(kind="vae", folder="") if full else
                  dict(kind="pixel_shuffle", factor=2, scale=2.0))
  # SVD's training noise levels; EDM's log-normal is not resolution-scaled in SVD's recipe.
  config.sigma = dict(p_mean=0.7, p_std=1.6) if full else dict(p_mean=0.3, p_std=1.2)
  ethd_512.add_ethd_stage_fields(config, full, windows=(FRAMES, OVERLAP) if full else (2, 0))
  return config
