"""Di-CTE (ARCHITECTURE.md §3.4): the diffusion transformer that turns speech into the sequence of
30-d expression latents e_a, trained on 220-frame windows with a clean 20-frame prefix.

  --config=configs/dicte.py         the full model (DiCTEConfig defaults)
  --config=configs/dicte.py:tiny    the sizes the CPU tests use (fits the tiny wav2vec2 and
                                    PD-FGC small encoders of tests/test_vaid_learning.py)

No command trains it yet: the training loop and its command arrive with the training issue.
What exists now builds the model from this config:

  config = get_config()
  dicte = DiCTE(DiCTEConfig(**config.dicte), rngs=nnx.Rngs(0))

which for "full" has 53,173,086 parameters (tests/test_vaid_configs.py checks this);
`etalk_jax.vaid.dicte.generate_expressions` then samples e_a for speech of any length with
`config.dicte.sample_steps` DDIM steps per window.
"""

import ml_collections


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/dicte.py knows the variants 'full' and 'tiny', not {variant!r}.")
  full = variant == "full"
  config = ml_collections.ConfigDict()
  # Fields of etalk_jax.vaid.dicte.DiCTEConfig.
  config.dicte = dict(
      expression_dim=30, condition_dim=30, window=5,
      audio_layers=12 if full else 3, audio_dim=768 if full else 16,
      dim=512 if full else 64, num_blocks=8 if full else 2, num_heads=8 if full else 4,
      ff_mult=4, timestep_features=256 if full else 16, image_channels=3,
      identity_channels=(32, 64, 128, 256) if full else (4, 8),
      window_frames=220, prefix_frames=20, prefix_probability=0.8,
      train_steps=1000, sample_steps=25, cosine_offset=0.008, max_beta=0.999)
  # Di-CTE's targets come from precomputed encoder outputs, so the loader skips the frames'
  # PD-FGC crops; the window is the training window.
  config.loader = dict(window=220, batch_size=1)
  return config
