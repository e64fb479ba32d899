"""V-AID's audio-lip projector (ARCHITECTURE.md §3.3): the Perceiver that maps wav2vec2 windows
A_w to lip latents l_a in PD-FGC's mouth-feature space, and the encoders whose outputs it reads.

  --config=configs/vaid.py         the full model (ProjectorConfig defaults, wav2vec2-base, PD-FGC)
  --config=configs/vaid.py:tiny    the sizes the CPU tests use

No command trains it yet: the training loop and its command arrive with the training issue.
What exists now builds the model and its training examples from this config:

  config = get_config()
  projector = AudioLipProjector(ProjectorConfig(**config.projector), rngs=nnx.Rngs(0))

which for "full" has 29,381,120 parameters (tests/test_vaid_configs.py checks this), and
`etalk_jax.vaid.data.VAIDFeaturizer` turns loader batches of `config.loader.window` frames into
(A_w, l_v, e_v, x_ref) examples.
"""

import ml_collections


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/vaid.py knows the variants 'full' and 'tiny', not {variant!r}.")
  full = variant == "full"
  config = ml_collections.ConfigDict()
  # Fields of etalk_jax.vaid.projector.ProjectorConfig. The audio sizes match wav2vec2-base's 12
  # transformer layers of width 768; output_dim matches PD-FGC's 512-d mouth feature l_v.
  config.projector = dict(
      window=5, audio_layers=12 if full else 3, audio_dim=768 if full else 16,
      dim=768 if full else 32, num_blocks=4 if full else 2, num_heads=8 if full else 4,
      ff_mult=4, output_dim=512 if full else 32, use_push=False, push_weight=0.1)
  # Which frozen encoders produce A_w (a converted wav2vec2 folder) and l_v (PD-FGC).
  config.audio_encoder = "wav2vec2-base" if full else "tiny-random"
  config.vision_encoder = "pdfgc_full" if full else "pdfgc_small"
  config.loader = dict(window=120 if full else 48, batch_size=1)
  return config
