"""Training stages: each module's `make_task(config, mesh) -> Task` is a config, a loss and a data
spec for `etalk_jax.train.loop.train` (docs/ARCHITECTURE.md §1: what trains, what stays frozen).

  encoders   lip / expression adapters (+ the renderer ETHD) by self-driven dropout reconstruction
  projector  the audio-lip Perceiver projector: A_w -> l_a, pulled to l_v
  dicte      Di-CTE: A_w, x_ref, condition -> e_a (x0 diffusion on e_v windows)
  vaid       projector and Di-CTE together, with the push term between l_a and e_a
  ethd       ETHD: EDM denoising of video latents under l_a, e (ground truth or Di-CTE) and x_ref
  ser        the speech-emotion head on frozen WavLM states
"""

from __future__ import annotations

import importlib

from etalk_jax.errors import UserError

STAGES = ("encoders", "projector", "dicte", "vaid", "ethd", "ser")


def make_task(config, mesh):
  """The `Task` of `config.stage`."""
  stage = config.get("stage")
  if stage not in STAGES:
    raise UserError(f"config.stage={stage!r} is not a training stage; use one of "
                    f"{', '.join(STAGES)}")
  return importlib.import_module(f"etalk_jax.train.stages.{stage}").make_task(config, mesh)
