"""SyncNet v2, the network behind Sync-C / Sync-D, with upstream's front end: MFCCs, face crops,
5-frame windows and the audio-visual offset search.

Written from reading `joonson/syncnet_python` (commit 6efbb1c): `SyncNetModel.py` (class `S`: the
audio tower `netcnnaud` + `netfcaud` on a (13, 20) MFCC window, the lip tower `netcnnlip` +
`netfclip` on 5 frames of 224x224x3, BatchNorm everywhere, each tower ending in a 1024-d
embedding), `SyncNetInstance.py` (`evaluate`: frames and MFCCs cut into windows, `calc_pdist`,
offset and confidence; `loadParameters`), `run_pipeline.py` (`crop_video`: the face crop) and
`run_syncnet.py` (its defaults: vshift 15, batch size 20); and python_speech_features 0.6
(`base.mfcc` / `fbank` / `get_filterbanks`, `sigproc.framesig` / `powspec` / `preemphasis`) for
the MFCCs upstream computes.

Upstream's input conventions, which `syncnet_inputs` reproduces from our RGB uint8 frames and
float audio in [-1, 1):
- frames are what cv2 reads from the cropped video: BGR, float 0..255, not normalised;
- audio is the 16 kHz mono int16 wav that ffmpeg writes (`pcm_s16le`), fed to
  `python_speech_features.mfcc(audio, 16000)` as int16 values (no scaling to [-1, 1]);
- video frame i (25 fps) is paired with MFCC frames 4i .. 4i+19 (100 per second), and the lip
  window starting at frame i with frames i .. i+4.

Channels-last here: lip windows are (batch, 5, H, W, 3), MFCC windows (batch, 13, 20, 1) (upstream
(batch, 3, 5, H, W) and (batch, 1, 13, 20)). Inference only: BatchNorm reads its running
statistics.

What we do not reproduce: upstream writes the crops to an XVID .avi, which `evaluate` re-extracts
to JPEG frames with ffmpeg (two lossy steps), and reads the audio back from that file; we crop and
score our frames and samples directly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import signal as scipy_signal

from data_pipeline import FPS, INT16_SCALE, SAMPLE_RATE, SAMPLES_PER_FRAME
from data_pipeline.faces import FACE_OVAL
from etalk_jax import model_io
from etalk_jax.errors import UserError
from etalk_jax.layers.compute import FP32, Compute

# torch's BatchNorm defaults (flax counts momentum the other way round).
BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9

# evaluate's windows: 5 video frames against 20 MFCC frames (4 per video frame at 100 / 25 fps).
WINDOW_FRAMES = 5
MFCC_PER_FRAME = 4
MFCC_WINDOW = WINDOW_FRAMES * MFCC_PER_FRAME  # 20
NUM_CEPSTRA = 13
VSHIFT = 15        # run_syncnet.py's default: offsets -15 .. 15 frames
BATCH_SIZE = 20    # run_syncnet.py's default; only the memory use depends on it
# torch.nn.functional.pairwise_distance's default eps, added to the difference before the norm.
PAIRWISE_EPS = 1e-6

# crop_video: crop scale, the size the crops are resized to, the median filter over the track's
# boxes, and the grey that pads the frame.
CROP_SCALE = 0.4
CROP_SIZE = 224
BOX_SMOOTHING = 13
CROP_PAD_VALUE = 110
# Our landmark box against upstream's S3FD box: see `face_boxes`.
LANDMARK_BOX_SCALE = 1.0


# ----------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Stage:
  """One conv stage of a tower: conv, BatchNorm, ReLU, then an optional max-pool."""
  kernel: tuple[int, ...]
  stride: tuple[int, ...]
  padding: tuple[int, ...]
  pool: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None  # window, stride,
  #                                                                              padding


def _audio_stages(final_kernel: tuple[int, int]) -> tuple[_Stage, ...]:
  """netcnnaud. Its first MaxPool2d (kernel 1, stride 1) is the identity and is left out."""
  same = ((3, 3), (1, 1), (1, 1))
  return (_Stage(*same), _Stage(*same, pool=((3, 3), (1, 2), (0, 0))), _Stage(*same),
          _Stage(*same), _Stage(*same, pool=((3, 3), (2, 2), (0, 0))),
          _Stage(final_kernel, (1, 1), (0, 0)))


def _lip_stages(final_kernel: int) -> tuple[_Stage, ...]:
  """netcnnlip: 3D convs whose only temporal extent is the first (5 frames -> 1)."""
  same = ((1, 3, 3), (1, 1, 1), (0, 1, 1))
  pool = ((1, 3, 3), (1, 2, 2), (0, 0, 0))
  return (_Stage((WINDOW_FRAMES, 7, 7), (1, 2, 2), (0, 0, 0), pool=pool),
          _Stage((1, 5, 5), (1, 2, 2), (0, 1, 1), pool=((1, 3, 3), (1, 2, 2), (0, 1, 1))),
          _Stage(*same), _Stage(*same), _Stage(*same, pool=pool),
          _Stage((1, final_kernel, final_kernel), (1, 1, 1), (0, 0, 0)))


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
  # torch's conv / pool output size (floor mode)
  return (size + 2 * padding - kernel) // stride + 1


def _size_before_final(size: Sequence[int], stages: Sequence[_Stage]) -> tuple[int, ...]:
  """Spatial size entering the last conv, which upstream sizes to reduce it to 1."""
  size = list(size)
  for stage in stages[:-1]:
    size = [_out_size(s, k, st, p) for s, k, st, p in
            zip(size, stage.kernel, stage.stride, stage.padding)]
    if stage.pool is not None:
      window, stride, padding = stage.pool
      size = [_out_size(s, k, st, p) for s, k, st, p in zip(size, window, stride, padding)]
    if min(size) < 1:
      return (0,) * len(size)
  return tuple(size)


# The audio input is fixed by the MFCC window: (13, 20) -> (5, 4) before the last conv.
AUDIO_FINAL_KERNEL = _size_before_final((NUM_CEPSTRA, MFCC_WINDOW), _audio_stages((1, 1)))


@dataclasses.dataclass(frozen=True)
class SyncNetConfig(model_io.ModelConfig):
  """Sizes of SyncNet v2; defaults = the released `syncnet_v2.model` (upstream hard-codes every
  width; `embed_dim` is `S`'s `num_layers_in_fc_layers`).

  The last conv of each tower spans the whole map left to it (audio (5, 4), lips 6x6 at 224),
  so the towers end at 1x1; `image_size` fixes the lip tower's last kernel.
  """

  model_type = "syncnet"
  label = "SyncNet"

  image_size: int = CROP_SIZE
  audio_channels: tuple[int, ...] = (64, 192, 384, 256, 256, 512)  # netcnnaud's six convs
  lip_channels: tuple[int, ...] = (96, 256, 256, 256, 256, 512)    # netcnnlip's six convs
  hidden_dim: int = 512     # netfcaud.0 / netfclip.0 outputs
  embed_dim: int = 1024     # netfcaud.3 / netfclip.3 outputs

  def __post_init__(self):
    for name in ("audio_channels", "lip_channels"):
      value = tuple(int(c) for c in getattr(self, name))
      object.__setattr__(self, name, value)  # config.json gives lists back
      if len(value) != 6 or min(value) < 1:
        raise UserError(f"SyncNetConfig.{name}={value} must be six positive widths (one per "
                        "conv of the tower).")
    if self.lip_final_kernel < 1:
      raise UserError(f"SyncNetConfig.image_size={self.image_size} is too small for the lip "
                      "tower (at least 51).")

  @property
  def lip_final_kernel(self) -> int:
    """Side of netcnnlip's last kernel: 6 at 224."""
    return _size_before_final((WINDOW_FRAMES, self.image_size, self.image_size),
                              _lip_stages(1))[-1]

  @classmethod
  def small(cls) -> "SyncNetConfig":
    """Tests: 96x96 frames, so the lip tower's last conv is still a real 2x2 kernel."""
    return cls(image_size=96, audio_channels=(8, 12, 16, 12, 12, 16),
               lip_channels=(8, 12, 12, 12, 12, 16), hidden_dim=16, embed_dim=24)


SYNCNET_FULL = SyncNetConfig()
SYNCNET_SMALL = SyncNetConfig.small()


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def _batch_norm(features: int, compute: Compute, rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, use_running_average=True, momentum=BATCH_NORM_MOMENTUM,
                       epsilon=BATCH_NORM_EPSILON, **compute.dense_kwargs(), rngs=rngs)


class ConvStage(nnx.Module):
  """Conv (2D or 3D), BatchNorm, ReLU, then upstream's max-pool where it has one."""

  def __init__(self, in_features: int, out_features: int, stage: _Stage, *,
               compute: Compute = FP32, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_features, out_features, kernel_size=stage.kernel,
                         strides=stage.stride, padding=tuple((p, p) for p in stage.padding),
                         **compute.dense_kwargs(), rngs=rngs)
    self.norm = _batch_norm(out_features, compute, rngs)
    self.pool = stage.pool

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.norm(self.conv(x)))
    if self.pool is not None:
      window, stride, padding = self.pool
      # flax pads a max-pool with -inf, as torch does.
      x = nnx.max_pool(x, window_shape=window, strides=stride,
                       padding=tuple((p, p) for p in padding))
    return x


class ConvTower(nnx.Module):
  """netcnnaud / netcnnlip: six conv stages down to a 1x1 map."""

  def __init__(self, in_features: int, widths: Sequence[int], stages: Sequence[_Stage], *,
               compute: Compute = FP32, rngs: nnx.Rngs):
    inputs = (in_features,) + tuple(widths[:-1])
    self.stages = nnx.List([ConvStage(i, o, s, compute=compute, rngs=rngs)
                            for i, o, s in zip(inputs, widths, stages)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for stage in self.stages:
      x = stage(x)
    return x.reshape(x.shape[0], -1)  # a 1x1 map: the same order as torch's view


class EmbeddingHead(nnx.Module):
  """netfcaud / netfclip: Linear, BatchNorm1d, ReLU, Linear."""

  def __init__(self, in_features: int, hidden: int, out_features: int, *,
               compute: Compute = FP32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(in_features, hidden, **compute.dense_kwargs(), rngs=rngs)
    self.norm = _batch_norm(hidden, compute, rngs)
    self.fc2 = nnx.Linear(hidden, out_features, **compute.dense_kwargs(), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.norm(self.fc1(x))))


class SyncNet(nnx.Module):
  """Upstream `S`: an audio and a lip tower that embed matching windows close together."""

  def __init__(self, config: SyncNetConfig = SYNCNET_FULL, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    c = config
    self.config = config
    self.audio_convs = ConvTower(1, c.audio_channels, _audio_stages(AUDIO_FINAL_KERNEL),
                                 compute=compute, rngs=rngs)
    self.audio_fc = EmbeddingHead(c.audio_channels[-1], c.hidden_dim, c.embed_dim,
                                  compute=compute, rngs=rngs)
    self.lip_convs = ConvTower(3, c.lip_channels, _lip_stages(c.lip_final_kernel),
                               compute=compute, rngs=rngs)
    self.lip_fc = EmbeddingHead(c.lip_channels[-1], c.hidden_dim, c.embed_dim, compute=compute,
                                rngs=rngs)

  def audio_embedding(self, mfcc_windows: jax.Array) -> jax.Array:
    """Upstream `forward_aud`: (b, 13, 20, 1) MFCC windows (cepstra x time) -> (b, embed_dim)."""
    if mfcc_windows.ndim != 4 or tuple(mfcc_windows.shape[1:]) != (NUM_CEPSTRA, MFCC_WINDOW, 1):
      raise ValueError(f"SyncNet's audio tower expects MFCC windows of shape (batch, "
                       f"{NUM_CEPSTRA}, {MFCC_WINDOW}, 1); got {tuple(mfcc_windows.shape)}.")
    return self.audio_fc(self.audio_convs(mfcc_windows))

  def lip_embedding(self, frame_windows: jax.Array) -> jax.Array:
    """Upstream `forward_lip`: (b, 5, H, W, 3) BGR 0..255 windows -> (b, embed_dim)."""
    size = self.config.image_size
    if frame_windows.ndim != 5 or tuple(frame_windows.shape[1:]) != (WINDOW_FRAMES, size, size,
                                                                     3):
      raise ValueError(f"SyncNet's lip tower expects windows of shape (batch, {WINDOW_FRAMES}, "
                       f"{size}, {size}, 3) (BGR, 0..255); got {tuple(frame_windows.shape)}. "
                       "Crop the faces first (`crop_faces`).")
    return self.lip_fc(self.lip_convs(frame_windows))

  def __call__(self, frame_windows: jax.Array, mfcc_windows: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """(lip embeddings, audio embeddings) of matching windows."""
    return self.lip_embedding(frame_windows), self.audio_embedding(mfcc_windows)


# ----------------------------------------------------------------------------------------------
# MFCC front end: python_speech_features.mfcc(signal, 16000) with its defaults
# ----------------------------------------------------------------------------------------------

MFCC_FRAME = 400       # 25 ms at 16 kHz
MFCC_STEP = 160        # 10 ms
MFCC_FFT = 512
MFCC_FILTERS = 26
PRE_EMPHASIS = 0.97
CEPSTRAL_LIFTER = 22


def _hz_to_mel(hz):
  return 2595 * np.log10(1 + hz / 700.0)


def _mel_to_hz(mel):
  return 700 * (10 ** (mel / 2595.0) - 1)


def mel_filterbank(num_filters: int = MFCC_FILTERS, fft_size: int = MFCC_FFT,
                   sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """(num_filters, fft_size // 2 + 1) triangles between mel-spaced FFT bins from 0 Hz to
  Nyquist, on bins rounded down as python_speech_features places them."""
  mels = np.linspace(_hz_to_mel(0), _hz_to_mel(sample_rate / 2), num_filters + 2)
  edges = np.floor((fft_size + 1) * _mel_to_hz(mels) / sample_rate)
  low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  bins = np.arange(fft_size // 2 + 1)[None].astype(np.float64)
  rising = (bins >= low) & (bins < centre)
  falling = (bins >= centre) & (bins < high)
  # Empty ranges (two equal edges) select no bin, so the guarded denominators are never used.
  up = (bins - low) / np.where(centre > low, centre - low, 1)
  down = (high - bins) / np.where(high > centre, high - centre, 1)
  return np.where(rising, up, np.where(falling, down, 0.0))


def _dct_matrix(size: int, count: int) -> np.ndarray:
  """(size, count): the first `count` columns of the orthonormal DCT-II (scipy's norm='ortho')."""
  n = np.arange(size)[:, None]
  k = np.arange(count)[None]
  matrix = np.sqrt(2.0 / size) * np.cos(np.pi * k * (2 * n + 1) / (2 * size))
  matrix[:, 0] /= np.sqrt(2.0)
  return matrix


_FILTERBANK = mel_filterbank()
_DCT = _dct_matrix(MFCC_FILTERS, NUM_CEPSTRA)
_LIFTER = 1 + (CEPSTRAL_LIFTER / 2.0) * np.sin(np.pi * np.arange(NUM_CEPSTRA) / CEPSTRAL_LIFTER)


def mfcc(samples: np.ndarray) -> np.ndarray:
  """(n,) 16 kHz mono samples (upstream: int16 values) -> (frames, 13) float64 MFCCs.

  python_speech_features' defaults: pre-emphasis 0.97; 400-sample frames every 160 samples,
  unwindowed, the last one zero-padded; power spectrum |rfft_512|² / 512; 26 mel filters; log
  (zeros replaced by float eps); orthonormal DCT-II, first 13; lifter 22; c0 replaced by the log
  of the frame's total power. 1 + ceil((n - 400) / 160) frames (at least one).
  """
  samples = np.asarray(samples)
  if samples.ndim != 1 or samples.size == 0:
    raise ValueError(f"mfcc expects a non-empty mono signal (n,); got shape {samples.shape}.")
  emphasised = np.empty(samples.shape, np.float64)
  emphasised[0] = samples[0]
  emphasised[1:] = samples[1:] - PRE_EMPHASIS * samples[:-1]
  count = 1 if samples.size <= MFCC_FRAME else 1 + int(
      np.ceil((samples.size - MFCC_FRAME) / MFCC_STEP))
  padded = np.zeros((count - 1) * MFCC_STEP + MFCC_FRAME)
  padded[:samples.size] = emphasised
  starts = np.arange(count)[:, None] * MFCC_STEP
  frames = padded[starts + np.arange(MFCC_FRAME)[None]]
  power = np.abs(np.fft.rfft(frames, MFCC_FFT)) ** 2 / MFCC_FFT
  eps = np.finfo(np.float64).eps
  energy = power.sum(axis=1)
  energy = np.where(energy == 0, eps, energy)
  bands = power @ _FILTERBANK.T
  bands = np.where(bands == 0, eps, bands)
  cepstra = (np.log(bands) @ _DCT) * _LIFTER
  cepstra[:, 0] = np.log(energy)
  return cepstra


# ----------------------------------------------------------------------------------------------
# Upstream's inputs
# ----------------------------------------------------------------------------------------------


def to_int16(audio: np.ndarray) -> np.ndarray:
  """Float samples in [-1, 1) -> int16 as ffmpeg's pcm_s16le writes them (round to nearest even,
  saturate); int16 input is returned as is."""
  audio = np.asarray(audio)
  if audio.dtype == np.int16:
    return audio
  return np.clip(np.rint(audio.astype(np.float64) * INT16_SCALE), -32768, 32767).astype(np.int16)


def window_count(num_frames: int, num_samples: int) -> int:
  """evaluate's windows: min(frames, floor(samples / 640)) - 5 (the last 5-frame window that
  would fit is not used upstream either)."""
  return min(num_frames, num_samples // SAMPLES_PER_FRAME) - WINDOW_FRAMES


class SyncInputs(NamedTuple):
  video: np.ndarray    # (frames, H, W, 3) float32 BGR 0..255
  mfcc: np.ndarray     # (mfcc frames, 13) float32
  num_windows: int


def syncnet_inputs(frames: np.ndarray, audio: np.ndarray) -> SyncInputs:
  """Our face crops (frames, H, W, 3) RGB uint8 at 25 fps and 16 kHz audio (float in [-1, 1), or
  int16) -> what upstream's evaluate feeds the network: BGR float frames 0..255 and the MFCCs of
  the int16 samples (cast to float32 as upstream's `.float()`), and how many windows it scores."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"syncnet_inputs expects RGB uint8 frames (frames, H, W, 3); got "
                     f"{frames.dtype} {frames.shape}.")
  samples = to_int16(audio)
  count = window_count(len(frames), len(samples))
  if count < 1:
    raise UserError(f"Sync-C / Sync-D need at least {WINDOW_FRAMES + 1} frames of video and of "
                    f"audio ({(WINDOW_FRAMES + 1) / FPS:.2f} s); got {len(frames)} frames and "
                    f"{len(samples)} samples.")
  video = frames[..., ::-1].astype(np.float32)
  return SyncInputs(video, mfcc(samples).astype(np.float32), count)


# ----------------------------------------------------------------------------------------------
# Face crops (run_pipeline.crop_video) from our landmarks
# ----------------------------------------------------------------------------------------------


def face_boxes(landmarks_px: np.ndarray, box_scale: float = LANDMARK_BOX_SCALE) -> np.ndarray:
  """(T, 478, 2) pixel landmarks of a face track -> (T, 3) smoothed (half size s, centre x,
  centre y) as crop_video computes them from its detections.

  Upstream: s = max(box width, box height) / 2 and the box centre, each median-filtered over the
  track with scipy's `medfilt(kernel_size=13)` (zero-padded at the ends, so the first and last 6
  frames lean towards smaller values; we keep that). A frame without landmarks (NaN) gets its
  box interpolated linearly between its neighbours, as `track_shot` interpolates missed
  detections.

  Our box is the bounding box of MediaPipe's FACE_OVAL (forehead top, landmark 10, to chin,
  cheek to cheek), scaled by `box_scale` about its centre; upstream's is S3FD's. S3FD is trained
  on WIDER FACE, whose boxes reach from the upper forehead to the chin and from ear to ear:
  larger than a box of 68-point landmarks (brows to chin), but about the extent of the face oval,
  which already includes the forehead. So we take the oval box unscaled (`box_scale` 1.0). This
  is a judgement, not a measurement (no S3FD here); a calibrated factor (median S3FD size /
  oval size on real footage) can be passed as `box_scale`.
  """
  landmarks_px = np.asarray(landmarks_px, np.float64)
  oval = landmarks_px[:, list(FACE_OVAL)]
  found = np.isfinite(oval).all(axis=(1, 2))
  if not found.any():
    raise UserError("no frame of the track has face landmarks; Sync-C / Sync-D need a face.")
  frames = np.arange(len(oval))
  low = oval.min(axis=1)
  high = oval.max(axis=1)
  boxes = np.concatenate([low, high], axis=1)  # (T, 4): x0, y0, x1, y1
  boxes = np.stack([np.interp(frames, frames[found], boxes[found, j]) for j in range(4)], axis=1)
  half = box_scale * np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
  centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
  centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
  return np.stack([scipy_signal.medfilt(v, kernel_size=BOX_SMOOTHING)
                   for v in (half, centre_x, centre_y)], axis=1)


# cv2.resize's bilinear weights are fixed point, 11 fractional bits.
_RESIZE_BITS = 11


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """cv2.resize INTER_LINEAR along one axis: source position (i + 0.5) * in / out - 0.5 (in
  float32), clamped to the first and last pixel; the two taps and the first one's weight in
  units of 2^-11 (the second's is the rest)."""
  source = ((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5).astype(np.float32)
  low = np.floor(source)
  fraction = source - low
  fraction = np.where(low < 0, 0, fraction)
  low = np.clip(low, 0, in_size - 1).astype(np.int64)
  fraction = np.where(low >= in_size - 1, 0, fraction)
  first = np.rint((1 - fraction) * (1 << _RESIZE_BITS)).astype(np.int64)
  return low, np.minimum(low + 1, in_size - 1), first


def resize_linear(image: np.ndarray, size: int) -> np.ndarray:
  """(h, w, c) uint8 -> (size, size, c) uint8 as cv2.resize(image, (size, size)) computes it:
  bilinear with pixel centres aligned, no antialiasing, in cv2's fixed point (rows first into
  22-bit integers, then columns, shifted and rounded as its vectorised uint8 path does). Equal to
  cv2 but for a rare value off by 1 (in the tests, under 0.5% of values)."""
  one = 1 << _RESIZE_BITS
  pixels = image.astype(np.int64)
  low, high, first = _linear_taps(image.shape[1], size)
  rows = (pixels[:, low] * first[None, :, None]
          + pixels[:, high] * (one - first)[None, :, None])  # (h, size, c), scaled by 2^11
  low, high, first = _linear_taps(image.shape[0], size)
  first, second = first[:, None, None], (one - first)[:, None, None]
  out = ((first * (rows[low] >> 4)) >> 16) + ((second * (rows[high] >> 4)) >> 16)
  return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def crop_faces(frames: np.ndarray, landmarks_px: np.ndarray,
               box_scale: float = LANDMARK_BOX_SCALE, size: int = CROP_SIZE) -> np.ndarray:
  """(T, H, W, 3) uint8 frames of one face track and their (T, 478, 2) pixel landmarks ->
  (T, size, size, 3) uint8 crops, with crop_video's arithmetic: the frame padded by
  int(s (1 + 2 cs)) pixels of grey 110, rows from the box centre - s to centre + s (1 + 2 cs),
  columns centre -/+ s (1 + cs) (cs = 0.4: the crop is 2.8 s square with the mouth below its
  middle), cut at integer indices as numpy slices do, resized to size x size (upstream's 224;
  a smaller network's `image_size` in tests). Channel order is kept (the grey is the same in
  every channel)."""
  frames = np.asarray(frames)
  boxes = face_boxes(landmarks_px, box_scale)
  if len(boxes) != len(frames):
    raise ValueError(f"{len(frames)} frames but {len(boxes)} landmark sets.")
  crops = np.empty((len(frames), size, size, frames.shape[-1]), np.uint8)
  for index, (frame, (half, centre_x, centre_y)) in enumerate(zip(frames, boxes)):
    pad = int(half * (1 + 2 * CROP_SCALE))
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=CROP_PAD_VALUE)
    centre_y, centre_x = centre_y + pad, centre_x + pad
    face = padded[int(centre_y - half):int(centre_y + half * (1 + 2 * CROP_SCALE)),
                  int(centre_x - half * (1 + CROP_SCALE)):int(centre_x + half * (1 + CROP_SCALE))]
    crops[index] = resize_linear(face, size)
  return crops


# ----------------------------------------------------------------------------------------------
# Offset search and scores (SyncNetInstance.evaluate)
# ----------------------------------------------------------------------------------------------


class SyncScores(NamedTuple):
  """evaluate's results; every field has the features' leading batch shape in front."""
  # upstream's "AV offset", vshift - argmin of mean_distances (int32), in video frames: lip
  # window i matches audio window i - offset, so a positive offset is audio that comes early.
  offset: jax.Array
  confidence: jax.Array      # Sync-C: median(mean_distances) - min(mean_distances)
  min_distance: jax.Array    # Sync-D: min(mean_distances)
  mean_distances: jax.Array  # (2 vshift + 1,) mean over windows, per offset -vshift .. vshift
  distances: jax.Array       # (windows, 2 vshift + 1): calc_pdist's rows (NaN past `lengths`)


@functools.partial(jax.jit, static_argnames=("vshift",))
def sync_scores(lip_features: jax.Array, audio_features: jax.Array,
                lengths: jax.Array | None = None, vshift: int = VSHIFT) -> SyncScores:
  """(..., n, d) lip and audio embeddings of the same n windows -> SyncScores, as evaluate.

  calc_pdist: window i's lip embedding against the audio embeddings of windows i - vshift ..
  i + vshift, an out-of-range one being the zero vector (upstream zero-pads), by
  ||lip - audio + 1e-6|| (pairwise_distance's eps). lengths (...,): windows of each sequence when
  a batch holds sequences of different lengths, padded at the end (default all n); windows past
  a sequence's length are neither scored nor matched, as if it ended there.
  """
  count = lip_features.shape[-2]
  if lengths is None:
    lengths = jnp.full(lip_features.shape[:-2], count, jnp.int32)
  lengths = jnp.asarray(lengths)
  windows = jnp.arange(count)
  valid = windows < lengths[..., None]  # (..., n)

  def distances_at(shift):
    partner = windows + shift
    present = (partner >= 0) & (partner < lengths[..., None])
    audio = jnp.take(audio_features, jnp.clip(partner, 0, count - 1), axis=-2)
    audio = jnp.where(present[..., None], audio, 0)
    return jnp.linalg.norm(lip_features - audio + PAIRWISE_EPS, axis=-1)  # (..., n)

  shifts = jnp.arange(-vshift, vshift + 1)
  distances = jnp.moveaxis(jax.lax.map(distances_at, shifts), 0, -1)  # (..., n, 2 vshift + 1)
  summed = jnp.sum(jnp.where(valid[..., None], distances, 0), axis=-2)
  mean_distances = summed / lengths[..., None].astype(summed.dtype)
  best = jnp.argmin(mean_distances, axis=-1)  # the first minimum, as torch.min
  min_distance = jnp.min(mean_distances, axis=-1)
  # 2 vshift + 1 values: the median is the middle one (torch.median's lower middle agrees).
  confidence = jnp.median(mean_distances, axis=-1) - min_distance
  return SyncScores(offset=(vshift - best).astype(jnp.int32), confidence=confidence,
                    min_distance=min_distance, mean_distances=mean_distances,
                    distances=jnp.where(valid[..., None], distances, jnp.nan))


class SyncNetScorer:
  """Sync-C / Sync-D of face crops against their speech, as upstream's evaluate.

  >>> score = SyncNetScorer(load_syncnet("syncnet/"))
  >>> result = score(crop_faces(frames, landmarks), audio)   # RGB uint8 crops, 16 kHz audio
  >>> result.confidence, result.min_distance, result.offset  # Sync-C, Sync-D, frames

  The windows are embedded `batch_size` at a time by one compiled program (the last batch
  padded), each batch cut on device from the frames and MFCCs it covers and split over this
  host's devices (`batch_size` rounded up to a multiple of them; the weights on every one).
  """

  def __init__(self, model: SyncNet, batch_size: int = BATCH_SIZE, vshift: int = VSHIFT):
    devices = jax.local_devices()
    self.batch_size = batch_size = -(-batch_size // len(devices)) * len(devices)
    self.vshift = vshift
    mesh = Mesh(np.array(devices), ("batch",))
    windows = NamedSharding(mesh, PartitionSpec("batch"))
    graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

    def embed(state, frames, mfccs):
      # frames (batch + 4, H, W, 3) and MFCCs (4 batch + 16, 13): window b is frames b .. b+4
      # and MFCC frames 4b .. 4b+19.
      net = nnx.merge(graphdef, state)
      starts = jnp.arange(batch_size)[:, None]
      lips = jax.lax.with_sharding_constraint(frames[starts + jnp.arange(WINDOW_FRAMES)], windows)
      audio = jax.lax.with_sharding_constraint(  # (batch, 20, 13)
          mfccs[MFCC_PER_FRAME * starts + jnp.arange(MFCC_WINDOW)], windows)
      return net.lip_embedding(lips), net.audio_embedding(jnp.swapaxes(audio, 1, 2)[..., None])

    # `state` is an argument, so the weights are not baked into the program as constants.
    self._embed = jax.jit(embed, out_shardings=(windows, windows))

  def features(self, inputs: SyncInputs) -> tuple[np.ndarray, np.ndarray]:
    """(lip, audio) embeddings (num_windows, embed_dim) float32 of `syncnet_inputs`' output."""
    video, mfccs, count = inputs
    batch = self.batch_size
    frame_span = batch + WINDOW_FRAMES - 1
    mfcc_span = MFCC_PER_FRAME * (batch - 1) + MFCC_WINDOW
    lips, audio = [], []
    for start in range(0, count, batch):
      frames = _take_padded(video, start, frame_span)
      coefficients = _take_padded(mfccs, MFCC_PER_FRAME * start, mfcc_span)
      lip_batch, audio_batch = self._embed(self.state, frames, coefficients)
      keep = min(batch, count - start)
      lips.append(np.asarray(lip_batch)[:keep])
      audio.append(np.asarray(audio_batch)[:keep])
    return np.concatenate(lips), np.concatenate(audio)

  def __call__(self, frames: np.ndarray, audio: np.ndarray) -> SyncScores:
    """RGB uint8 face crops (frames, H, W, 3) at 25 fps and their 16 kHz audio -> SyncScores."""
    lips, speech = self.features(syncnet_inputs(frames, audio))
    return sync_scores(lips, speech, vshift=self.vshift)


def _take_padded(array: np.ndarray, start: int, length: int) -> np.ndarray:
  """array[start:start + length], zero-padded at the end to `length` rows."""
  part = array[start:start + length]
  if len(part) < length:
    part = np.concatenate([part, np.zeros((length - len(part),) + part.shape[1:], part.dtype)])
  return part
