"""Stage `dicte` (docs/ARCHITECTURE.md §3.4): Di-CTE, the diffusion transformer that turns speech
into 30-d expression latents e_a, trained on 220-frame windows with a clean 20-frame prefix.

  etalk train --config configs/dicte.py --workdir runs/dicte \\
      --config.data.dataset_dir=data --config.encoders.audio=ckpt/wav2vec2 \\
      --config.encoders.vision=ckpt/encoders

trains the full model (53,173,086 parameters; the paper: Adam lr 1e-4, batch 16) and writes
runs/dicte/export (`etalk_jax.vaid.storage.load_dicte`). `configs/dicte.py:tiny` is the CPU size
(48-frame windows, 8-frame prefix) that the tests and `etalk demo` train.
"""

from etalk_jax.train.config import base_config


def get_config(variant: str = "full"):
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/dicte.py knows the variants 'full' and 'tiny', not {variant!r}.")
  full = variant == "full"
  config = base_config("dicte", steps=100_000 if full else 300, lr=1e-4 if full else 3e-3,
                       batch_size=16 if full else 4, window=220 if full else 48)
  # Fields of etalk_jax.vaid.dicte.DiCTEConfig; the audio and expression sizes are taken from the
  # encoders the run reads.
  config.dicte = dict(
      expression_dim=30, condition_dim=30, window=5,
      audio_layers=12 if full else 3, audio_dim=768 if full else 16,
      dim=512 if full else 64, num_blocks=8 if full else 2, num_heads=8 if full else 4,
      ff_mult=4, timestep_features=256 if full else 16, image_channels=3,
      identity_channels=(32, 64, 128, 256) if full else (4, 8),
      window_frames=220 if full else 48, prefix_frames=20 if full else 8,
      prefix_probability=0.8, train_steps=1000, sample_steps=25, cosine_offset=0.008,
      max_beta=0.999)
  # Probability that the condition is the window's mean e_v (an utterance emotion) rather than
  # e_ref (no emotion given).
  config.condition_from_clip = 0.5
  config.encoders = dict(audio="", vision="", audio_features={})
  return config
