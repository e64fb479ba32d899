"""Stage `projector` of V-AID (docs/ARCHITECTURE.md §3.3): the Perceiver that maps wav2vec2 windows
A_w to lip latents l_a in the lip encoder's space, trained by the L1 pull to l_v.

  etalk train --config configs/vaid.py --workdir runs/projector \\
      --config.data.dataset_dir=data --config.encoders.audio=ckpt/wav2vec2 \\
      --config.encoders.vision=ckpt/encoders

trains the full model (29,381,120 parameters; the paper: Adam lr 1e-4, batch 16, ≈20 A100-hours
for V-AID) and writes runs/projector/export (load with `etalk_jax.vaid.storage.load_projector`).
`configs/vaid.py:tiny` is the size the CPU tests and `etalk demo` use; its pull loss falls ~10x in a
few hundred steps on the synthetic set.
"""

from etalk_jax.train.config import base_config


def get_config(variant: str = "full"):
  if variant not in ("full", "tiny"):
    raise ValueError(f"configs/vaid.py knows the variants 'full' and 'tiny', not {variant!r}.")
  full = variant == "full"
  config = base_config("projector", steps=100_000 if full else 300, lr=1e-4 if full else 3e-3,
                       batch_size=16 if full else 4, window=120 if full else 48)
  # Fields of etalk_jax.vaid.projector.ProjectorConfig. The audio sizes and output_dim are taken
  # from the encoders the run reads (wav2vec2-base: 12 layers of 768; PD-FGC: 512-d l_v).
  config.projector = dict(
      window=5, audio_layers=12 if full else 3, audio_dim=768 if full else 16,
      dim=768 if full else 32, num_blocks=4 if full else 2, num_heads=8 if full else 4,
      ff_mult=4, output_dim=512 if full else 32, use_push=False, push_weight=0.1)
  # Frozen encoders: a folder of `etalk convert wav2vec2` and one of `etalk convert pdfgc` (or the
  # encoder stage's export with trained adapters); FeatureConfig overrides.
  config.encoders = dict(audio="", vision="", audio_features={})
  return config
