"""Stage `vaid` (docs/ARCHITECTURE.md §3.3, §3.4): the projector and Di-CTE trained together, with
the push term between l_a and e_a on a weight (0 by default, the paper's main setting):

  etalk train --config configs/vaid_joint.py --workdir runs/vaid \\
      --config.data.dataset_dir=data --config.encoders.audio=ckpt/wav2vec2 \\
      --config.encoders.vision=ckpt/encoders --config.push_weight=0.1

trains both models at configs/vaid.py's and configs/dicte.py's sizes on Di-CTE's 220-frame
windows (Adam lr 1e-4, batch 16) and writes runs/vaid/export/projector and export/dicte, which
the ETHD stage reads (`--config.vaid.projector=runs/vaid/export/projector`). The metrics hold
pull, dicte and, with a push weight above 0, push: run it at 0 and at 0.1 for the ablation.
`configs/vaid_joint.py:tiny` is the CPU size (both tiny models, 48-frame windows).
"""

import importlib.util
from pathlib import Path

from etalk_jax.train.config import base_config


def _config_of(name: str, variant: str):
  spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(variant: str = "full"):
  if variant not in ("full", "tiny"):
    raise ValueError("configs/vaid_joint.py knows the variants 'full' and 'tiny', not "
                     f"{variant!r}.")
  full = variant == "full"
  projector, dicte = _config_of("vaid", variant), _config_of("dicte", variant)
  config = base_config("vaid", steps=100_000 if full else 300, lr=1e-4 if full else 3e-3,
                       batch_size=16 if full else 4, window=dicte.data.window)
  config.projector = dict(projector.projector)  # its use_push / push_weight are set from below
  config.dicte = dict(dicte.dicte)
  config.condition_from_clip = float(dicte.condition_from_clip)
  # Weight of the push term (mean squared cross-correlation of standardised l_a and e_a); 0 = off.
  config.push_weight = 0.0
  config.encoders = dict(audio="", vision="", audio_features={})
  return config
