"""Writes a synthetic dataset in MEAD's folder layout, so `prepare` reads it as it reads MEAD."""

from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.synthetic.clips import SyntheticSpec


def write_mead_layout(dst: str | os.PathLike, spec: SyntheticSpec, progress: bool = True
                      ) -> list[Path]:
  """Writes the spec's clips as MEAD does: `<speaker>/video/front/<emotion>/level_<k>/NNN.mp4`
  (video with its audio track) and `<speaker>/audio/<emotion>/level_<k>/NNN.m4a`. Returns the mp4
  paths. MEAD calls fear `fear`, so `fearful` is written under that name (prepare maps it back)."""
  from tqdm import tqdm  # noqa: PLC0415 (only writing a dataset shows progress)

  from data_pipeline import media  # noqa: PLC0415 (PyAV loads only to write media files)

  dst = Path(dst)
  written = []
  for identity, emotion, level, take in tqdm(list(spec.clips()), desc="synthetic MEAD",
                                             disable=not progress):
    clip = spec.make_clip(identity, emotion, level, take)
    folder = {"fearful": "fear"}.get(emotion, emotion)
    name = f"{take + 1:03d}"
    video = dst / identity.speaker / "video" / "front" / folder / f"level_{level}" / f"{name}.mp4"
    media.write_video_file(video, clip.frames, clip.audio)
    audio = dst / identity.speaker / "audio" / folder / f"level_{level}" / f"{name}.m4a"
    media.write_audio_file(audio, clip.audio)
    written.append(video)
  return written
