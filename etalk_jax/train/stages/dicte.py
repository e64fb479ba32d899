"""Stage `dicte`: Di-CTE, the expression diffusion transformer (docs/ARCHITECTURE.md §3.4).

Data: loader windows of `config.dicte.window_frames` frames; A_w and e_v from the frozen encoders on
the host, or read from config.data.precomputed. Condition: the window's mean e_v (an utterance-level
expression, what the emotion codebook's per-keyword means stand in for at inference) with
probability `config.condition_from_clip`, else e_ref = ExpEncoder(x_ref) (the "uncond." case, no
emotion given); always the mean e_v when the reference comes from another clip
(`config.data.cross_clip_reference`, `common.dicte_condition`). Loss: x0 MSE with the clean 20-frame
prefix (probability 0.8) carrying no loss.
Export: Di-CTE in our format (`etalk_jax.vaid.storage.load_dicte`).
"""

from __future__ import annotations

from flax import nnx

from etalk_jax.train.loop import Task
from etalk_jax.train.stages import common
from etalk_jax.vaid.dicte import DiCTE, DiCTEConfig, dicte_loss
from etalk_jax.vaid.storage import save_vaid_model


def make_task(config, mesh) -> Task:
  featurizer = common.featurizer(config)
  dicte_config = featurizer.dicte_config(DiCTEConfig(**{
      name: tuple(value) if isinstance(value, list) else value
      for name, value in config.dicte.items()}))
  compute = common.compute_of(config)
  model = common.build_sharded(lambda rngs: DiCTE(dicte_config, compute=compute, rngs=rngs),
                               mesh, config)
  from_clip = float(config.condition_from_clip)

  batches, examples_of = common.vaid_data(config, featurizer, window=dicte_config.window_frames)

  def featurize(batch):
    examples = examples_of(batch)
    return {"audio_windows": examples.audio_windows, "expression": examples.expression,
            "reference": examples.reference,
            "reference_expression": examples.reference_expression,
            "cross_clip": batch["cross_clip"]}

  def loss(model, batch, key):
    condition, loss_key = common.draw_dicte_condition(batch, key, from_clip)
    value = dicte_loss(model, loss_key, batch["expression"], batch["audio_windows"],
                       batch["reference"], condition)
    return value, {}

  return Task(name="dicte", model=model, trainable=nnx.Param, loss=loss,
              batches=batches, featurize=featurize,
              held_out=lambda: common.vaid_data(common.held_out_config(config), featurizer,
                                                window=dicte_config.window_frames)[0],
              export=lambda model, folder: save_vaid_model(model, folder, overwrite=True),
              batch_size=int(config.data.batch_size))
