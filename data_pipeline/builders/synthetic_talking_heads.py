"""TFDS builder `synthetic_talking_heads`: procedural talking faces (data_pipeline.synthetic) in the
same record format as the real builders, plus exact per-frame ground truth.

Configs: `tiny` (tests: 64 px, 48 frames), `demo` (the CPU demo: 64 px, 12 identities, every emotion
and level, 150 frames), `res512` (loader benchmarks). Any `SyntheticConfig` can be passed instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import media, synthetic
from data_pipeline.builders import common


@dataclasses.dataclass(kw_only=True)
class SyntheticConfig(tfds.core.BuilderConfig):
  spec: synthetic.SyntheticSpec = dataclasses.field(default_factory=synthetic.SyntheticSpec)
  test_fraction: float = 0.1
  split_by_speaker: bool = False  # hold out whole identities instead of clips
  crf: int = 18


class SyntheticTalkingHeads(common.QuietBuilder):
  """Synthetic talking heads with ground-truth mouth opening, eye opening, pose and emotion."""

  VERSION = common.VERSION
  BUILDER_CONFIGS = [
    SyntheticConfig(name="tiny", description="tests: 64 px, 2 identities, 48 frames",
                    spec=synthetic.SyntheticSpec(identities=2,
                                                 emotions=("neutral", "happy", "sad", "angry"),
                                                 levels=(3,), num_frames=48, resolution=64)),
    SyntheticConfig(name="demo",
                    description=("CPU demo: 64 px, 12 identities x 8 emotions x 3 levels, "
                                 "150 frames"),
                    spec=synthetic.SyntheticSpec(identities=12, num_frames=150, resolution=64)),
    SyntheticConfig(name="res512", description="loader benchmarks: 512 px, 150 frames",
                    spec=synthetic.SyntheticSpec(identities=2,
                                                 emotions=("neutral", "happy", "angry"),
                                                 levels=(2,), num_frames=150, resolution=512)),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=common.clip_features(
        identity=tfds.features.Tensor(shape=(), dtype=np.int32),
        mouth_open=tfds.features.Tensor(shape=(None,), dtype=np.float32,
                                        doc="0 shut .. 1 wide, per frame"),
        eye_open=tfds.features.Tensor(shape=(None,), dtype=np.float32,
                                      doc="0 shut .. 1.6 wide, per frame"),
        pose=tfds.features.Tensor(shape=(None, 6), dtype=np.float32,
                                  doc="yaw, pitch, roll (degrees), tx, ty (crop fractions), scale"),
      ),
      homepage="https://github.com/etalk-jax",
    )

  def _split_generators(self, dl_manager):
    config: SyntheticConfig = self.builder_config
    items = list(config.spec.clips())
    key_of = (lambda item: item[0].speaker) if config.split_by_speaker else _clip_id
    assignment = common.split_of((key_of(item) for item in items), config.spec.seed,
                                 config.test_fraction)
    return {split: self._generate_examples(
                [item for item in items if assignment[key_of(item)] == split])
            for split in (common.TRAIN, common.TEST)}

  def _generate_examples(self, items):
    config: SyntheticConfig = self.builder_config
    spec = config.spec
    for identity, emotion, level, take in items:
      clip = spec.make_clip(identity, emotion, level, take)
      clip_id = _clip_id((identity, emotion, level, take))
      yield clip_id, {
        "clip_id": clip_id,
        "source": f"synthetic:seed={spec.seed}",
        "speaker": identity.speaker,
        "emotion": emotion,
        "level": np.int32(level),
        "num_frames": np.int32(spec.num_frames),
        "start_frame": np.int32(0),
        "video": media.encode_h264(clip.frames, crf=config.crf),
        "audio": clip.audio,
        "landmarks": clip.landmarks.astype(np.float16),
        "crop_box": np.array([0, 0, spec.resolution, spec.resolution], np.float32),
        "identity": np.int32(identity.index),
        "mouth_open": clip.mouth_open,
        "eye_open": clip.eye_open,
        "pose": clip.pose,
      }


def _clip_id(item) -> str:
  identity, emotion, level, take = item
  return f"{identity.speaker}_{emotion}_level{level}_{take:03d}"


def build(data_dir: str, config: str | SyntheticConfig = "tiny", progress: bool = True) -> str:
  """Prepares the synthetic dataset under `data_dir` (no-op if already there); returns its
  directory. progress: TFDS's progress bars while it writes."""
  with common.tfds_progress(progress):
    builder = SyntheticTalkingHeads(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  return str(builder.data_path)
