"""The PD-FGC visual motion encoder (FAN trunk + mouth / expression / pose / eye heads) and the two
trainable adapters that turn it into EmotiveTalk's lip and expression encoders.

Architecture as in PD-FGC's `FanEncoder` (see ../shared/reference/pdfgc-encoder.md): a FAN
landmark network cut to one hourglass, its 68 heatmaps summarised by a stride-2 conv into a
28x28 map and projected to a shared 512-d feature, then four heads
Linear-ReLU-BatchNorm1d-Linear (+ ReLU-Linear embedding). Channels-last: images are
(batch, height, width, 3) in [-1, 1].

Inference-only details of the frozen trunk: BatchNorm reads its running statistics
(`use_running_average=True`), and the hourglass's Dropout(0.5), active upstream only in training,
is left out. `AdaptedPDFGC.train()` switches only the adapters to training mode, so the frozen
encoder never normalises with batch statistics or updates its running statistics.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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

# torch's BatchNorm defaults: eps 1e-5, momentum 0.1 (flax counts momentum the other way round).
BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9


def _summary_size(image_size: int, hourglass_depth: int) -> tuple[int, int]:
  """(hourglass input size, side of the heatmap summary map) for a square input."""
  stem = (image_size + 2 * 3 - 7) // 2 + 1        # conv 7x7, stride 2, padding 3
  hourglass_input = stem // 2                       # max-pool 2
  summary = (hourglass_input + 2 * 1 - 3) // 2 + 1  # conv 3x3, stride 2, padding 1
  return hourglass_input, summary


@dataclasses.dataclass(frozen=True)
class PDFGCConfig(model_io.ModelConfig):
  """Sizes of the PD-FGC motion encoder; defaults = the released `motion_model.pth`.

  Upstream hard-codes the widths (64/128/256 channels, 68 heatmaps, 512 features) and reads
  `pose_dim` / `eye_dim` from `opt.model.net_motion`; those two keep upstream's names.
  """

  model_type = "pdfgc"
  label = "PD-FGC"

  image_size: int = 224
  in_channels: int = 3
  stem_channels: int = 64          # conv1
  block_channels: int = 128        # conv2 / conv3 (ConvBlocks)
  hourglass_channels: int = 256    # conv4 output, hourglass, top_m_0, conv_last0
  hourglass_depth: int = 4
  num_landmarks: int = 68          # heatmaps of l0
  feature_dim: int = 512           # the shared motion feature and every head's width
  pose_dim: int = 6
  eye_dim: int = 6
  expression_dim: int = 30
  adapter_dim: int = 512           # hidden width of the lip / expression adapters (ours)

  def __post_init__(self):
    for name in ("stem_channels", "block_channels", "hourglass_channels"):
      if getattr(self, name) % 4:
        raise UserError(f"PDFGCConfig.{name}={getattr(self, name)} must be a multiple of 4 "
                        "(a ConvBlock splits its output into halves and quarters).")
    if self.hourglass_depth < 1:
      raise UserError(f"PDFGCConfig.hourglass_depth={self.hourglass_depth} must be at least 1.")
    if self.mouth_embed_dim < 1:
      raise UserError(f"PDFGCConfig.feature_dim={self.feature_dim} must exceed pose_dim + "
                      f"eye_dim = {self.pose_dim + self.eye_dim}.")
    hourglass_input, _ = _summary_size(self.image_size, self.hourglass_depth)
    if hourglass_input >> self.hourglass_depth < 1:
      raise UserError(f"PDFGCConfig.image_size={self.image_size} is too small for an hourglass "
                      f"of depth {self.hourglass_depth}.")

  @property
  def mouth_embed_dim(self) -> int:
    """Upstream's mouth embedding: 512 - pose_dim - eye_dim = 500."""
    return self.feature_dim - self.pose_dim - self.eye_dim

  @property
  def summary_size(self) -> int:
    """Side of the one-channel map that the feature projection flattens (28 at 224x224)."""
    return _summary_size(self.image_size, self.hourglass_depth)[1]

  @classmethod
  def small(cls) -> "PDFGCConfig":
    """Tests and the CPU demo. 56x56 input so that, as at full size, the hourglass's deepest
    level pools 7 -> 3 and upsamples 3 -> 7 (a non-integer bilinear scale); widths grow at the
    same blocks as at full size, so every shortcut conv exists."""
    return cls(image_size=56, stem_channels=8, block_channels=16, hourglass_channels=24,
               hourglass_depth=2, num_landmarks=8, feature_dim=32, adapter_dim=32)



PDFGC_FULL = PDFGCConfig()
PDFGC_SMALL = PDFGCConfig.small()


class MotionCodes(NamedTuple):
  """The encoder's outputs; upstream returns (pose, eye, emotion, mouth)."""
  lip: jax.Array         # l_v: the mouth head's 512-d feature (`mouth_feat`)
  expression: jax.Array  # e_v: the 30-d expression embedding (`emo_embed`)
  pose: jax.Array        # 6-d head pose embedding
  eye: jax.Array         # 6-d eye embedding (dims 2,3 gaze; 0,1,4,5 blink)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def _batch_norm(features: int, compute: Compute, rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, use_running_average=True, momentum=BATCH_NORM_MOMENTUM,
                       epsilon=BATCH_NORM_EPSILON, **compute.dense_kwargs(), rngs=rngs)


def _conv(in_features: int, out_features: int, kernel: int, compute: Compute, rngs, *,
          stride: int = 1, use_bias: bool = True) -> nnx.Conv:
  pad = kernel // 2  # torch's symmetric padding; every conv here pads kernel // 2
  return nnx.Conv(in_features, out_features, kernel_size=(kernel, kernel),
                  strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                  **compute.dense_kwargs(), rngs=rngs)


def _max_pool2(x: jax.Array) -> jax.Array:
  # torch's max_pool2d(x, 2): floor on odd sizes, like VALID padding.
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch bilinear (align_corners=False, output size given) along one axis: two source
  indices and the weight of the second, per output position."""
  scale = in_size / out_size
  source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  low = np.minimum(np.floor(source).astype(np.int32), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  return low, high, (source - low).astype(np.float32)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """(b, h, w, c) -> (b, height, width, c) exactly as torch's F.interpolate(mode='bilinear')."""
  for axis, size in ((1, height), (2, width)):
    low, high, weight = _linear_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    weight = jnp.asarray(weight, x.dtype).reshape(shape)
    x = jnp.take(x, low, axis=axis) * (1 - weight) + jnp.take(x, high, axis=axis) * weight
  return x


class ConvBlock(nnx.Module):
  """FAN's pre-activation block: three BN-ReLU-conv3x3 stages (widths out/2, out/4, out/4)
  concatenated, plus a BN-ReLU-conv1x1 shortcut when the width changes."""

  def __init__(self, in_features: int, out_features: int, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    half, quarter = out_features // 2, out_features // 4
    self.norm1 = _batch_norm(in_features, compute, rngs)
    self.conv1 = _conv(in_features, half, 3, compute, rngs, use_bias=False)
    self.norm2 = _batch_norm(half, compute, rngs)
    self.conv2 = _conv(half, quarter, 3, compute, rngs, use_bias=False)
    self.norm3 = _batch_norm(quarter, compute, rngs)
    self.conv3 = _conv(quarter, quarter, 3, compute, rngs, use_bias=False)
    if in_features != out_features:
      self.shortcut_norm = _batch_norm(in_features, compute, rngs)
      self.shortcut_conv = _conv(in_features, out_features, 1, compute, rngs, use_bias=False)
    else:
      self.shortcut_norm = self.shortcut_conv = None

  def __call__(self, x: jax.Array) -> jax.Array:
    out1 = self.conv1(jax.nn.relu(self.norm1(x)))
    out2 = self.conv2(jax.nn.relu(self.norm2(out1)))
    out3 = self.conv3(jax.nn.relu(self.norm3(out2)))
    residual = x
    if self.shortcut_conv is not None:
      residual = self.shortcut_conv(jax.nn.relu(self.shortcut_norm(x)))
    return jnp.concatenate([out1, out2, out3], axis=-1) + residual


class HourglassLevel(nnx.Module):
  """One level: an upper ConvBlock at full resolution; a lower path (max-pool, ConvBlock, the
  next level or, at the bottom, one more ConvBlock, ConvBlock) upsampled back and added."""

  def __init__(self, features: int, innermost: bool, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.upper = ConvBlock(features, features, compute=compute, rngs=rngs)
    self.lower_in = ConvBlock(features, features, compute=compute, rngs=rngs)
    self.innermost = (ConvBlock(features, features, compute=compute, rngs=rngs)
                      if innermost else None)
    self.lower_out = ConvBlock(features, features, compute=compute, rngs=rngs)


class Hourglass(nnx.Module):
  """FAN's recursive hourglass; `levels[0]` is the outermost (upstream's level `depth`)."""

  def __init__(self, features: int, depth: int, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.levels = nnx.List([HourglassLevel(features, i == depth - 1, compute=compute, rngs=rngs)
                            for i in range(depth)])

  def _level(self, index: int, x: jax.Array) -> jax.Array:
    level = self.levels[index]
    upper = level.upper(x)
    lower = level.lower_in(_max_pool2(x))
    if index + 1 < len(self.levels):
      lower = self._level(index + 1, lower)
    else:
      lower = level.innermost(lower)
    lower = level.lower_out(lower)
    # Upstream resizes to the upper branch's size: x2 where even, 3 -> 7 at the 7x7 bottom.
    return upper + resize_bilinear(lower, upper.shape[1], upper.shape[2])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self._level(0, x)


class FANTrunk(nnx.Module):
  """Upstream `FAN_use`: image -> 68 landmark heatmaps -> the shared motion feature."""

  def __init__(self, config: PDFGCConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    c = config
    self.stem_conv = _conv(c.in_channels, c.stem_channels, 7, compute, rngs, stride=2)
    self.stem_norm = _batch_norm(c.stem_channels, compute, rngs)
    self.block1 = ConvBlock(c.stem_channels, c.block_channels, compute=compute, rngs=rngs)
    self.block2 = ConvBlock(c.block_channels, c.block_channels, compute=compute, rngs=rngs)
    self.block3 = ConvBlock(c.block_channels, c.hourglass_channels, compute=compute, rngs=rngs)
    self.hourglass = Hourglass(c.hourglass_channels, c.hourglass_depth, compute=compute,
                               rngs=rngs)
    self.post_block = ConvBlock(c.hourglass_channels, c.hourglass_channels, compute=compute,
                                rngs=rngs)
    self.post_conv = _conv(c.hourglass_channels, c.hourglass_channels, 1, compute, rngs)
    self.post_norm = _batch_norm(c.hourglass_channels, compute, rngs)
    self.heatmap_conv = _conv(c.hourglass_channels, c.num_landmarks, 1, compute, rngs)
    self.heatmap_norm = _batch_norm(c.num_landmarks, compute, rngs)
    self.summary_conv = _conv(c.num_landmarks, 1, 3, compute, rngs, stride=2)
    self.feature_proj = nnx.Linear(c.summary_size ** 2, c.feature_dim, **compute.dense_kwargs(),
                                   rngs=rngs)

  def heatmaps(self, images: jax.Array) -> jax.Array:
    """(b, h, w, 3) -> (b, h/4, w/4, num_landmarks), before the final BatchNorm."""
    x = jax.nn.relu(self.stem_norm(self.stem_conv(images)))
    x = _max_pool2(self.block1(x))
    x = self.block3(self.block2(x))
    x = self.post_block(self.hourglass(x))
    x = self.post_norm(self.post_conv(x))
    return self.heatmap_conv(jax.nn.relu(x))

  def __call__(self, images: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.heatmap_norm(self.heatmaps(images)))
    x = self.summary_conv(x)  # (b, 28, 28, 1): row-major flatten matches torch's view
    return self.feature_proj(jax.nn.relu(x.reshape(x.shape[0], -1)))


class Head(nnx.Module):
  """Linear-ReLU-BatchNorm1d-Linear on the shared feature, then a ReLU-Linear embedding."""

  def __init__(self, features: int, embed_dim: int, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(features, features, **compute.dense_kwargs(), rngs=rngs)
    self.norm = _batch_norm(features, compute, rngs)
    self.fc2 = nnx.Linear(features, features, **compute.dense_kwargs(), rngs=rngs)
    self.embed = nnx.Linear(features, embed_dim, **compute.dense_kwargs(), rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.norm(jax.nn.relu(self.fc1(x))))

  def embedding(self, features: jax.Array) -> jax.Array:
    return self.embed(jax.nn.relu(features))


# Logical-axis table of PD-FGC and its adapted encoders: the common layers and BatchNorm's
# running statistics.
PDFGC_AXES = COMMON + (Rule(parameter_of(NORM_PARENT, "(?:mean|var)"), 1, (NORM,)),)


class PDFGCEncoder(nnx.Module):
  """Upstream `FanEncoder`: trunk + mouth / expression / pose / eye heads (all frozen here)."""

  logical_family = register_family("pdfgc", PDFGC_AXES)

  def __init__(self, config: PDFGCConfig = PDFGC_FULL, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.config = config
    self.trunk = FANTrunk(config, compute=compute, rngs=rngs)
    self.mouth = Head(config.feature_dim, config.mouth_embed_dim, compute=compute, rngs=rngs)
    self.expression = Head(config.feature_dim, config.expression_dim, compute=compute, rngs=rngs)
    self.pose = Head(config.feature_dim, config.pose_dim, compute=compute, rngs=rngs)
    self.eye = Head(config.feature_dim, config.eye_dim, compute=compute, rngs=rngs)

  def check_images(self, images: jax.Array) -> None:
    size, channels = self.config.image_size, self.config.in_channels
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, channels):
      raise ValueError(f"PD-FGC expects images of shape (batch, {size}, {size}, {channels}) in "
                       f"[-1, 1]; got {tuple(images.shape)}. Align and crop the faces first "
                       "(`etalk_jax.vision.pdfgc_inputs`: frames and their landmarks).")

  def features(self, images: jax.Array) -> jax.Array:
    """The shared motion feature (b, feature_dim) that every head (and adapter) reads."""
    self.check_images(images)
    return self.trunk(images)

  def heads(self, feature: jax.Array, lip_feature: jax.Array | None = None,
            expression_feature: jax.Array | None = None) -> MotionCodes:
    """Heads on the shared feature; the mouth / expression heads may read adapted features."""
    lip_feature = feature if lip_feature is None else lip_feature
    expression_feature = feature if expression_feature is None else expression_feature
    return MotionCodes(
        lip=self.mouth.features(lip_feature),
        expression=self.expression.embedding(self.expression.features(expression_feature)),
        pose=self.pose.embedding(self.pose.features(feature)),
        eye=self.eye.embedding(self.eye.features(feature)))

  def mouth_embedding(self, lip: jax.Array) -> jax.Array:
    """Upstream's `mouth_embed` (500-d) of `l_v`; its forward does not return it."""
    return self.mouth.embedding(lip)

  def __call__(self, images: jax.Array) -> MotionCodes:
    return self.heads(self.features(images))


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------


class ResidualAdapter(nnx.Module):
  """x + W2 gelu(W1 x) with W2, b2 zero at initialisation: the identity until trained."""

  def __init__(self, features: int, hidden: int, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(features, hidden, **compute.dense_kwargs(), rngs=rngs)
    self.output = nnx.Linear(hidden, features, kernel_init=nnx.initializers.zeros_init(),
                             bias_init=nnx.initializers.zeros_init(), **compute.dense_kwargs(),
                             rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.output(jax.nn.gelu(self.hidden(x)))


# The only parameters that train in the encoder pre-training stage.
ADAPTER_PARAMS = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("lip_adapter"),
                                            nnx.PathContains("expression_adapter")))


class AdaptedPDFGC(nnx.Module):
  """EmotiveTalk's lip and expression encoders: the frozen PD-FGC encoder with a trainable
  residual adapter before its mouth head (lip) and before its expression head (expression).

  Pose and eye heads read the unadapted feature. With untrained adapters the outputs equal
  `encoder`'s exactly.
  """

  logical_family = register_family("pdfgc", PDFGC_AXES)

  def __init__(self, config: PDFGCConfig = PDFGC_FULL, *, compute: Compute = FP32,
               rngs: nnx.Rngs, encoder: PDFGCEncoder | None = None):
    if encoder is not None and encoder.config != config:
      raise ValueError("the given encoder was built with another PDFGCConfig than the adapters.")
    self.config = config
    self.encoder = encoder if encoder is not None else PDFGCEncoder(config, compute=compute,
                                                                     rngs=rngs)
    self.lip_adapter = ResidualAdapter(config.feature_dim, config.adapter_dim, compute=compute,
                                       rngs=rngs)
    self.expression_adapter = ResidualAdapter(config.feature_dim, config.adapter_dim,
                                              compute=compute, rngs=rngs)

  def train(self, **attributes):
    """Training mode for the adapters only: the frozen encoder keeps its running statistics."""
    self.lip_adapter.train(**attributes)
    self.expression_adapter.train(**attributes)

  def __call__(self, images: jax.Array) -> MotionCodes:
    feature = self.encoder.features(images)
    return self.encoder.heads(feature, lip_feature=self.lip_adapter(feature),
                              expression_feature=self.expression_adapter(feature))
