"""Small videos for `etalk prepare`'s fault tests, written with PyAV the way other tools write them:
variable frame rates, a display matrix (phone footage), odd 4:2:0 sizes (VP9), 8 kHz or 44.1 kHz
stereo audio, audio with a long gap in its timestamps. The picture is the astronaut portrait from
scikit-image (a real face MediaPipe finds); the audio is a click track whose clicks sit at known
frames, so a test can tell whether audio and video stayed aligned."""

from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np
import skimage.data as skimage_data
from PIL import Image

SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 640
CLICK_EVERY_FRAMES = 8
CLICK_OFFSET_FRAMES = 3
CLICK_SECONDS = 0.005  # 5 ms: survives an 8 kHz track's 4 kHz band limit


def astronaut_frames(count: int, height: int = 160, width: int | None = None,
                     fps: float = 25.0) -> np.ndarray:
  """(count, height, width, 3) uint8 at `fps`: `astronaut_at(index / fps)`."""
  return astronaut_at(np.arange(count) / fps, height, width)


def astronaut_at(times, height: int = 160, width: int | None = None) -> np.ndarray:
  """(len(times), height, width, 3) uint8: the portrait's head region at each time (seconds),
  panning a few pixels per frame (every frame differs), taken at the output's aspect (not
  stretched)."""
  image = skimage_data.astronaut()
  width = width or height
  half = int(round(150 * width / height))
  frames = []
  for time in times:
    dx = int(12 * np.sin(2 * np.pi * 0.5 * time))
    dy = int(6 * np.cos(2 * np.pi * 0.3 * time))
    crop = image[20 + dy:320 + dy, max(240 - half + dx, 0):240 + half + dx]
    frames.append(np.asarray(Image.fromarray(crop).resize((width, height),
                                                          Image.Resampling.BILINEAR)))
  return np.stack(frames)


def click_frames(seconds: float) -> list[int]:
  """The 25 fps frames whose audio starts with a click."""
  return list(range(CLICK_OFFSET_FRAMES, int(seconds * 25), CLICK_EVERY_FRAMES))


def click_track(seconds: float, rate: int = SAMPLE_RATE, silent: tuple[float, float] | None = None
                ) -> np.ndarray:
  """float32 silence with a 5 ms click (0.7 of full scale) at the start of each click frame; no
  clicks inside `silent` = (from, to) seconds."""
  audio = np.zeros(int(round(seconds * rate)), np.float32)
  width = int(round(CLICK_SECONDS * rate))
  for frame in click_frames(seconds):
    if silent and silent[0] <= frame / 25 < silent[1]:
      continue
    begin = int(round(frame / 25 * rate))
    audio[begin:begin + width] = 0.7
  return audio


def write_video(path: str | Path, frames: np.ndarray, *, fps: int = 25,
                timestamps_ms: np.ndarray | None = None, rotation: int | None = None,
                hflip: bool = False, vflip: bool = False,
                codec: str = "libx264", audio: np.ndarray | None = None,
                audio_rate: int = SAMPLE_RATE, audio_codec: str = "aac",
                audio_gap: tuple[float, float] | None = None, container: str | None = None
                ) -> Path:
  """Writes `frames` (the picture as it should be shown) to `path`.

  timestamps_ms: each frame's time (variable frame rate); rotation, hflip, vflip: a display matrix
  saying "turn the stored picture `rotation` degrees counter-clockwise, then mirror it, to show
  it" (PyAV's `set_display_rotation`; the stored frames are the inverse, as a phone stores them);
  audio: float32 (samples,) mono or (channels,
  samples); audio_gap = (from, to) seconds: no audio packets at all in that span (the next packet's
  timestamp jumps), as recorders that send nothing during silence write it.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  stored = frames[:, ::-1] if vflip else frames
  stored = stored[:, :, ::-1] if hflip else stored
  if rotation is not None:
    stored = np.stack([np.rot90(frame, -rotation // 90) for frame in stored])
  height, width = stored.shape[1:3]
  with av.open(str(path), "w", format=container) as output:
    video = output.add_stream(codec, rate=fps)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    if rotation is not None or hflip or vflip:
      video.set_display_rotation(rotation or 0, hflip=hflip, vflip=vflip)
    if timestamps_ms is not None:
      video.codec_context.time_base = fractions.Fraction(1, 1000)
    sound = None
    if audio is not None:
      sound = output.add_stream(audio_codec, rate=audio_rate)
      sound.layout = "mono" if audio.ndim == 1 else "stereo"
    for index, frame_array in enumerate(stored):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_array), format="rgb24")
      if timestamps_ms is not None:
        frame.pts, frame.time_base = int(timestamps_ms[index]), fractions.Fraction(1, 1000)
      for packet in video.encode(frame):
        output.mux(packet)
    for packet in video.encode():
      output.mux(packet)
    if sound is not None:
      _write_audio(output, sound, audio, audio_rate, audio_gap)
  return path


def _write_audio(output, sound, audio: np.ndarray, rate: int,
                 gap: tuple[float, float] | None) -> None:
  planar = audio.reshape(1, -1) if audio.ndim == 1 else audio
  layout = "mono" if audio.ndim == 1 else "stereo"
  resampler = av.AudioResampler(format=sound.codec_context.format.name, layout=layout, rate=rate)
  chunk = 1024
  for begin in range(0, planar.shape[1], chunk):
    if gap and gap[0] * rate <= begin and begin + chunk <= gap[1] * rate:
      continue  # nothing is sent for this chunk: the next one's pts jumps over the gap
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(planar[:, begin:begin + chunk], np.float32), format="fltp",
        layout=layout)
    frame.sample_rate, frame.pts = rate, begin
    frame.time_base = fractions.Fraction(1, rate)
    for converted in resampler.resample(frame):
      for packet in sound.encode(converted):
        output.mux(packet)
  for converted in resampler.resample(None):
    for packet in sound.encode(converted):
      output.mux(packet)
  for packet in sound.encode(None):
    output.mux(packet)
