"""TFDS builders (no TensorFlow): `synthetic_talking_heads`, and `hdtf`, `mead`, `talking_heads` for
real videos (prepared by data_pipeline.prepare). Importing this package registers them with TFDS."""

from data_pipeline.builders.real import Hdtf, Mead, RealConfig, TalkingHeads, builder_for
from data_pipeline.builders.synthetic_talking_heads import SyntheticConfig, SyntheticTalkingHeads

__all__ = ["Hdtf", "Mead", "RealConfig", "SyntheticConfig", "SyntheticTalkingHeads", "TalkingHeads",
           "builder_for"]
