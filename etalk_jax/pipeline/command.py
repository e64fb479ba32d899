"""`etalk sample`: one checkpoint, one portrait and one speech file -> one mp4."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax

from etalk_jax.emotion.keywords import check_keyword
from etalk_jax.errors import InputNotFound, UserError, WrongPathKind
from etalk_jax.layers.compute import Compute
from etalk_jax.pipeline.checkpoint import read_pipeline_record
from etalk_jax.pipeline.core import EmotiveTalkPipeline, check_sampling_arguments

DTYPES = ("float32", "bfloat16")  # `etalk sample --dtype`


def sample_command(portrait: str, audio: str, out: str, checkpoint: str, *,
                   emotion: str | None = None, emotion_text: str | None = None,
                   emotion_image: str | None = None, emotion_video: str | None = None,
                   emotion_audio: str | None = None, intensity: float = 1.0,
                   steps: int | None = None, guidance: float | None = None,
                   resolution: int | None = None, seed: int = 0, paste_back: bool = False,
                   progress: bool = True, dtype: str | None = None, attention: str = "auto"
                   ) -> dict[str, Any]:
  """`etalk sample`: loads the checkpoint, generates, writes `out` atomically (nothing is left
  there on failure) and returns a summary {out, frames, seconds, generation_seconds, fps}.
  dtype: "float32" or "bfloat16" (bf16 compute over the fp32 weights); None: the backend's
  default (`default_dtype`). attention: a `Compute` attention implementation."""
  out_path = Path(out)
  if out_path.suffix.lower() != ".mp4":
    raise UserError(f"--out {out}: the output is an H.264 mp4; give a path ending in .mp4.")
  if out_path.is_dir():
    raise WrongPathKind(f"--out {out} is a folder; give a file path ending in .mp4.")
  # The arguments alone are checked before anything loads (loading takes seconds).
  if emotion is not None:
    try:
      check_keyword(emotion)
    except UserError as error:
      raise UserError(f"--emotion: {error} For an emotion in other words, use --emotion-text "
                      f"\"{emotion}\".") from None
  check_sampling_arguments(intensity, steps, guidance)
  record = read_pipeline_record(checkpoint)
  if resolution is not None and int(resolution) != int(record["resolution"]):
    raise UserError(f"--resolution {resolution} does not match the checkpoint {checkpoint}, "
                    f"which generates {record['resolution']}x{record['resolution']}; pass "
                    f"--resolution {record['resolution']} or another checkpoint.")
  for label, path in (("--portrait", portrait), ("--audio", audio),
                      ("--emotion-image", emotion_image), ("--emotion-video", emotion_video),
                      ("--emotion-audio", emotion_audio)):
    if path is not None and not Path(path).is_file():
      raise InputNotFound(f"{label} {path} does not exist.")
  pipeline = EmotiveTalkPipeline.load(checkpoint, compute_for(dtype, attention))
  start = time.perf_counter()
  result = pipeline(portrait, audio, emotion=emotion, emotion_text=emotion_text,
                    emotion_image=emotion_image, emotion_video=emotion_video,
                    emotion_audio=emotion_audio, intensity=intensity, steps=steps,
                    guidance=guidance, seed=seed, paste_back=paste_back, progress=progress)
  generation_seconds = time.perf_counter() - start
  result.write(out_path)
  frames = result.frames.shape[0]
  return {"out": str(out_path), "frames": frames, "seconds": frames / result.fps,
          "generation_seconds": generation_seconds,
          "generation_fps": frames / max(generation_seconds, 1e-9), "emotion": result.emotion,
          "size": list(result.frames.shape[1:3]), "dtype": dtype or default_dtype(),
          "devices": len(pipeline.devices)}


def default_dtype() -> str:
  """`etalk sample`'s default compute dtype: bfloat16 on a GPU or TPU (their fast matmul type),
  float32 on the CPU (where bf16 is emulated and slower)."""
  return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def compute_for(dtype: str | None, attention: str = "auto") -> Compute:
  """The `Compute` of `etalk sample --dtype D --attention A`."""
  dtype = default_dtype() if dtype is None else dtype
  if dtype not in DTYPES:
    raise UserError(f"--dtype {dtype} is not supported; give one of {', '.join(DTYPES)}.")
  if dtype == "bfloat16":
    return Compute.bf16(attention)
  return Compute(attention=attention)
