"""Stage `ser` (docs/ARCHITECTURE.md §1, MEC): the speech-emotion head on frozen WavLM, trained on
emotion-labelled speech (MEAD; the synthetic set is labelled too).

  etalk train --config configs/ser.py --workdir runs/ser \\
      --config.data.dataset_dir=data --config.encoders.wavlm=checkpoints/wavlm

writes runs/ser/export (`etalk_jax.emotion.ser.load_ser`). `configs/ser.py:tiny` is the CPU size.
"""

from etalk_jax.train.config import base_config


def get_config(variant: str = "full"):
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/ser.py knows the variants 'full' and 'tiny', not {variant!r}.")
  full = variant == "full"
  config = base_config("ser", steps=20_000 if full else 200, lr=1e-4 if full else 3e-3,
                       batch_size=16 if full else 8, window=75 if full else 48)
  # Fields of etalk_jax.emotion.ser.SERConfig beyond the WavLM sizes (read from the encoder).
  config.ser = dict(head_dim=256 if full else 32, dropout=0.1)
  config.encoders = dict(wavlm="", audio_features={})
  return config
