"""FID's Inception-v3: the network pytorch-fid computes FID with, returning the pool3 features.

Read from `mseitzer/pytorch-fid` v0.3.0, src/pytorch_fid/inception.py (`InceptionV3`, whose
`blocks` run Conv2d_1a_3x3 .. Mixed_7c and an adaptive average pool; `fid_inception_v3()`, which
builds torchvision's `Inception3(num_classes=1008, aux_logits=False)` and swaps in the FID blocks
`FIDInceptionA` (Mixed_5b..5d), `FIDInceptionC` (Mixed_6b..6e), `FIDInceptionE_1` (Mixed_7b) and
`FIDInceptionE_2` (Mixed_7c)) and src/pytorch_fid/fid_score.py (`ImagePathDataset` with
`TF.ToTensor()`), and from torchvision's models/inception.py (`Inception3`, `BasicConv2d`,
`InceptionA`..`InceptionE`).

What makes it the FID network rather than torchvision's Inception-v3 (the 2015 TensorFlow graph
pytorch-fid ported): every 3x3 average pool in the pool branches leaves the zero padding out of
the mean (`count_include_pad=False`), and Mixed_7c's pool branch max-pools instead.

Preprocessing as `InceptionV3(resize_input=True, normalize_input=True)`: images in [0, 1],
bilinearly resized to 299x299 (torch's `F.interpolate(align_corners=False)`, which never
antialiases; `jax.image.resize` matches it only with `antialias=False`, within 1 ulp), then
mapped to [-1, 1] by 2x - 1. `inception_inputs` maps uint8 RGB frames to those [0, 1] images as
fid_score's `ToTensor` does (divided by 255).

Module and attribute names are upstream's (the 2015 graph's `Mixed_5b`, torchvision's
`branch3x3dbl_1`, `conv` / `bn`): they are what every FID implementation calls these layers, and
the converter maps them one to one. Channels-last: images are (batch, height, width, 3).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etalk_jax import model_io
from etalk_jax.errors import UserError
from etalk_jax.layers.compute import FP32, Compute

# torchvision's BasicConv2d: BatchNorm2d(eps=0.001); momentum unused (inference only).
BATCH_NORM_EPSILON = 1e-3
# Every upstream width is a multiple of 16 (32, 48, ..., 448): the largest divisor allowed.
WIDTH_GRANULE = 16
# The smallest input the trunk's valid convs and stride-2 pools accept (8x8 -> 1x1 at Mixed_7a).
MIN_IMAGE_SIZE = 75
# Gathers in the resize run at full fp32 precision on every backend (TF32 would move them).
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class InceptionConfig(model_io.ModelConfig):
  """Sizes of FID's Inception-v3; defaults = `pt_inception-2015-12-05-6726825d.pth`.

  Upstream hard-codes every width; `width_divisor` divides all of them at once so that tests can
  build a narrow network of the same structure (the pool3 features are 2048 / width_divisor
  wide). `image_size` is pytorch-fid's resize target (299); `num_classes` the width of the
  file's classifier `fc` (1008: the 2015 graph's 1008 classes).
  """

  model_type = "fid_inception"
  label = "FID Inception-v3"

  image_size: int = 299
  width_divisor: int = 1
  num_classes: int = 1008

  def __post_init__(self):
    if self.width_divisor < 1 or WIDTH_GRANULE % self.width_divisor:
      raise UserError(f"InceptionConfig.width_divisor={self.width_divisor} must divide "
                      f"{WIDTH_GRANULE} (every upstream width is a multiple of it).")
    if self.image_size < MIN_IMAGE_SIZE:
      raise UserError(f"InceptionConfig.image_size={self.image_size} is below "
                      f"{MIN_IMAGE_SIZE}, the smallest input Inception-v3 takes.")
    if self.num_classes < 1:
      raise UserError(f"InceptionConfig.num_classes={self.num_classes} must be at least 1.")

  def width(self, upstream: int) -> int:
    """One of upstream's hard-coded widths in this configuration."""
    return upstream // self.width_divisor

  @property
  def feature_dim(self) -> int:
    """Width of the pool3 features (Mixed_7c's output): 2048 at full size."""
    return self.width(2048)

  @classmethod
  def small(cls) -> "InceptionConfig":
    """Tests: the full structure and the full 299x299 resize at an eighth of the widths."""
    return cls(width_divisor=8, num_classes=10)


INCEPTION_FULL = InceptionConfig()
INCEPTION_SMALL = InceptionConfig.small()


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def inception_inputs(frames: Any) -> np.ndarray:
  """uint8 RGB frames (N, H, W, 3) -> float32 images in [0, 1], as fid_score's `ToTensor`.

  On the host in numpy: `ToTensor` divides by 255 in float32, and XLA would rewrite the
  division as a multiplication by 1/255 (1 ulp off for some values).
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"frames have dtype {frames.dtype}; give uint8 RGB frames (N, H, W, 3), "
                     "as decoded from the video.")
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames have shape {tuple(frames.shape)}; give RGB frames "
                     "(N, height, width, 3).")
  return frames.astype(np.float32) / np.float32(255)


def resize_and_normalize(images: jax.Array, image_size: int) -> jax.Array:
  """[0, 1] images (b, h, w, 3) -> the trunk's input (b, image_size, image_size, 3) in [-1, 1]:
  `InceptionV3`'s `F.interpolate(size=(299, 299), mode="bilinear", align_corners=False)` and
  `2 * x - 1`. No antialiasing when downsampling, as torch."""
  batch, _, _, channels = images.shape
  resized = jax.image.resize(images, (batch, image_size, image_size, channels), method="linear",
                             antialias=False, precision=_EXACT)
  return 2 * resized - 1


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def _max_pool_3x3(x: jax.Array, stride: int, padding: int) -> jax.Array:
  # torch's max pool pads with -inf, as reduce_window does; floor on odd sizes like VALID.
  return nnx.max_pool(x, window_shape=(3, 3), strides=(stride, stride),
                      padding=((padding, padding),) * 2)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # The FID blocks' F.avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=False): the
  # mean over the window's pixels inside the image, as TensorFlow's SAME average pool.
  return nnx.avg_pool(x, window_shape=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


class BasicConv2d(nnx.Module):
  """torchvision's BasicConv2d: conv without bias, BatchNorm (eps 0.001, running statistics),
  ReLU."""

  def __init__(self, in_features: int, out_features: int, kernel: int | tuple[int, int], *,
               stride: int = 1, padding: int | tuple[int, int] = 0, compute: Compute = FP32,
               rngs: nnx.Rngs):
    pad_h, pad_w = _pair(padding)
    self.conv = nnx.Conv(in_features, out_features, kernel_size=_pair(kernel),
                         strides=(stride, stride), padding=((pad_h, pad_h), (pad_w, pad_w)),
                         use_bias=False, **compute.dense_kwargs(), rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, use_running_average=True, epsilon=BATCH_NORM_EPSILON,
                            **compute.dense_kwargs(), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
  """Mixed_5b..5d (pytorch-fid's FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, in_features: int, pool_features: int, config: InceptionConfig, *,
               compute: Compute = FP32, rngs: nnx.Rngs):
    w = config.width
    kw = {"compute": compute, "rngs": rngs}
    self.branch1x1 = BasicConv2d(in_features, w(64), 1, **kw)
    self.branch5x5_1 = BasicConv2d(in_features, w(48), 1, **kw)
    self.branch5x5_2 = BasicConv2d(w(48), w(64), 5, padding=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_features, w(64), 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, padding=1, **kw)
    self.branch_pool = BasicConv2d(in_features, pool_features, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(_avg_pool_3x3_same(x))
    return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (torchvision's InceptionB, 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  def __init__(self, in_features: int, config: InceptionConfig, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    w = config.width
    kw = {"compute": compute, "rngs": rngs}
    self.branch3x3 = BasicConv2d(in_features, w(384), 3, stride=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_features, w(64), 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, stride=2, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), branch3x3dbl, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e (pytorch-fid's FIDInceptionC): factorised 7x7 convs (1x7 and 7x1) and an
  avgpool-1x1 branch."""

  def __init__(self, in_features: int, channels_7x7: int, config: InceptionConfig, *,
               compute: Compute = FP32, rngs: nnx.Rngs):
    w, c7 = config.width, channels_7x7
    kw = {"compute": compute, "rngs": rngs}
    self.branch1x1 = BasicConv2d(in_features, w(192), 1, **kw)
    self.branch7x7_1 = BasicConv2d(in_features, c7, 1, **kw)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7_3 = BasicConv2d(c7, w(192), (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_1 = BasicConv2d(in_features, c7, 1, **kw)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_5 = BasicConv2d(c7, w(192), (1, 7), padding=(0, 3), **kw)
    self.branch_pool = BasicConv2d(in_features, w(192), 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      branch7x7dbl = layer(branch7x7dbl)
    branch_pool = self.branch_pool(_avg_pool_3x3_same(x))
    return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (torchvision's InceptionD, 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  def __init__(self, in_features: int, config: InceptionConfig, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    w = config.width
    kw = {"compute": compute, "rngs": rngs}
    self.branch3x3_1 = BasicConv2d(in_features, w(192), 1, **kw)
    self.branch3x3_2 = BasicConv2d(w(192), w(320), 3, stride=2, **kw)
    self.branch7x7x3_1 = BasicConv2d(in_features, w(192), 1, **kw)
    self.branch7x7x3_2 = BasicConv2d(w(192), w(192), (1, 7), padding=(0, 3), **kw)
    self.branch7x7x3_3 = BasicConv2d(w(192), w(192), (7, 1), padding=(3, 0), **kw)
    self.branch7x7x3_4 = BasicConv2d(w(192), w(192), 3, stride=2, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      branch7x7x3 = layer(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b / 7c (pytorch-fid's FIDInceptionE_1 / FIDInceptionE_2): 1x1 | 1x1-(1x3, 3x1) |
  1x1-3x3-(1x3, 3x1) | pool-1x1. `max_pool`: Mixed_7c's pool branch max-pools (3x3, stride 1,
  padding 1) where Mixed_7b's averages without the padding."""

  def __init__(self, in_features: int, config: InceptionConfig, *, max_pool: bool,
               compute: Compute = FP32, rngs: nnx.Rngs):
    w = config.width
    kw = {"compute": compute, "rngs": rngs}
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(in_features, w(320), 1, **kw)
    self.branch3x3_1 = BasicConv2d(in_features, w(384), 1, **kw)
    self.branch3x3_2a = BasicConv2d(w(384), w(384), (1, 3), padding=(0, 1), **kw)
    self.branch3x3_2b = BasicConv2d(w(384), w(384), (3, 1), padding=(1, 0), **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_features, w(448), 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(w(448), w(384), 3, padding=1, **kw)
    self.branch3x3dbl_3a = BasicConv2d(w(384), w(384), (1, 3), padding=(0, 1), **kw)
    self.branch3x3dbl_3b = BasicConv2d(w(384), w(384), (3, 1), padding=(1, 0), **kw)
    self.branch_pool = BasicConv2d(in_features, w(192), 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_1(x)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3_same(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
        self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
        self.branch_pool(pooled)], axis=-1)


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


class FIDInception(nnx.Module):
  """pytorch-fid's `InceptionV3()` (output block 3, resize and normalize on): [0, 1] images of
  any size -> the 2048-d pool3 features that FID compares.

  Holds the file's classifier `fc` too (see inception_params for why); only `logits` uses it.
  """

  def __init__(self, config: InceptionConfig = INCEPTION_FULL, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.config = config
    w = config.width
    kw = {"compute": compute, "rngs": rngs}
    self.Conv2d_1a_3x3 = BasicConv2d(3, w(32), 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(w(32), w(32), 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(w(32), w(64), 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(w(64), w(80), 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(w(80), w(192), 3, **kw)
    self.Mixed_5b = InceptionA(w(192), w(32), config, **kw)
    self.Mixed_5c = InceptionA(w(256), w(64), config, **kw)
    self.Mixed_5d = InceptionA(w(288), w(64), config, **kw)
    self.Mixed_6a = InceptionB(w(288), config, **kw)
    self.Mixed_6b = InceptionC(w(768), w(128), config, **kw)
    self.Mixed_6c = InceptionC(w(768), w(160), config, **kw)
    self.Mixed_6d = InceptionC(w(768), w(160), config, **kw)
    self.Mixed_6e = InceptionC(w(768), w(192), config, **kw)
    self.Mixed_7a = InceptionD(w(768), config, **kw)
    self.Mixed_7b = InceptionE(w(1280), config, max_pool=False, **kw)
    self.Mixed_7c = InceptionE(w(2048), config, max_pool=True, **kw)
    self.fc = nnx.Linear(config.feature_dim, config.num_classes, **compute.dense_kwargs(),
                         rngs=rngs)

  def check_images(self, images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FID's Inception expects RGB images (batch, height, width, 3) in [0, 1]; "
                       f"got shape {tuple(images.shape)}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"FID's Inception expects float images in [0, 1]; got {images.dtype}. "
                       "Map uint8 frames with `inception_inputs` first.")

  def pool3(self, x: jax.Array) -> jax.Array:
    """The trunk on prepared inputs (b, image_size, image_size, 3) in [-1, 1] -> (b, 2048)."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, 2, 0)
    x = _max_pool_3x3(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2, 0)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)), flattened

  def logits(self, features: jax.Array) -> jax.Array:
    """The file's 1008-way classifier on pool3 features (torchvision's dropout is off in eval)."""
    return self.fc(features)

  def __call__(self, images: jax.Array) -> jax.Array:
    """[0, 1] images (b, h, w, 3), any size -> pool3 features (b, feature_dim)."""
    self.check_images(images)
    return self.pool3(resize_and_normalize(images, self.config.image_size))
