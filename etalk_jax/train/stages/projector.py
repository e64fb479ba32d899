"""Stage `projector`: the audio-lip Perceiver projector (docs/ARCHITECTURE.md §3.3).

Data: loader windows of `config.data.window` frames; frozen wav2vec2 -> A_w and frozen lip
encoder -> l_v on the host (`VAIDFeaturizer`), or read from config.data.precomputed. Loss: L1
pull of l_a = projector(A_w) to l_v (plus the push term when `config.projector.use_push`, which
needs Di-CTE's e_a and is off by default).
Export: the projector in our format (`etalk_jax.vaid.storage.load_projector`).
"""

from __future__ import annotations

from flax import nnx

from etalk_jax.errors import UserError
from etalk_jax.train.loop import Task
from etalk_jax.train.stages import common
from etalk_jax.vaid.projector import AudioLipProjector, ProjectorConfig, projector_loss
from etalk_jax.vaid.storage import save_vaid_model


def make_task(config, mesh) -> Task:
  featurizer = common.featurizer(config)
  projector_config = featurizer.projector_config(ProjectorConfig(**config.projector))
  if projector_config.use_push:
    raise UserError("config.projector.use_push needs Di-CTE's e_a during projector training, "
                    "which this stage does not run; leave it off")
  compute = common.compute_of(config)
  model = common.build_sharded(
      lambda rngs: AudioLipProjector(projector_config, compute=compute, rngs=rngs), mesh, config)

  batches, examples_of = common.vaid_data(config, featurizer)

  def featurize(batch):
    examples = examples_of(batch)
    return {"audio_windows": examples.audio_windows, "lip": examples.lip}

  def loss(model, batch, key):
    del key
    return projector_loss(model.config, model(batch["audio_windows"]), batch["lip"])

  return Task(name="projector", model=model, trainable=nnx.Param, loss=loss,
              batches=batches, featurize=featurize,
              held_out=lambda: common.vaid_data(common.held_out_config(config), featurizer)[0],
              export=lambda model, folder: save_vaid_model(model, folder, overwrite=True),
              batch_size=int(config.data.batch_size))
