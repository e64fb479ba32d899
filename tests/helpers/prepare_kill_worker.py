"""`etalk prepare` in a process that SIGKILLs itself at a chosen point, for the restart tests.

    python -m tests.helpers.prepare_kill_worker SRC DST KILL

KILL: `none` (run to the end), `frame:N` (when MediaPipe has been given N frames: in the middle
of a video's first pass), `encode:N` (when N crop frames have been encoded: in the middle of a
video's second pass) or `example:N` (when TFDS has been handed N records: in the middle of writing
the shards, every video done). SIGKILL, not an exception: nothing in the process gets to clean up,
as when a machine is preempted. The options are test_prepare_faults.py's.
"""

import os
import signal
import sys

from data_pipeline import faces, media
from data_pipeline.builders import real

RESOLUTION = 64
OPTIONS = {"clip_frames": 40, "min_clip_frames": 20, "progress": False}


def _kill_after(count: int, function):
  """`function` wrapped to SIGKILL this process on its count-th call in this process."""
  calls = [0]

  def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == count:
      os.kill(os.getpid(), signal.SIGKILL)
    return function(*args, **kwargs)
  return wrapped


def _kill_at_example(count: int, generate):
  def wrapped(self, *args, **kwargs):
    for index, example in enumerate(generate(self, *args, **kwargs), 1):
      if index == count:
        os.kill(os.getpid(), signal.SIGKILL)
      yield example
  return wrapped


def main(src: str, dst: str, kill: str) -> None:
  point, _, count = kill.partition(":")
  if point == "frame":
    faces.FaceLandmarker.__call__ = _kill_after(int(count), faces.FaceLandmarker.__call__)
  elif point == "encode":
    media.H264Encoder.add = _kill_after(int(count), media.H264Encoder.add)
  elif point == "example":
    real._PreparedVideos._generate_examples = _kill_at_example(
        int(count), real._PreparedVideos._generate_examples)
  elif point != "none":
    raise SystemExit(f"unknown kill point {kill!r}")
  report = real.prepare_command(src, "folder", dst, RESOLUTION, **OPTIONS)
  print(report["clips"])


if __name__ == "__main__":
  main(*sys.argv[1:])
