"""V-AID: the audio-lip Perceiver projector (projector.py) and Di-CTE, the expression diffusion
model (dicte.py), saving and loading them (storage.py), and their training examples from
talking-head clips (data.py, imported on its own: it needs the audio and vision encoders)
(docs/ARCHITECTURE.md §3.3, §3.4)."""

from etalk_jax.vaid.dicte import (
  DICTE_FULL,
  DICTE_TINY,
  DiCTE,
  DiCTEConfig,
  DiTBlock,
  IdentityEncoder,
  cosine_alpha_bars,
  ddim_step,
  denoise_window,
  dicte_loss,
  generate_expressions,
  masked_x0_loss,
  sampling_schedule,
  sampling_timesteps,
  training_inputs,
  window_count,
)
from etalk_jax.vaid.projector import (
  PROJECTOR_FULL,
  PROJECTOR_TINY,
  AudioLipProjector,
  GeluFeedForward,
  PerceiverBlock,
  ProjectorConfig,
  projector_loss,
  pull_loss,
  push_loss,
  standardise,
)
from etalk_jax.vaid.storage import load_dicte, load_projector, save_vaid_model

__all__ = [
    "DICTE_FULL", "DICTE_TINY", "DiCTE", "DiCTEConfig", "DiTBlock", "IdentityEncoder",
    "cosine_alpha_bars", "ddim_step", "denoise_window", "dicte_loss", "generate_expressions",
    "masked_x0_loss", "sampling_schedule", "sampling_timesteps", "training_inputs",
    "window_count", "PROJECTOR_FULL", "PROJECTOR_TINY", "AudioLipProjector", "GeluFeedForward",
    "PerceiverBlock", "ProjectorConfig", "projector_loss", "pull_loss", "push_loss",
    "standardise", "load_dicte", "load_projector", "save_vaid_model",
]
