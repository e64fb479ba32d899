"""Video and audio I/O for the data pipeline, all through PyAV (one place, to merge later with
etalk_jax's own media/audio readers).

- `iter_video_frames`: decode any container, resample to a constant frame rate by timestamps
  (variable-frame-rate sources included), turned upright as the container's display matrix says
  (phone footage), RGB uint8 frames one at a time (long videos never sit in memory).
- `read_audio`: the first audio stream of a file as 16 kHz mono int16 (any rate, any channel
  layout), with its start time so that audio and video line up; gaps in its timestamps become
  silence.
- `encode_h264` / `decode_frames`: clip crops to H.264-in-MP4 bytes, and back, decoding only the
  frames a window needs (seek to the keyframe before it).
- `write_video_file` / `write_audio_file`: mp4 (+AAC) and m4a files, written atomically.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline import FPS, INT16_SCALE, SAMPLE_RATE
from etalk_jax.errors import UserError


class MediaError(UserError):
  """A file that cannot be used; the message names the file and the reason."""


def _av():
  import av  # noqa: PLC0415 (PyAV is heavy; only the modules that decode pay for it)
  # FFmpeg's own warnings on broken files would drown the progress bar.
  av.logging.set_level(av.logging.PANIC)
  return av


def _open(path: str | os.PathLike):
  av = _av()
  path = Path(path)
  if not path.is_file():
    raise MediaError(f"{path}: no such file")
  if path.stat().st_size == 0:
    raise MediaError(f"{path}: empty file (0 bytes)")
  try:
    return av.open(str(path))
  except Exception as error:  # PyAV raises many FFmpeg error types; all mean "unreadable".
    # FFmpeg's own words, without its errno number and the path the message names already.
    reason = getattr(error, "strerror", None) or str(error)
    raise MediaError(f"{path}: cannot open as audio/video ({reason}); it is damaged or not a "
                     "media file.") from None


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  width: int
  height: int
  start_time: float  # seconds, the first video frame's timestamp
  duration: float | None  # seconds, as the container declares it (None if unknown)
  has_audio: bool


def probe(path: str | os.PathLike) -> VideoInfo:
  """Stream facts without decoding; raises MediaError for a file without a video stream."""
  with _open(path) as container:
    if not container.streams.video:
      raise MediaError(f"{path}: no video stream")
    stream = container.streams.video[0]
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    duration = None
    if stream.duration is not None:
      duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
      duration = container.duration / 1_000_000
    return VideoInfo(width=stream.codec_context.width, height=stream.codec_context.height,
                     start_time=start, duration=duration, has_audio=bool(container.streams.audio))


def _upright(frame, path) -> np.ndarray:
  """A decoded frame as RGB, turned as its display matrix says it is to be shown (what FFmpeg's
  command line does by default, `-autorotate`: the same transpose / flip per matrix). Phones store
  portrait video sideways with such a matrix; MediaPipe would not find the sideways face."""
  array = frame.to_ndarray(format="rgb24")
  side_data = frame.side_data.get(_av().sidedata.sidedata.Type.DISPLAYMATRIX)
  if side_data is None:
    return array
  matrix = np.frombuffer(bytes(side_data), np.int32)
  clockwise = round(-frame.rotation) % 360  # PyAV's rotation is counter-clockwise
  if clockwise == 90:
    return array.transpose(1, 0, 2) if matrix[3] > 0 else np.rot90(array, -1)
  if clockwise == 270:
    return np.flipud(np.rot90(array, -1)) if matrix[3] < 0 else np.rot90(array, 1)
  if clockwise == 180:
    array = array[:, ::-1] if matrix[0] < 0 else array
    return array[::-1] if matrix[4] < 0 else array
  if clockwise == 0:
    return array[::-1] if matrix[4] < 0 else array
  raise MediaError(f"{path}: its display matrix turns the picture by {clockwise} degrees; only "
                   "multiples of 90 are supported (re-encode it upright)")


def iter_video_frames(path: str | os.PathLike, fps: int = FPS) -> Iterator[np.ndarray]:
  """Yields RGB uint8 frames (H, W, 3) at a constant `fps`, frame k being the source frame whose
  timestamp is nearest to start + k / fps (repeats or drops source frames, so 30 fps, 24 fps and
  variable-rate sources all come out at `fps`), turned upright by the display matrix if the
  container has one (so H, W may be the stored ones swapped). Raises MediaError on a broken
  stream."""
  with _open(path) as container:
    if not container.streams.video:
      raise MediaError(f"{path}: no video stream")
    stream = container.streams.video[0]
    # Slice threads only: with frame threads ("AUTO" / "FRAME"), a decoder freed before the
    # stream's end (a caller that stops early or raises mid-video) can hang forever in
    # avcodec_free_context once torch is imported (PyAV-Org/PyAV#1849, #1861; seen in
    # check_driving_video's two-frame probe).
    stream.thread_type = "SLICE"
    start = None
    previous = None  # (time, frame) of the last decoded source frame
    next_index = 0
    try:
      for frame in container.decode(stream):
        if frame.time is None:
          continue
        if start is None:
          start = frame.time
        time = frame.time - start
        # Emit every output slot whose nearest source frame is now known.
        while previous is not None and next_index / fps < time:
          slot = next_index / fps
          chosen = previous[1] if slot - previous[0] <= time - slot else frame
          yield _upright(chosen, path)
          next_index += 1
        previous = (time, frame)
    except _av().FFmpegError as error:
      raise MediaError(f"{path}: corrupt or truncated video after {next_index} frames "
                       f"({error})") from None
    if previous is None:
      raise MediaError(f"{path}: no decodable video frame")
    # The last source frame covers up to one output period past its timestamp.
    while next_index / fps <= previous[0] + 0.5 / fps:
      yield _upright(previous[1], path)
      next_index += 1


# An audio frame starting this much later than the previous one ends is a gap (recorders that send
# nothing while it is quiet write such tracks); smaller jitter is ignored. Half a 25 fps frame.
AUDIO_GAP_SECONDS = 0.02


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, float]:
  """The first audio stream as mono int16 at `sample_rate` (resampled from any rate, channels
  mixed down), and its start time in seconds (the container's clock, comparable with
  `probe(path).start_time`). A gap in the stream's timestamps is filled with silence, so the
  audio after it stays aligned with the video. Raises MediaError if there is none."""
  av = _av()
  with _open(path) as container:
    if not container.streams.audio:
      raise MediaError(f"{path}: no audio stream (the pipeline needs the speech track; remux the "
                       f"audio in)")
    stream = container.streams.audio[0]
    new_resampler = lambda: av.AudioResampler(format="s16", layout="mono",  # noqa: E731
                                              rate=sample_rate)
    resampler = new_resampler()
    chunks = []
    start = None
    expected = None  # where the next frame should start (seconds), from the frames so far
    try:
      for frame in container.decode(stream):
        if frame.time is not None:
          if start is None:
            start = expected = frame.time
          elif frame.time - expected > AUDIO_GAP_SECONDS:
            # The samples before the gap leave the resampler first, then the silence.
            for out in resampler.resample(None):
              chunks.append(out.to_ndarray().reshape(-1))
            resampler = new_resampler()
            chunks.append(np.zeros(int(round((frame.time - expected) * sample_rate)), np.int16))
            expected = frame.time
        if expected is not None:
          expected += frame.samples / frame.sample_rate
        for out in resampler.resample(frame):
          chunks.append(out.to_ndarray().reshape(-1))
      for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as error:
      raise MediaError(f"{path}: corrupt or truncated audio ({error})") from None
  if not chunks:
    raise MediaError(f"{path}: the audio stream holds no samples")
  return np.concatenate(chunks).astype(np.int16), float(start or 0.0)


# Frames between keyframes of stored clips (1 s): bounds the decoding a window wastes.
KEYFRAME_INTERVAL = 25


class H264Encoder:
  """Streams RGB frames into H.264 (yuv420p, no B-frames, a keyframe every `gop` frames) in MP4
  bytes.

  No B-frames and short GOPs keep random access cheap: a window decodes at most gop - 1 extra
  frames.
  Frames go in one at a time, so a long clip at 1024² never sits in memory whole.
  """

  def __init__(self, fps: int = FPS, crf: int = 18, gop: int = KEYFRAME_INTERVAL,
               preset: str = "veryfast"):
    self._av = _av()
    self._buffer = io.BytesIO()
    self._container = self._av.open(self._buffer, mode="w", format="mp4")
    self._stream = None
    self._settings = (fps, crf, gop, preset)
    self.frames = 0

  def add(self, frame_array: np.ndarray) -> None:
    if self._stream is None:
      fps, crf, gop, preset = self._settings
      height, width = frame_array.shape[:2]
      if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sizes, got {width}x{height}")
      self._stream = self._container.add_stream("libx264", rate=fps)
      self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
      self._stream.options = {"crf": str(crf), "g": str(gop), "keyint_min": str(gop), "bf": "0",
                              "sc_threshold": "0", "preset": preset}
      # The pipeline parallelises across videos, not inside one.
      self._stream.codec_context.thread_count = 1
    frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_array), format="rgb24")
    for packet in self._stream.encode(frame):
      self._container.mux(packet)
    self.frames += 1

  def finish(self) -> bytes:
    """Flushes the encoder and returns the MP4 bytes."""
    if self._stream is None:
      raise ValueError("H264Encoder got no frames")
    for packet in self._stream.encode():
      self._container.mux(packet)
    self._container.close()
    return self._buffer.getvalue()


NORMALIZE_EPS = 1e-7  # Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm


def speech_stats(samples: np.ndarray) -> np.ndarray:
  """(mean, std) float32 of float speech samples, the std as Wav2Vec2FeatureExtractor's
  zero-mean unit-variance normalisation takes it (`etalk_jax.audio.features.normalize`)."""
  x = np.asarray(samples, np.float32)
  return np.array([x.mean(), np.sqrt(x.var() + NORMALIZE_EPS)], np.float32)


def encode_h264(frames, **settings) -> bytes:
  """`H264Encoder` over an array (T, H, W, 3) uint8 or an iterable of frames; MP4 bytes."""
  encoder = H264Encoder(**settings)
  for frame in frames:
    encoder.add(frame)
  return encoder.finish()


def decode_frames(video: bytes, start: int = 0, count: int | None = None, fps: int = FPS,
                  threads: int = 1) -> np.ndarray:
  """Frames [start, start + count) of an `encode_h264` clip, (count, H, W, 3) uint8.

  Seeks to the keyframe at or before `start`, so only the frames from there on are decoded.
  `count=None` decodes to the end. Raises IndexError if the clip is shorter than asked.
  """
  av = _av()
  with av.open(io.BytesIO(video)) as container:
    stream = container.streams.video[0]
    stream.codec_context.thread_count = threads
    if threads > 1:
      stream.thread_type = "FRAME"
    time_base = stream.time_base
    first_pts = stream.start_time or 0
    if start > 0:
      container.seek(first_pts + int(round(start / fps / time_base)), stream=stream, backward=True,
                     any_frame=False)
    frames = []
    for frame in container.decode(stream):
      index = int(round((frame.pts - first_pts) * time_base * fps))
      if index < start:
        continue
      frames.append(frame.to_ndarray(format="rgb24"))
      if count is not None and len(frames) == count:
        break
  if count is not None and len(frames) < count:
    raise IndexError(f"clip has frames up to {start + len(frames)}, asked for "
                     f"[{start}, {start + count})")
  return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def _atomic_target(path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def write_video_file(path: str | os.PathLike, frames: np.ndarray, audio: np.ndarray | None = None,
                     fps: int = FPS, sample_rate: int = SAMPLE_RATE, crf: int = 20) -> None:
  """An H.264 mp4 (with an AAC track when `audio`, int16 mono, is given), written atomically. Any
  frame size: odd widths or heights are stored 4:4:4."""
  av = _av()
  path = Path(path)
  temporary = _atomic_target(path)
  try:
    with av.open(str(temporary), mode="w", format="mp4") as container:
      video = container.add_stream("libx264", rate=fps)
      video.height, video.width = frames.shape[1:3]
      # 4:2:0 halves the chroma planes, so x264 needs even sizes; odd ones go 4:4:4
      # (H.264 High 4:4:4).
      video.pix_fmt = "yuv444p" if video.height % 2 or video.width % 2 else "yuv420p"
      video.options = {"crf": str(crf), "preset": "veryfast"}
      sound = None
      if audio is not None:
        sound = container.add_stream("aac", rate=sample_rate)
        sound.layout = "mono"
      for frame_array in frames:
        for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_array),
                                                              format="rgb24")):
          container.mux(packet)
      for packet in video.encode():
        container.mux(packet)
      if sound is not None:
        _encode_audio(av, container, sound, audio, sample_rate)
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)


def write_audio_file(path: str | os.PathLike, audio: np.ndarray,
                     sample_rate: int = SAMPLE_RATE) -> None:
  """An AAC .m4a (or any container FFmpeg infers from the suffix, e.g. .wav) of int16 mono audio,
  written atomically."""
  av = _av()
  path = Path(path)
  temporary = _atomic_target(path)
  container_format = {".m4a": "mp4", ".wav": "wav"}.get(path.suffix.lower())
  codec = "pcm_s16le" if path.suffix.lower() == ".wav" else "aac"
  try:
    with av.open(str(temporary), mode="w", format=container_format) as container:
      sound = container.add_stream(codec, rate=sample_rate)
      sound.layout = "mono"
      _encode_audio(av, container, sound, audio, sample_rate)
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)


def _encode_audio(av, container, stream, audio: np.ndarray, sample_rate: int) -> None:
  # Planar float input lets FFmpeg convert for any encoder (AAC wants fltp, WAV s16).
  samples = (np.asarray(audio, np.float32) / INT16_SCALE).reshape(1, -1)
  resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono",
                                rate=sample_rate)
  chunk = 1024
  for begin in range(0, samples.shape[1], chunk):
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, begin:begin + chunk]),
                                       format="fltp", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = begin
    for converted in resampler.resample(frame):
      for packet in stream.encode(converted):
        container.mux(packet)
  for packet in stream.encode(None):
    container.mux(packet)
