"""The paper's evaluation protocol (supplement §7.1 and "Comparison Settings Details"), and pairing
generated videos with their ground truth.

HDTF: 5.76 s of speech drive each portrait (~144 frames at 25 fps); FVD on the first 128 frames
(FVD₁₂₈); FID, Sync-C / Sync-D and E-FID over all frames.
MEAD: 3.04 s (~76 frames); FVD on the first 72 (FVD₇₂); the rest as HDTF. §7.1 zero-pads MEAD
test sequences shorter than 120 frames before generation and cuts the generated video back to
the ground truth's length with ffmpeg: `driving_frames` does the padding for `etalk eval
--checkpoint`, `trim` the cutting.

Where the paper is silent, we choose and say so in every report (`describe()`):
- FID pools every evaluated frame of every video into one set per side (the usual talking-head
  practice), rather than averaging per-video FIDs, which 144 frames cannot estimate in 2048-d.
- A video shorter than the FVD length is padded with black (zero) frames to it, the video
  counterpart of §7.1's zero padding; the report counts such videos.
- Sync-C / Sync-D are computed per generated video against the ground truth's speech track
  and averaged over videos (mean and standard deviation); the same for the ground-truth videos
  as the reference row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from etalk_jax.errors import InputNotFound, UserError, WrongPathKind

FPS = 25
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str
  seconds: float  # speech that drives each generated video
  fvd_frames: int  # FVD on the first this many frames
  pad_frames: int = 0  # driving sequences shorter than this are zero-padded to it (§7.1)
  fps: int = FPS

  @property
  def frames(self) -> int:
    """Frames evaluated per video (the speech length at the protocol's frame rate)."""
    return int(round(self.seconds * self.fps))

  def driving_frames(self, clip_frames: int) -> int:
    """Frames of speech (zero-padded past the clip's end) that drive a clip's generated video."""
    return min(max(clip_frames, self.pad_frames, self.frames), self.frames)

  def trim(self, clip_frames: int) -> int:
    """Frames kept of a generated video: the ground truth's length, at most `frames`."""
    return min(clip_frames, self.frames)

  def describe(self) -> dict:
    return {"name": self.name, "seconds": self.seconds, "frames": self.frames,
            "fvd_frames": self.fvd_frames, "pad_frames": self.pad_frames, "fps": self.fps,
            "fid": "all evaluated frames of all videos pooled, per side",
            "fvd_short_videos": "zero-padded (black frames) to fvd_frames",
            "sync": "per generated video against the ground truth's speech; mean and std"}


PROTOCOLS = {
    "hdtf": Protocol("hdtf", seconds=5.76, fvd_frames=128),
    "mead": Protocol("mead", seconds=3.04, fvd_frames=72, pad_frames=120),
}


def protocol_of(name: str) -> Protocol:
  if name not in PROTOCOLS:
    raise UserError(f"--protocol {name}: use one of {', '.join(sorted(PROTOCOLS))}")
  return PROTOCOLS[name]


def videos_in(folder: str | Path, what: str) -> dict[str, Path]:
  """name (file stem) -> path of each video directly inside `folder`."""
  folder = Path(folder)
  if not folder.exists():
    raise InputNotFound(f"{what} {folder} does not exist; give a folder of videos.")
  if not folder.is_dir():
    raise WrongPathKind(f"{what} {folder} is a file; give the folder that holds the videos.")
  videos: dict[str, Path] = {}
  for path in sorted(folder.iterdir()):
    if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
      if path.stem in videos:
        raise UserError(f"{what} {folder} has two videos named {path.stem!r} "
                        f"({videos[path.stem].name}, {path.name}); keep one.")
      videos[path.stem] = path
  if not videos:
    raise UserError(f"{what} {folder} holds no videos ({', '.join(VIDEO_SUFFIXES)}).")
  return videos


def pair_videos(generated: str | Path, reference: str | Path) -> list[tuple[str, Path, Path]]:
  """(name, generated video, ground-truth video) for each name in both folders, sorted by name.

  Every video must have its partner: a generated video without ground truth (or the other way
  round) is a mistake in the folders, refused with the names listed.
  """
  ours = videos_in(generated, "--generated")
  theirs = videos_in(reference, "--reference")
  unmatched = sorted(set(ours) ^ set(theirs))
  if unmatched:
    only_ours = [name for name in unmatched if name in ours]
    only_theirs = [name for name in unmatched if name in theirs]
    parts = []
    if only_ours:
      parts.append(f"generated without ground truth: {', '.join(only_ours[:10])}")
    if only_theirs:
      parts.append(f"ground truth without a generated video: {', '.join(only_theirs[:10])}")
    raise UserError(f"videos are paired by file name, and {len(unmatched)} have no partner "
                    f"({'; '.join(parts)}); remove them or generate the missing ones.")
  return [(name, ours[name], theirs[name]) for name in sorted(ours)]


def pad_frames(frames: np.ndarray, count: int) -> tuple[np.ndarray, bool]:
  """The first `count` frames, zero-padded at the end when there are fewer; and whether padded."""
  frames = frames[:count]
  if len(frames) == count:
    return frames, False
  padding = np.zeros((count - len(frames),) + frames.shape[1:], frames.dtype)
  return np.concatenate([frames, padding]), True
