"""What every talking-head record holds, and the seeded train/test split.

Only `Tensor`, `Text`, `ClassLabel` and bytes features: TFDS's Image/Video/Audio features would
import TensorFlow, and the whole pipeline must run without it (the tests check `sys.modules`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from data_pipeline import EMOTION_LABELS, NUM_LANDMARKS

VERSION = tfds.core.Version("1.0.0")
TRAIN, TEST = "train", "test"

# TFDS announces every config passed as an object ("Using custom data configuration ...", an absl
# warning): all of ours are, so it says nothing to a user.
logging.getLogger("absl").addFilter(
    lambda record: not record.getMessage().startswith("Using custom data configuration"))


@contextlib.contextmanager
def tfds_progress(shown: bool):
  """TFDS's own progress bars ("Generating splits...", "Shuffling ...") on or off within the
  block, restored after (TFDS has a setter only)."""
  before = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(shown)
  try:
    yield
  finally:
    tfds.display_progress_bar(before)


class QuietBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS's builder without its download banners: "Downloading and preparing dataset Unknown
  size (download: Unknown size, ...)" and "... Subsequent calls will reuse this data" speak of
  downloads that ours never make; the commands print what they wrote themselves. (These are
  TFDS's private hooks: should TFDS rename them, the banners come back, nothing breaks.)"""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


def clip_features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """The record of one clip (25 fps video crop + 16 kHz audio, frame i <-> samples
  [640 i, 640 (i+1)))."""
  return tfds.features.FeaturesDict({
    "clip_id": tfds.features.Text(doc="unique clip name: <source key>_<clip number>"),
    "source": tfds.features.Text(doc="source video path, relative to the prepared folder"),
    "speaker": tfds.features.Text(),
    "emotion": tfds.features.ClassLabel(names=EMOTION_LABELS),
    "level": tfds.features.Tensor(shape=(), dtype=np.int32,
                                  doc="intensity level 1..3 (MEAD), 0 unknown"),
    "num_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
    "start_frame": tfds.features.Tensor(shape=(), dtype=np.int32,
                                        doc="the clip's first frame in the source video at 25 fps"),
    "video": tfds.features.Tensor(shape=(), dtype=np.object_,
                                  doc="H.264 MP4 bytes of the square crop"),
    "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                  doc="16 kHz mono, num_frames * 640 samples"),
    "landmarks": tfds.features.Tensor(
        shape=(None, NUM_LANDMARKS, 2), dtype=np.float16,
        doc="MediaPipe 478-point mesh per frame, crop coordinates in [0, 1]"),
    "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.float32,
                                     doc="x0, y0, x1, y1 in source pixels"),
    **extra,
  })


def split_of(keys: Iterable[str], seed: int, test_fraction: float) -> dict[str, str]:
  """Assigns each distinct key to TRAIN or TEST: exactly round(n * test_fraction) keys (at least one
  when there are two or more) go to TEST, chosen by a seeded hash, so the split is reproducible and
  the same key (a clip, or a speaker when splitting by speaker) never lands on both sides."""
  distinct = sorted(set(keys))
  ranked = sorted(distinct, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
  count = int(round(len(distinct) * test_fraction))
  if len(distinct) >= 2 and test_fraction > 0:
    count = min(max(count, 1), len(distinct) - 1)
  test = set(ranked[:count])
  return {key: TEST if key in test else TRAIN for key in distinct}
