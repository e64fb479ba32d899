"""Stage `vaid`: V-AID's projector and Di-CTE trained together, so that the push term can train
(docs/ARCHITECTURE.md §3.3, §3.4): the paper's ablation of the push loss.

Data: loader windows of `config.dicte.window_frames` frames (the projector reads any length), A_w,
l_v, e_v, x_ref and e_ref as the projector and Di-CTE stages featurise them (`common.vaid_data`).
Loss: the projector stage's `projector_loss` (L1 pull of l_a to l_v, plus `config.push_weight` x
the push: the mean squared cross-correlation between standardised l_a and e_a over the batch's
frames, e_a being Di-CTE's x0 prediction of the same windows) + the Di-CTE stage's `dicte_loss`,
with Di-CTE's condition drawn as that stage draws it (`common.dicte_condition`). The push weight
is 0 by default: the paper's main setting trains without it (§3.3), and at 0 the stage is the two
stages' objectives side by side. The push pulls on both models: l_a and e_a both decorrelate.
Export: export/projector and export/dicte (`etalk_jax.vaid.storage.load_projector` / `load_dicte`),
what the ETHD stage's `config.vaid.projector` / `.dicte` name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from etalk_jax.errors import UserError
from etalk_jax.train.loop import Task
from etalk_jax.train.stages import common
from etalk_jax.vaid.dicte import DiCTE, DiCTEConfig, dicte_loss
from etalk_jax.vaid.projector import AudioLipProjector, ProjectorConfig, projector_loss
from etalk_jax.vaid.storage import save_vaid_model


class VAIDModels(nnx.Module):
  """The projector and Di-CTE under one root, so one optimizer trains both."""

  def __init__(self, projector: AudioLipProjector, dicte: DiCTE):
    self.projector = projector
    self.dicte = dicte


def make_task(config, mesh) -> Task:
  featurizer = common.featurizer(config)
  push_weight = float(config.push_weight)
  if push_weight < 0:
    raise UserError(f"config.push_weight={push_weight}: the push term's weight must be >= 0")
  # The push switch and weight are this stage's (config.push_weight), not the projector's fields.
  projector_config = dataclasses.replace(
      featurizer.projector_config(ProjectorConfig(**config.projector)),
      use_push=push_weight > 0, push_weight=push_weight)
  dicte_config = featurizer.dicte_config(DiCTEConfig(**{
      name: tuple(value) if isinstance(value, list) else value
      for name, value in config.dicte.items()}))
  compute = common.compute_of(config)
  model = common.build_sharded(
      lambda rngs: VAIDModels(AudioLipProjector(projector_config, compute=compute, rngs=rngs),
                              DiCTE(dicte_config, compute=compute, rngs=rngs)), mesh, config)
  from_clip = float(config.condition_from_clip)
  batches, examples_of = common.vaid_data(config, featurizer, window=dicte_config.window_frames)

  def featurize(batch):
    examples = examples_of(batch)
    return {"audio_windows": examples.audio_windows, "lip": examples.lip,
            "expression": examples.expression, "reference": examples.reference,
            "reference_expression": examples.reference_expression,
            "cross_clip": batch["cross_clip"]}

  def loss(model, batch, key):
    condition, loss_key = common.draw_dicte_condition(batch, key, from_clip)
    expression_loss, expression_audio = dicte_loss(
        model.dicte, loss_key, batch["expression"], batch["audio_windows"], batch["reference"],
        condition, with_prediction=True)
    lip_loss, parts = projector_loss(model.projector.config,
                                     model.projector(batch["audio_windows"]), batch["lip"],
                                     expression_audio)
    return lip_loss + expression_loss, {**parts, "dicte": expression_loss}

  def export(model, folder: Path):
    save_vaid_model(model.projector, Path(folder) / "projector", overwrite=True)
    save_vaid_model(model.dicte, Path(folder) / "dicte", overwrite=True)

  return Task(name="vaid", model=model, trainable=nnx.Param, loss=loss, batches=batches,
              featurize=featurize, export=export, batch_size=int(config.data.batch_size),
              held_out=lambda: common.vaid_data(common.held_out_config(config), featurizer,
                                                window=dicte_config.window_frames)[0])
