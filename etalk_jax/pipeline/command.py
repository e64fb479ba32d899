"""`etalk sample`: one checkpoint, one portrait and one speech file -> one mp4.

Everything a user gives is checked before the checkpoint loads (seconds) and each problem is
one `UserError` naming the input and the fix: the arguments, --out (an .mp4 whose folder exists
or can be created: a missing folder is created when the video is written, as every etalk writer
creates its output's folder), the checkpoint's pipeline.json, that every input file exists, the
portrait (an image with a face; with several, the largest is taken with a warning) and the speech
(decodable, at least `inputs.MIN_SPEECH_SECONDS`, any sample rate and channel count).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax

from data_pipeline import SAMPLE_RATE
from etalk_jax.emotion.keywords import parse_emotion
from etalk_jax.errors import InputNotFound, OutputExists, UserError, WrongPathKind
from etalk_jax.layers.compute import Compute
from etalk_jax.pipeline import inputs
from etalk_jax.pipeline.checkpoint import read_pipeline_record
from etalk_jax.pipeline.core import EmotiveTalkPipeline, check_sampling_arguments

DTYPES = ("float32", "bfloat16")  # `etalk sample --dtype`
# option -> what to give instead, for an input file that is missing or a folder
INPUT_FILES = {
    "--portrait": "a photo (PNG or JPEG) with one face",
    "--audio": "a speech file (wav, flac, mp3, m4a or mp4)",
    "--emotion-image": "a photo (PNG or JPEG) of a face showing the emotion",
    "--emotion-video": "an mp4 of a talking face",
    "--emotion-audio": "a file of emotional speech (wav, flac, mp3, m4a or mp4)",
}


def check_output(out: str | Path, overwrite: bool = False) -> Path:
  """--out checked before anything runs: an .mp4 path, not a folder, not an existing file unless
  `overwrite`, in a folder that exists or can be created (the nearest existing ancestor is a
  writable folder). Nothing is created here: the video's writer creates the folder, so a run
  that fails leaves nothing behind."""
  path = Path(out)
  if path.suffix.lower() != ".mp4":
    raise UserError(f"--out {out}: the output is an H.264 mp4; give a path ending in .mp4.")
  if path.is_dir():
    raise WrongPathKind(f"--out {out} is a folder; give a file path ending in .mp4.")
  if path.exists() and not overwrite:
    raise OutputExists(f"--out {out} exists; give another path, or pass --overwrite to "
                       "replace it.")
  folder = path.absolute().parent
  existing = folder
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise WrongPathKind(f"--out {out}: {existing} is a file, so the folder {folder} cannot be "
                        "created; give an output path in a folder.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"--out {out}: the folder {existing} is not writable; give an output path "
                    "in a folder you can write to.")
  return path


def check_input_files(files: dict[str, Any]) -> None:
  """Each given input path (option -> path or None) is an existing file, else one UserError
  naming the option and what to give."""
  for option, path in files.items():
    if path is None:
      continue
    if Path(path).is_dir():
      raise WrongPathKind(f"{option} {path} is a folder; give {INPUT_FILES[option]}.")
    if not Path(path).is_file():
      raise InputNotFound(f"{option} {path} does not exist; give {INPUT_FILES[option]}.")


def sample_command(portrait: str, audio: str, out: str, checkpoint: str, *,
                   emotion: str | None = None, emotion_text: str | None = None,
                   emotion_image: str | None = None, emotion_video: str | None = None,
                   emotion_audio: str | None = None, intensity: float = 1.0,
                   steps: int | None = None, guidance: float | None = None,
                   resolution: int | None = None, seed: int = 0, paste_back: bool = False,
                   progress: bool = True, dtype: str | None = None, attention: str = "auto",
                   overwrite: bool = False) -> dict[str, Any]:
  """`etalk sample`: checks every input (the module docstring), loads the checkpoint, generates,
  writes `out` atomically (nothing is left there on failure; its folder is created if missing)
  and returns a summary {out, frames, seconds, generation_seconds, fps}.
  dtype: "float32" or "bfloat16" (bf16 compute over the fp32 weights); None: the backend's
  default (`default_dtype`). attention: a `Compute` attention implementation."""
  out_path = check_output(out, overwrite)
  # The arguments alone are checked before anything loads (loading takes seconds).
  if emotion is not None:
    try:
      parse_emotion(emotion)
    except UserError as error:
      hint = (f" For an emotion in other words, use --emotion-text \"{emotion}\"."
              if "unknown emotion" in str(error) else "")
      raise UserError(f"--emotion: {error}{hint}") from None
  check_sampling_arguments(intensity, steps, guidance)
  record = read_pipeline_record(checkpoint)
  if resolution is not None and int(resolution) != int(record["resolution"]):
    raise UserError(f"--resolution {resolution} does not match the checkpoint {checkpoint}, "
                    f"which generates {record['resolution']}x{record['resolution']}; pass "
                    f"--resolution {record['resolution']} or another checkpoint.")
  check_input_files({"--portrait": portrait, "--audio": audio, "--emotion-image": emotion_image,
                     "--emotion-video": emotion_video, "--emotion-audio": emotion_audio})
  if emotion_video is not None:
    inputs.check_driving_video(emotion_video)
  # The portrait and the speech are read (and the face found) before the checkpoint loads, so
  # that a photo without a face or a broken audio file is refused at once; the pipeline then
  # takes them as read.
  image, name = inputs.read_image(portrait)
  landmarks = inputs.detect_face(image, name)
  samples, _ = inputs.read_speech(audio)
  pipeline = EmotiveTalkPipeline.load(checkpoint, compute_for(dtype, attention))
  start = time.perf_counter()
  result = pipeline(image, (samples, SAMPLE_RATE), landmarks=landmarks, emotion=emotion,
                    emotion_text=emotion_text, emotion_image=emotion_image,
                    emotion_video=emotion_video, emotion_audio=emotion_audio,
                    intensity=intensity, steps=steps, guidance=guidance, seed=seed,
                    paste_back=paste_back, progress=progress)
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
