"""Stage `encoders` (docs/ARCHITECTURE.md §2, §3.9): the lip / expression adapters on the frozen
PD-FGC trunk, pre-trained by self-driven dropout reconstruction with an ETHD renderer.

  etalk train --config configs/encoders.py --workdir runs/encoders \\
      --config.data.dataset_dir=data --config.encoders.vision=checkpoints/pdfgc \\
      --config.ethd.init=svd:checkpoints/svd_xt --config.codec.folder=checkpoints/svd_xt

writes runs/encoders/export/encoders (`vision.params.load_encoders`: the lip and expression
encoders every later stage reads) and export/renderer (an ETHD the `ethd` stage may start from).
Without `--config.ethd.init` the full config refuses to start (its renderer starts from SVD-XT).
References always come from the window's own clip (self-driven reconstruction).
`configs/encoders.py:tiny` is the CPU size `etalk demo` trains; it runs without an initialisation.
"""

import importlib.util
from pathlib import Path

from etalk_jax.train.config import base_config, use_large_model_settings


def get_config(variant: str = "full"):
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/encoders.py knows the variants 'full' and 'tiny', not {variant!r}.")
  full = variant == "full"
  # The renderer is an ETHD of the same sizes as the ethd stage's (configs/ethd_512.py).
  spec = importlib.util.spec_from_file_location("ethd_512", Path(__file__).with_name("ethd_512.py"))
  ethd_512 = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ethd_512)
  config = base_config("encoders", steps=50_000 if full else 300, lr=1e-5 if full else 1e-3,
                       batch_size=1 if full else 2, window=120 if full else 8)
  if full:
    use_large_model_settings(config)
  config.ethd = ethd_512.ethd_fields(full)
  config.codec = (dict(kind="vae", folder="") if full else
                  dict(kind="pixel_shuffle", factor=4, scale=2.0))
  # Training noise levels, ln sigma ~ N(p_mean, p_std²): SVD's (0.7, 1.6) for 512² video
  # latents; lower for the demo's 16x16 ones of std ~0.8, where the mouth is decided.
  config.sigma = dict(p_mean=0.7, p_std=1.6) if full else dict(p_mean=0.3, p_std=1.2)
  # Same speaker, same clip: the reconstruction is self-driven.
  config.data.cross_clip_reference = 0.0
  config.encoders = dict(vision="")
  # Drop lip / drop expression / keep both (the paper gives no probabilities: equal).
  config.mode_probabilities = (1 / 3, 1 / 3, 1 / 3)
  return config
