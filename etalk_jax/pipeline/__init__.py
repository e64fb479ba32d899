"""Inference: portrait + speech (+ an emotion source) -> talking-head video
(docs/ARCHITECTURE.md §1).

  inputs.py      the portrait, speech and driving video read and checked; face crop, paste-back
  checkpoint.py  the checkpoint format: save_pipeline, read_pipeline_record, load_components
  core.py        EmotiveTalkPipeline (its `__call__` as numbered steps), Result, ETHD's call
  command.py     `etalk sample` (imported by the CLI, not here)
"""

from etalk_jax.pipeline.checkpoint import read_pipeline_record, save_pipeline
from etalk_jax.pipeline.core import EmotiveTalkPipeline, Result, call_ethd, with_reference_latent
from etalk_jax.pipeline.inputs import FaceCrop, crop_face, paste_into_portrait

__all__ = ["EmotiveTalkPipeline", "FaceCrop", "Result", "call_ethd", "crop_face",
           "paste_into_portrait", "read_pipeline_record", "save_pipeline", "with_reference_latent"]
