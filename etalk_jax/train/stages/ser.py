"""Stage `ser`: the speech-emotion head on frozen WavLM states (docs/ARCHITECTURE.md §1, MEC).

Data: loader windows without pixels (audio and the clip's emotion label); WavLM hidden states
per 25 fps frame on the host (`AudioFeatures.frame_states`). Loss: cross-entropy over the 8
keywords; windows whose label is not one of them (MEAD's contempt) carry no loss.
Export: the head in our format (`etalk_jax.emotion.ser.load_ser`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from etalk_jax.audio import AudioFeatures, FeatureConfig
from etalk_jax.audio.features import normalize
from etalk_jax.audio.params import load_wavlm
from etalk_jax.emotion.ser import SERConfig, SpeechEmotionHead, save_ser
from etalk_jax.train.loop import Task
from etalk_jax.train.stages import common


def make_task(config, mesh) -> Task:
  features = AudioFeatures(load_wavlm(common.required_folder(config, "wavlm")),
                           FeatureConfig(**dict(config.encoders.get("audio_features", {}))))
  head_config = SERConfig.for_audio(features, **dict(config.ser))
  compute = common.compute_of(config)
  model = common.build_sharded(lambda rngs: SpeechEmotionHead(head_config, compute=compute,
                                                              rngs=rngs), mesh, config)

  def featurize(batch):
    states = np.stack([np.asarray(features.frame_states(normalize(np.asarray(audio), stats),
                                                        what=f"clip {clip_id}"))
                       for audio, stats, clip_id in zip(batch["audio"], batch["utterance_stats"],
                                                        batch["clip_id"])])
    return {"states": states, "mask": np.ones(states.shape[:2], bool),
            "labels": common.emotion_indices(batch["emotion"])}

  def loss(model, batch, key):
    labels = batch["labels"]
    logits = model(batch["states"], batch["mask"], dropout_key=key).astype(jnp.float32)
    known = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    count = jnp.maximum(known.sum(), 1.0)
    accuracy = jnp.sum(known * (logits.argmax(-1) == safe)) / count
    return jnp.sum(known * per_example) / count, {"accuracy": accuracy}

  return Task(name="ser", model=model, trainable=nnx.Param, loss=loss,
              batches=common.loader_iterator(config, with_frames=False, with_reference=False,
                                             with_masks=False),
              held_out=lambda: common.loader_iterator(common.held_out_config(config),
                                                      with_frames=False, with_reference=False,
                                                      with_masks=False),
              featurize=featurize,
              export=lambda model, folder: save_ser(model, folder, overwrite=True),
              batch_size=int(config.data.batch_size))
