"""TFDS builder `precomputed_talking_heads`: a prepared dataset's clips with the outputs of the
frozen encoders ETHD training reads, so training at scale decodes no video and runs no encoder.

Each record is the source clip's record (`common.clip_features`: the H.264 bytes stay, as Di-CTE
reads the reference frame's pixels, a single keyframe decode) plus, per frame, in float16:
  latents       (n, h, w, c)        the latent codec's encoding (SVD's VAE or pixel shuffle)
  lip           (n, lip_dim)        l_v of the lip encoder
  expression    (n, expression_dim) e_v of the expression encoder (also gives e_ref of any frame)
  audio_states  (n, layers, hidden) the speech encoder's per-frame hidden states; the ±2-frame
                A_w windows are rebuilt at load time (`audio.features.frame_windows`), 5x smaller
and `resolution`, the crop's size in pixels, for the reference frame's masks from its landmarks.

The records are computed by `etalk precompute` (etalk_jax.train.precompute), which passes the
examples to write through the config (`PrecomputedConfig.examples`); only Tensor / Text /
ClassLabel / bytes features, so no TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline.builders import common
from etalk_jax.errors import UserError


@dataclasses.dataclass(kw_only=True)
class PrecomputedConfig(tfds.core.BuilderConfig):
  latent_shape: tuple[int, int, int] = (0, 0, 0)  # (h, w, c) of one frame's latents
  lip_dim: int = 0
  expression_dim: int = 0
  audio_layers: int = 0
  audio_dim: int = 0
  split: str = common.TRAIN
  # () -> (key, record) pairs of the one split this config writes.
  examples: Callable[[], Iterable[tuple[str, dict[str, Any]]]] | None = None


class PrecomputedTalkingHeads(common.QuietBuilder):
  """Clips of a prepared dataset with their latents, l_v, e_v and speech-encoder states."""

  VERSION = common.VERSION

  def _info(self) -> tfds.core.DatasetInfo:
    config: PrecomputedConfig = self.builder_config
    # Raw bytes: TFDS would otherwise store float16 as a float32 FloatList, filled value by value
    # (70 s of a 120 s precompute of the demo's 144 clips, and twice the size on disk).
    per_frame = lambda *shape, doc: tfds.features.Tensor(shape=(None, *shape), dtype=np.float16,
                                                         encoding="bytes", doc=doc)
    return self.dataset_info_from_configs(
      features=common.clip_features(
        latents=per_frame(*config.latent_shape, doc="latent codec output per frame"),
        lip=per_frame(config.lip_dim, doc="l_v, the lip encoder's output per frame"),
        expression=per_frame(config.expression_dim, doc="e_v, the expression encoder's per frame"),
        audio_states=per_frame(config.audio_layers, config.audio_dim,
                               doc="speech-encoder hidden states per frame (A_w without windows)"),
        resolution=tfds.features.Tensor(shape=(), dtype=np.int32, doc="crop size in pixels"),
      ),
      homepage="https://github.com/etalk-jax",
    )

  def _split_generators(self, dl_manager):
    config: PrecomputedConfig = self.builder_config
    return {config.split: self._generate_examples()}

  def _generate_examples(self):
    config: PrecomputedConfig = self.builder_config
    if config.examples is None:
      raise UserError("precomputed_talking_heads is written by `etalk precompute`, not prepared "
                      "on its own")
    yield from config.examples()


def build(data_dir: str, config: PrecomputedConfig) -> str:
  """Writes the records `config.examples` yields under `data_dir`; returns the dataset directory.

  TFDS's own progress bars are off meanwhile: the caller shows one (or none, when asked for none).
  """
  with common.tfds_progress(False):
    builder = PrecomputedTalkingHeads(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  return str(builder.data_path)
