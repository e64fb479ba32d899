"""FVD's network: the Kinetics-400 I3D (Inception-v1 inflated to 3-D) and its preprocessing.

What FVD runs, as read from the sources (stored public copies, read before writing this):

- universome/stylegan-v, src/metrics/frechet_video_distance.py: `compute_fvd` loads
  `i3d_torchscript.pt` (https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt) with
  `detector_kwargs = dict(rescale=True, resize=True, return_features=True)`, "raw features before
  the softmax layer": 400 values per clip. Its comment calls the file a "perfectly reproduced
  torchscript version" of the I3D that Google's reference FVD code loads from tf.hub
  (`deepmind/i3d-kinetics-400/1`, whose weights differ from the kinetics-i3d release).
- universome/fvd-comparison (README.md, compare_models.py, their_fvd.py): the TorchScript module
  called with rescale=False, resize=False on [-1, 1]-range clips (B, 3, T, 224, 224) matches the
  tf.hub module to an L2 difference of 2.6e-4 over 4 x 400 outputs. The tf.hub module takes
  (B, T, 224, 224, 3) in [-1, 1] and FVD reads its tensor `RGB/inception_i3d/Mean:0`: the logits
  averaged over the remaining time steps (google-research frechet_video_distance.py, copied in
  their_fvd.py: frames are resized with tf.image.resize_bilinear, then scaled 2 * x / 255 - 1).
- universome/stylegan-v, src/metrics/metric_utils.py: the detector gets uint8 videos
  (B, 3, T, H, W) in [0, 255]: dataset clips as stored, generator frames as
  `(img * 127.5 + 128).clamp(0, 255).to(torch.uint8)`; a one-channel video is repeated to three.
  `metric_main.py`: fvd2048_16f (16 consecutive frames, 2048 real and 2048 generated clips),
  fvd2048_128f (128 frames), fvd2048_128f_subsample8f (16 frames, every 8th of 128). The
  feature batch holds NUM_FRAMES_IN_BATCH[resolution] // num_frames clips.
- The TorchScript module's flags, as its users describe them (several public FVD scripts that
  call it, e.g. JunyaoHu/common_metrics_on_video_quality fvd/styleganv/fvd.py and a metrics module
  that documents the flags): `rescale=True` maps [0, 255] to [-1, 1] as x / 255 * 2 - 1;
  `resize=True` resizes every frame to 224 x 224 with torch's bilinear interpolation
  (align_corners=False, no antialiasing; aspect ratio not kept, nothing cropped): the "upsampling
  operation" in which StyleGAN-V says it differs from the TF code (TF1's resize_bilinear maps
  output pixel i to input i * in / out, without torch's half-pixel offset). Fewer than 9 frames
  fail: by the SAME arithmetic below, 8 frames leave 1 time step for the 2-step final pool.
- Layout and arithmetic (piergiaj/pytorch-i3d pytorch_i3d.py and VideoGPT's copy of it in
  JunyaoHu/common_metrics_on_video_quality fvd/videogpt/pytorch_i3d.py; the tf.hub module's graph
  and variable list, saved_model.pb and variables.index of i3d-kinetics-tensorflow1-400-v1 in
  that repository): `InceptionI3d` = Unit3D Conv3d_1a_7x7 (64, 7x7x7, stride 2),
  MaxPool3d_2a_3x3 (1x3x3, stride 1x2x2), Conv3d_2b_1x1 (64), Conv3d_2c_3x3 (192),
  MaxPool3d_3a_3x3 (1x3x3, stride 1x2x2), Mixed_3b, Mixed_3c, MaxPool3d_4a_3x3 (3x3x3, stride 2),
  Mixed_4b..4f, MaxPool3d_5a_2x2 (2x2x2, stride 2), Mixed_5b, Mixed_5c, average pool (2, 7, 7)
  stride 1 VALID (the graph's Logits/AvgPool3D: ksize 1,2,7,7,1), dropout (inactive), `logits`
  (1x1x1 conv with bias, no norm, no activation), squeeze, mean over time (the graph's `Mean`).
  Unit3D = conv (no bias) + BatchNorm + ReLU. The graph's BatchNorm has beta, moving mean and
  variance but no scale variable (a torch port carries weight = 1) and adds epsilon 0.001 (the
  `batch_norm/add/y` constant; piergiaj: BatchNorm3d(eps=0.001, momentum=0.01)).
  An Inception module concatenates b0 (1x1), b1a (1x1) -> b1b (3x3x3), b2a (1x1) -> b2b (3x3x3),
  b3a (max-pool 3x3x3, stride 1) -> b3b (1x1), in that order, on the channel axis.
  Every conv and max-pool pads TF-"SAME" (the graph's padding attributes), computed from the
  input size at each call: total max((ceil(n / s) - 1) * s + k - n, 0), the smaller half
  before. piergiaj pads max-pool inputs with zeros where TF pads with -inf; every max-pool here
  reads a ReLU output (>= 0), so the two agree, and we pad with -inf as XLA's SAME pooling does.

What we could NOT read: the archive itself (the stored public snapshots omit files of 4 MiB
and more, and no public text lists its keys or its TorchScript code), so its parameter names are
an assumption: piergiaj's `InceptionI3d` names (see
`i3d_params`), which is also the layout of VideoGPT's `i3d_pretrained_400.pt`, the same tf.hub
weights saved as a plain state dict (with BatchNorm eps 1e-5 in VideoGPT's code: set
`batch_norm_epsilon` accordingly for that file). A file with other names fails conversion with one
error listing every missing and unexpected key. The order rescale -> resize inside the archive is
also assumed; both are linear, so the order changes only float rounding.

Channels-last here: videos are (batch, frames, height, width, 3) in [-1, 1]. Two documented input
conventions (`preprocess_videos`): "stylegan_v" (exactly the StyleGAN-V detector flags) and
"center_crop_224" (the shorter side resized to 224, centre crop 224 x 224, [-1, 1]: the
VideoGPT / MCVD / common_metrics_on_video_quality preprocessing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax import model_io
from etalk_jax.errors import UserError
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.logical_axes import (
  COMMON,
  NORM,
  NORM_PARENT,
  Rule,
  parameter_of,
  register_family,
)
from etalk_jax.vision.pdfgc import resize_bilinear

# Sonnet's BatchNorm default (the tf.hub module) and piergiaj's Unit3D: eps 1e-3, momentum 0.01
# (flax counts momentum the other way round).
BATCH_NORM_EPSILON = 1e-3
BATCH_NORM_MOMENTUM = 0.99
# The side the network is fed at (the final 7x7 average pool needs exactly 7x7 after the /32).
INPUT_SIZE = 224
# SAME pooling and time strides leave fewer than the final 2-frame window below this.
MIN_FRAMES = 9
CONVENTIONS = ("stylegan_v", "center_crop_224")

# (b0, b1a, b1b, b2a, b2b, b3b) output widths of Mixed_3b, 3c, 4b..4f, 5b, 5c (the paper's).
_FULL_MIXED = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64),
               (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64),
               (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
               (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128),
               (384, 192, 384, 48, 128, 128))
MIXED_NAMES = ("3b", "3c", "4b", "4c", "4d", "4e", "4f", "5b", "5c")
# A max-pool (window, strides) precedes these Inception modules.
_POOL_BEFORE = {"3b": ((1, 3, 3), (1, 2, 2)), "4b": ((3, 3, 3), (2, 2, 2)),
                "5b": ((2, 2, 2), (2, 2, 2))}


def _mixed_out(widths: Sequence[int]) -> int:
  return widths[0] + widths[2] + widths[4] + widths[5]


@dataclasses.dataclass(frozen=True)
class I3DConfig(model_io.ModelConfig):
  """Sizes of the I3D; defaults = the Kinetics-400 network of `i3d_torchscript.pt`."""

  model_type = "i3d"
  label = "I3D"

  in_channels: int = 3
  stem_channels: int = 64        # Conv3d_1a_7x7 and Conv3d_2b_1x1
  conv2c_channels: int = 192     # Conv3d_2c_3x3
  mixed_channels: tuple[tuple[int, ...], ...] = _FULL_MIXED
  num_classes: int = 400
  pool_window: tuple[int, int, int] = (2, 7, 7)  # the final average pool (time, height, width)
  batch_norm_epsilon: float = BATCH_NORM_EPSILON

  def __post_init__(self):
    # config.json gives lists: stored as tuples so that a loaded config equals the original.
    object.__setattr__(self, "mixed_channels", tuple(tuple(int(c) for c in m)
                                                     for m in self.mixed_channels))
    object.__setattr__(self, "pool_window", tuple(int(p) for p in self.pool_window))
    if len(self.mixed_channels) != len(MIXED_NAMES) or any(
        len(m) != 6 or min(m) < 1 for m in self.mixed_channels):
      raise UserError(f"I3DConfig.mixed_channels needs {len(MIXED_NAMES)} Inception modules of "
                      f"6 positive widths (b0, b1a, b1b, b2a, b2b, b3b); got "
                      f"{self.mixed_channels}.")
    if len(self.pool_window) != 3 or min(self.pool_window) < 1:
      raise UserError(f"I3DConfig.pool_window={self.pool_window} must be 3 positive sizes "
                      "(time, height, width).")

  @property
  def feature_channels(self) -> int:
    """Width of Mixed_5c's output, which the logits read (1024 at full size)."""
    return _mixed_out(self.mixed_channels[-1])

  def mixed_in_channels(self) -> list[int]:
    """Input width of every Inception module: the previous one's concatenated output."""
    widths = [self.conv2c_channels]
    widths += [_mixed_out(m) for m in self.mixed_channels[:-1]]
    return widths

  @property
  def input_size(self) -> int:
    """The frame side that reaches the final average pool with exactly its window in space
    (five stride-2 stages: 32 x the window; 224 for the real network)."""
    return 32 * self.pool_window[1]

  @classmethod
  def small(cls) -> "I3DConfig":
    """Tests: every layer of the full network, narrow, each width different (so a swapped
    branch shows); a 2x2x2 final pool so that 9 frames of 40x48 (odd sizes after the first
    strides: 5x6, 3x3) reach it."""
    mixed = tuple(tuple(4 + ((3 * i + j) % 5) for j in range(6)) for i in range(9))
    return cls(stem_channels=8, conv2c_channels=12, mixed_channels=mixed, pool_window=(2, 2, 2))


I3D_FULL = I3DConfig()
I3D_SMALL = I3DConfig.small()


def _same_output(size: int, stride: int) -> int:
  return -(-size // stride)  # TF SAME: ceil(size / stride)


def feature_map_size(config: I3DConfig, frames: int, height: int, width: int
                     ) -> tuple[int, int, int]:
  """(time, height, width) of Mixed_5c's output for an input of that size (SAME everywhere)."""
  size = [frames, height, width]
  for stride in ((2, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)):  # 1a, 2a, 3a, 4a, 5a
    size = [_same_output(n, s) for n, s in zip(size, stride)]
  return tuple(size)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resize_frames(videos: jax.Array, height: int, width: int) -> jax.Array:
  """(b, t, h, w, c) -> (b, t, height, width, c), torch bilinear (align_corners=False)."""
  b, t, h, w, c = videos.shape
  if (h, w) == (height, width):
    return videos  # torch's interpolate to the same size is the identity
  frames = resize_bilinear(videos.reshape(b * t, h, w, c), height, width)
  return frames.reshape(b, t, height, width, c)


def preprocess_videos(frames, convention: str = "stylegan_v",
                      size: int | Sequence[int] = INPUT_SIZE) -> jax.Array:
  """Raw clips -> the network's input, (batch, frames, size, size, 3) float32 in [-1, 1].

  frames: (batch, frames, height, width, 3) or (..., 1) uint8 in [0, 255] (a float array is read
    on the same 0-255 scale); a one-channel video is repeated to three, as StyleGAN-V does.
    Which frames make a clip is the caller's: StyleGAN-V's fvd2048_16f takes 16 consecutive
    frames (`fvd2048_128f_subsample8f`: every 8th of 128).
  convention:
    "stylegan_v": exactly the detector flags StyleGAN-V passes (`rescale=True, resize=True`):
      x / 255 * 2 - 1, then every frame resized to size x size with torch's bilinear
      interpolation (align_corners=False, no antialiasing), the aspect ratio not kept.
    "center_crop_224": the shorter side resized to `size` (the other to ceil(side * scale)),
      torch bilinear as above, then the centre size x size crop, x / 255 * 2 - 1 (VideoGPT's /
      MCVD's `preprocess_single`).
  size: the output side; the real network needs 224 (tests use smaller).
  """
  if convention not in CONVENTIONS:
    raise UserError(f"I3D preprocessing convention {convention!r} is unknown; choose one of "
                    f"{', '.join(CONVENTIONS)}.")
  videos = jnp.asarray(frames)
  if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
    raise ValueError("I3D preprocessing expects clips of shape (batch, frames, height, width, 3) "
                     f"(or 1 channel), uint8 in [0, 255]; got {tuple(videos.shape)}.")
  if videos.shape[-1] == 1:
    videos = jnp.repeat(videos, 3, axis=-1)
  videos = videos.astype(jnp.float32)
  height, width = _as_size(size)
  if convention == "stylegan_v":
    return _resize_frames(videos * 2.0 / 255.0 - 1.0, height, width)
  if height != width:
    raise UserError(f"the center_crop_224 convention crops a square; got size {size}.")
  h, w = videos.shape[2:4]
  scale = height / min(h, w)
  # VideoGPT: the shorter side becomes exactly `size`, the other ceil(side * scale).
  target = (height, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), height)
  videos = _resize_frames(videos / 255.0, *target)
  top, left = (target[0] - height) // 2, (target[1] - height) // 2
  videos = videos[:, :, top:top + height, left:left + height]
  return (videos - 0.5) * 2.0


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def _max_pool_same(x: jax.Array, window: Sequence[int], strides: Sequence[int]) -> jax.Array:
  # XLA's SAME pads -inf with the smaller half before, as TF; piergiaj's zero padding agrees
  # because every pooled tensor here is a ReLU output.
  return nnx.max_pool(x, window_shape=tuple(window), strides=tuple(strides), padding="SAME")


class Unit3D(nnx.Module):
  """piergiaj's / Sonnet's Unit3D: a bias-free 3-D conv with TF-SAME padding, BatchNorm
  (running statistics), ReLU."""

  def __init__(self, in_features: int, out_features: int, kernel: Sequence[int],
               strides: Sequence[int] = (1, 1, 1), *, epsilon: float = BATCH_NORM_EPSILON,
               compute: Compute = FP32, rngs: nnx.Rngs):
    # flax's "SAME" is computed from the input size at each call, as TF's and piergiaj's.
    self.conv = nnx.Conv(in_features, out_features, kernel_size=tuple(kernel),
                         strides=tuple(strides), padding="SAME", use_bias=False,
                         **compute.dense_kwargs(), rngs=rngs)
    self.norm = nnx.BatchNorm(out_features, use_running_average=True,
                              momentum=BATCH_NORM_MOMENTUM, epsilon=epsilon,
                              **compute.dense_kwargs(), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.norm(self.conv(x)))


class InceptionModule(nnx.Module):
  """Four branches concatenated on channels: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; max-pool 3x3x3
  (stride 1) -> 1x1."""

  def __init__(self, in_features: int, widths: Sequence[int], *, epsilon: float,
               compute: Compute = FP32, rngs: nnx.Rngs):
    b0, b1a, b1b, b2a, b2b, b3b = widths
    unit = dict(epsilon=epsilon, compute=compute, rngs=rngs)
    self.branch0 = Unit3D(in_features, b0, (1, 1, 1), **unit)
    self.branch1a = Unit3D(in_features, b1a, (1, 1, 1), **unit)
    self.branch1b = Unit3D(b1a, b1b, (3, 3, 3), **unit)
    self.branch2a = Unit3D(in_features, b2a, (1, 1, 1), **unit)
    self.branch2b = Unit3D(b2a, b2b, (3, 3, 3), **unit)
    self.branch3 = Unit3D(in_features, b3b, (1, 1, 1), **unit)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([
        self.branch0(x),
        self.branch1b(self.branch1a(x)),
        self.branch2b(self.branch2a(x)),
        self.branch3(_max_pool_same(x, (3, 3, 3), (1, 1, 1))),
    ], axis=-1)


# Logical-axis table: the common layers and BatchNorm's running statistics.
I3D_AXES = COMMON + (Rule(parameter_of(NORM_PARENT, "(?:mean|var)"), 1, (NORM,)),)


class I3D(nnx.Module):
  """The Kinetics-400 I3D of FVD; `__call__` gives the 400 features FVD compares (the logits
  averaged over time, before the softmax). Inference only: BatchNorm reads its running
  statistics and the dropout before the logits (inactive upstream in eval) is left out."""

  logical_family = register_family("i3d", I3D_AXES)

  def __init__(self, config: I3DConfig = I3D_FULL, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.config = config
    c = config
    unit = dict(epsilon=c.batch_norm_epsilon, compute=compute, rngs=rngs)
    self.conv_1a = Unit3D(c.in_channels, c.stem_channels, (7, 7, 7), (2, 2, 2), **unit)
    self.conv_2b = Unit3D(c.stem_channels, c.stem_channels, (1, 1, 1), **unit)
    self.conv_2c = Unit3D(c.stem_channels, c.conv2c_channels, (3, 3, 3), **unit)
    self.mixed = nnx.Dict({
        name: InceptionModule(width_in, widths, **unit)
        for name, width_in, widths in zip(MIXED_NAMES, c.mixed_in_channels(), c.mixed_channels)})
    self.logits = nnx.Conv(c.feature_channels, c.num_classes, kernel_size=(1, 1, 1),
                           padding="VALID", **compute.dense_kwargs(), rngs=rngs)

  def check_videos(self, videos: jax.Array) -> None:
    """Raises a ValueError unless `videos` reach the final pool with exactly one position in
    space (upstream squeezes height and width) and at least one in time."""
    c = self.config
    if videos.ndim != 5 or videos.shape[-1] != c.in_channels:
      raise ValueError(f"I3D expects videos of shape (batch, frames, height, width, "
                       f"{c.in_channels}) in [-1, 1]; got {tuple(videos.shape)}. Map raw uint8 "
                       "clips with `etalk_jax.evaluation.i3d.preprocess_videos`.")
    t, h, w = feature_map_size(c, *videos.shape[1:4])
    window = c.pool_window
    if t < window[0] or (h, w) != window[1:]:
      raise ValueError(
          f"I3D cannot read clips of {videos.shape[1]} frames of {videos.shape[2]}x"
          f"{videos.shape[3]}: Mixed_5c gives {t}x{h}x{w} positions and the final average pool "
          f"needs at least {window[0]} in time and exactly {window[1]}x{window[2]} in space. "
          f"The real network takes at least {MIN_FRAMES} frames of {INPUT_SIZE}x{INPUT_SIZE} "
          "(`preprocess_videos` resizes).")

  def feature_map(self, videos: jax.Array) -> jax.Array:
    """Mixed_5c's output, (b, t/8, h/32, w/32, feature_channels)."""
    x = self.conv_1a(videos)
    x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))        # MaxPool3d_2a_3x3
    x = self.conv_2c(self.conv_2b(x))
    for name in MIXED_NAMES:
      if name in _POOL_BEFORE:                        # MaxPool3d_3a_3x3 / 4a_3x3 / 5a_2x2
        x = _max_pool_same(x, *_POOL_BEFORE[name])
      x = self.mixed[name](x)
    return x

  def __call__(self, videos: jax.Array) -> jax.Array:
    """(b, frames, height, width, 3) in [-1, 1] -> (b, num_classes): the features of FVD."""
    self.check_videos(videos)
    x = nnx.avg_pool(self.feature_map(videos), window_shape=self.config.pool_window,
                     strides=(1, 1, 1), padding="VALID")
    logits = self.logits(x)                          # (b, t', 1, 1, classes)
    return jnp.mean(logits[:, :, 0, 0, :], axis=1)   # averaged over time, as tf.hub's Mean:0

  def probabilities(self, videos: jax.Array) -> jax.Array:
    """Upstream's output without `return_features`: the softmax of the features."""
    return jax.nn.softmax(self(videos), axis=-1)

