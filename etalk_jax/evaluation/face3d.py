"""Deep3DFaceRecon's coefficient regressor, the network behind E-FID, and its input alignment.

E-FID (as EMO defines it) is the Fréchet distance between the expression coefficients of
generated and real frames, the coefficients those of Deep3DFaceRecon_pytorch
(sicxu/Deep3DFaceRecon_pytorch). Read there:
- models/networks.py: `ReconNetWrapper(net_recon="resnet50", use_last_fc=False)` = `backbone`
  (their copy of torchvision's ResNet-50 without its fc: conv1 7x7/2, bn1, ReLU, max-pool 3x3/2,
  layer1..4 of `Bottleneck`s with the stride on the 3x3 conv (ResNet v1.5), adaptive average
  pool to 1x1) + `final_layers`, seven 1x1 convs with bias (80 id, 64 exp, 80 tex, 3 angle,
  27 gamma, 2 xy, 1 z) concatenated to 257.
- models/facerecon_model.py (`set_input`, `forward`: `net_recon(input['imgs'])`) and models/bfm.py
  (`split_coeff`: expression = coefficients [80:144]).
- test.py (`read_data`): the RGB PIL image, its 5 landmarks as float32 with y flipped
  (`H - 1 - y`), `align_img`, then `np.array(image) / 255.` as a float32 tensor: RGB in [0, 1],
  no mean / std normalisation.
- util/preprocess.py: `align_img` fits `POS` (least squares: the 5 image points against the x, y, z
  of 5 standard 3D points, image = R [X Y Z] + t per coordinate), takes the scale
  s = 102 / mean(|R1|, |R2|), and `resize_n_crop_img` resizes the whole image by s with PIL's
  bicubic filter to truncated integer sizes and crops 224x224 at truncated integer offsets that
  put t at the crop's centre (PIL's crop fills outside the image with black).
- util/load_mats.py (`load_lm3d`): the standard points from BFM's similarity_Lm3D_all.mat, 68
  points reduced to 5 (the two eye centres as means of two eye corners, nose tip, mouth
  corners), ordered image-left eye, image-right eye, nose, image-left and image-right mouth
  corner; x to the image's right, y up.

Channels-last: the network reads (batch, 224, 224, 3) in [0, 1]. BatchNorm reads its running
statistics (inference only).

Our landmarks are MediaPipe's 478 points (data_pipeline/faces.py) in continuous pixel coordinates
(pixel centres at .5). The 5 points are the iris centres (468 on the image's left: the subject's
right eye; 473), the nose tip (1) and the mouth corners (61 image-left, 291 image-right); moved to
pixel indices (-0.5, the convention of the detector files upstream reads, as for PD-FGC's
alignment) and flipped to upstream's y-up (`H - 1 - y`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from data_pipeline.faces import LEFT_IRIS, MOUTH_CORNERS, RIGHT_IRIS
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
# A Bottleneck's output is 4x its inner width (torchvision's `Bottleneck.expansion`).
EXPANSION = 4
# `final_layers`' order and widths; the 257 coefficients are their outputs concatenated.
COEFFICIENT_NAMES = ("id", "exp", "tex", "angle", "gamma", "xy", "z")
EXPRESSION = COEFFICIENT_NAMES.index("exp")

# Upstream's alignment: the crop's side and the scale that `align_img` divides by POS's scale.
TARGET_SIZE = 224
RESCALE_FACTOR = 102.0
# `load_lm3d(...)`: the 5 standard 3D points (image-left eye, image-right eye, nose tip,
# image-left mouth corner, image-right mouth corner; x right, y up), the float32 values
# similarity_Lm3D_all.mat gives (9 significant digits, so they read back bit for bit). The same
# numbers, printed to 8 digits, are in public code: the docstring of the TensorFlow
# Deep3DFaceReconstruction's align_img and several ports' `lm3d_std`.
STANDARD_POINTS_3D = np.array([
    [-0.311486572, 0.290360779, 0.133779526],
    [0.309798867, 0.289720356, 0.131795257],
    [0.00325349881, -0.0461793244, 0.552442431],
    [-0.252169281, -0.381339163, 0.224057317],
    [0.248466194, -0.381282359, 0.222357690],
], np.float32)
# MediaPipe's counterparts of upstream's 5 points, in upstream's order.
NOSE_TIP = 1
FIVE_POINTS = (RIGHT_IRIS[0], LEFT_IRIS[0], NOSE_TIP, MOUTH_CORNERS[0], MOUTH_CORNERS[1])


@dataclasses.dataclass(frozen=True)
class Face3DConfig(model_io.ModelConfig):
  """Sizes of the regressor; defaults = the released `epoch_20.pth` (ResNet-50, 257 outputs).

  image_size is the side of the aligned faces the weights were trained on (224 upstream; not in
  the checkpoint, the network runs at any size); `face3d_inputs` makes faces of that size.

  stage_widths are the Bottlenecks' inner widths (torchvision's `planes`); each stage after the
  first halves the resolution.
  """

  model_type = "face3d"
  label = "Deep3DFaceRecon"

  image_size: int = TARGET_SIZE
  stem_channels: int = 64
  stage_blocks: tuple[int, ...] = (3, 4, 6, 3)
  stage_widths: tuple[int, ...] = (64, 128, 256, 512)
  coefficient_dims: tuple[int, ...] = (80, 64, 80, 3, 27, 2, 1)

  def __post_init__(self):
    for name in ("stage_blocks", "stage_widths", "coefficient_dims"):  # JSON gives lists
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if not self.stage_blocks or len(self.stage_blocks) != len(self.stage_widths):
      raise UserError(f"Face3DConfig: stage_blocks {self.stage_blocks} and stage_widths "
                      f"{self.stage_widths} must name the same, non-zero number of stages.")
    if min(self.stage_blocks) < 1 or min(self.stage_widths) < 1 or self.stem_channels < 1:
      raise UserError("Face3DConfig: every stage needs at least one block and every width must "
                      "be positive.")
    if len(self.coefficient_dims) != len(COEFFICIENT_NAMES):
      raise UserError(f"Face3DConfig.coefficient_dims={self.coefficient_dims} must give "
                      f"{len(COEFFICIENT_NAMES)} widths ({', '.join(COEFFICIENT_NAMES)}).")
    if self.image_size < 2 ** (len(self.stage_blocks) + 1):
      raise UserError(f"Face3DConfig.image_size={self.image_size} is too small for "
                      f"{len(self.stage_blocks)} stages.")

  @property
  def feature_dim(self) -> int:
    """Width of the pooled backbone feature (2048 for ResNet-50)."""
    return EXPANSION * self.stage_widths[-1]

  @property
  def expression_slice(self) -> slice:
    """Where the expression coefficients sit in the concatenated output ([80:144])."""
    start = sum(self.coefficient_dims[:EXPRESSION])
    return slice(start, start + self.coefficient_dims[EXPRESSION])

  @classmethod
  def small(cls) -> "Face3DConfig":
    """Tests: 64x64 input, narrow stages, two blocks in the first stage (so both a block with
    a shortcut conv and one without appear); upstream's 257 coefficients."""
    return cls(image_size=64, stem_channels=8, stage_blocks=(2, 1, 1, 1),
               stage_widths=(8, 16, 24, 32))


FACE3D_FULL = Face3DConfig()
FACE3D_SMALL = Face3DConfig.small()


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def _batch_norm(features: int, compute: Compute, rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, use_running_average=True, momentum=BATCH_NORM_MOMENTUM,
                       epsilon=BATCH_NORM_EPSILON, **compute.dense_kwargs(), rngs=rngs)


def _conv(in_features: int, out_features: int, kernel: int, compute: Compute, rngs, *,
          stride: int = 1, use_bias: bool = False) -> nnx.Conv:
  pad = kernel // 2  # torch's symmetric padding; every conv here pads kernel // 2
  return nnx.Conv(in_features, out_features, kernel_size=(kernel, kernel),
                  strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                  **compute.dense_kwargs(), rngs=rngs)


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (carrying the stride), 1x1 expand, each with BatchNorm; ReLU after the first
  two and after the residual sum. A 1x1 conv + BatchNorm shortcut where the shape changes."""

  def __init__(self, in_features: int, width: int, stride: int, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    out_features = EXPANSION * width
    self.conv1 = _conv(in_features, width, 1, compute, rngs)
    self.norm1 = _batch_norm(width, compute, rngs)
    self.conv2 = _conv(width, width, 3, compute, rngs, stride=stride)
    self.norm2 = _batch_norm(width, compute, rngs)
    self.conv3 = _conv(width, out_features, 1, compute, rngs)
    self.norm3 = _batch_norm(out_features, compute, rngs)
    if stride != 1 or in_features != out_features:
      self.shortcut_conv = _conv(in_features, out_features, 1, compute, rngs, stride=stride)
      self.shortcut_norm = _batch_norm(out_features, compute, rngs)
    else:
      self.shortcut_conv = self.shortcut_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    out = jax.nn.relu(self.norm1(self.conv1(x)))
    out = jax.nn.relu(self.norm2(self.conv2(out)))
    out = self.norm3(self.conv3(out))
    residual = x
    if self.shortcut_conv is not None:
      residual = self.shortcut_norm(self.shortcut_conv(x))
    return jax.nn.relu(out + residual)


class ResNetBackbone(nnx.Module):
  """Upstream `backbone`: stem, stages of Bottlenecks, global average pool -> (b, 1, 1, C)."""

  def __init__(self, config: Face3DConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.stem_conv = _conv(3, config.stem_channels, 7, compute, rngs, stride=2)
    self.stem_norm = _batch_norm(config.stem_channels, compute, rngs)
    stages, in_features = [], config.stem_channels
    for index, (blocks, width) in enumerate(zip(config.stage_blocks, config.stage_widths)):
      stride = 1 if index == 0 else 2
      stage = []
      for block in range(blocks):
        stage.append(Bottleneck(in_features, width, stride if block == 0 else 1,
                                compute=compute, rngs=rngs))
        in_features = EXPANSION * width
      stages.append(nnx.List(stage))
    self.stages = nnx.List(stages)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.stem_norm(self.stem_conv(images)))
    # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as flax's max_pool does.
    x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in self.stages:
      for block in stage:
        x = block(x)
    return jnp.mean(x, axis=(1, 2), keepdims=True)  # AdaptiveAvgPool2d((1, 1))


# Logical-axis table: the common layers and BatchNorm's running statistics.
FACE3D_AXES = COMMON + (Rule(parameter_of(NORM_PARENT, "(?:mean|var)"), 1, (NORM,)),)


class Face3DRecon(nnx.Module):
  """Upstream `ReconNetWrapper(use_last_fc=False)`: images (b, s, s, 3) in [0, 1] -> the 257
  coefficients (b, 257): id, exp, tex, angle, gamma, xy, z."""

  logical_family = register_family("face3d", FACE3D_AXES)

  def __init__(self, config: Face3DConfig = FACE3D_FULL, *, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.config = config
    self.backbone = ResNetBackbone(config, compute=compute, rngs=rngs)
    # One 1x1 conv per coefficient group, as upstream (on the 1x1 pooled map: a Linear).
    self.heads = nnx.List([_conv(config.feature_dim, dim, 1, compute, rngs, use_bias=True)
                           for dim in config.coefficient_dims])

  def check_images(self, images: jax.Array) -> None:
    # Upstream's network pools globally and runs at any size; the released weights saw 224x224
    # crops (config.image_size, which `face3d_inputs` should be given).
    smallest = 2 ** (len(self.config.stage_blocks) + 1)  # one pixel left after the last stage
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < smallest:
      raise ValueError(f"Deep3DFaceRecon expects images of shape (batch, {self.config.image_size}, "
                       f"{self.config.image_size}, 3) in [0, 1]; got {tuple(images.shape)}. Align "
                       "and crop the faces first (`etalk_jax.evaluation.face3d.face3d_inputs`: "
                       "frames and their landmarks).")

  def features(self, images: jax.Array) -> jax.Array:
    """The pooled backbone feature (b, 1, 1, feature_dim) every head reads."""
    self.check_images(images)
    return self.backbone(images)

  def __call__(self, images: jax.Array) -> jax.Array:
    feature = self.features(images)
    coefficients = jnp.concatenate([head(feature) for head in self.heads], axis=-1)
    return coefficients.reshape(coefficients.shape[0], -1)

  def expression(self, images: jax.Array) -> jax.Array:
    """The 64 expression coefficients (b, 64): the output's [80:144], from its own head."""
    feature = self.features(images)
    out = self.heads[EXPRESSION](feature)
    return out.reshape(out.shape[0], -1)


def expression_coefficients(model: Face3DRecon, images: jax.Array) -> jax.Array:
  """E-FID's per-frame features: (b, s, s, 3) aligned faces in [0, 1] (`face3d_inputs`) ->
  (b, 64) expression coefficients, upstream's `split_coeff(...)['exp']`."""
  return model.expression(images)


# ----------------------------------------------------------------------------------------------
# Upstream's input: 5-point alignment, PIL bicubic resize, crop, / 255
# ----------------------------------------------------------------------------------------------


def five_points(landmarks_px: np.ndarray, height: int) -> np.ndarray:
  """(478, 2) MediaPipe landmarks (continuous pixels, y down) of a frame `height` rows high ->
  (5, 2) float32 in upstream's convention: its order, pixel indices, y up (`H - 1 - y`, as
  test.py's `read_data` flips the detector's points)."""
  points = (np.asarray(landmarks_px, np.float64)[list(FIVE_POINTS)] - 0.5).astype(np.float32)
  points[:, 1] = height - 1 - points[:, 1]
  return points


def fit_translation_scale(points: np.ndarray,
                          standard: np.ndarray = STANDARD_POINTS_3D) -> tuple[np.ndarray, float]:
  """Upstream's `POS`: the least-squares affine projection image = R [X Y Z] + t of the standard
  3D points onto the 5 image points (y up), one row of R and t per image coordinate; returns
  t (2,) and the projection's scale, the mean of the two rows' norms.

  Upstream solves both coordinates in one 10x8 system; its matrix is block diagonal, so the two
  5x4 systems solved here have the same solution."""
  design = np.concatenate([np.asarray(standard, np.float64), np.ones((len(standard), 1))], axis=1)
  solution = np.linalg.lstsq(design, np.asarray(points, np.float64), rcond=None)[0]  # (4, 2)
  scale = (np.linalg.norm(solution[:3, 0]) + np.linalg.norm(solution[:3, 1])) / 2
  return solution[3], float(scale)


def crop_geometry(width: int, height: int, translation: np.ndarray, scale: float,
                  target_size: int = TARGET_SIZE) -> tuple[tuple[int, int], tuple[int, int]]:
  """`resize_n_crop_img`'s integers: the resized image's (w, h) and the crop's (left, top).

  Upstream truncates (numpy's astype(int32): towards zero, also for negative offsets) and adds
  the terms in this order; both are kept so every crop lands on the same pixel."""
  resized_width, resized_height = int(np.float64(width * scale)), int(np.float64(height * scale))
  half = target_size / 2
  left = int(resized_width / 2 - half + float((translation[0] - width / 2) * scale))
  top = int(resized_height / 2 - half + float((height / 2 - translation[1]) * scale))
  return (resized_width, resized_height), (left, top)


def align_face(frame: np.ndarray, landmarks_px: np.ndarray, target_size: int = TARGET_SIZE,
               rescale_factor: float = RESCALE_FACTOR) -> np.ndarray:
  """One uint8 RGB frame (H, W, 3) + its 478 pixel landmarks -> the uint8 (target_size,
  target_size, 3) face Deep3DFaceRecon reads (upstream's `align_img`)."""
  frame = np.asarray(frame)
  height, width = frame.shape[:2]
  translation, scale = fit_translation_scale(five_points(landmarks_px, height))
  scale = rescale_factor / scale
  size, (left, top) = crop_geometry(width, height, translation, scale, target_size)
  image = Image.fromarray(frame).resize(size, resample=Image.Resampling.BICUBIC)
  return np.asarray(image.crop((left, top, left + target_size, top + target_size)))


def face3d_inputs(frames: np.ndarray, landmarks_px: np.ndarray,
                  image_size: int = TARGET_SIZE) -> np.ndarray:
  """uint8 RGB frames (T, H, W, 3) + their landmarks (T, 478, 2) in pixels -> the network's
  input (T, image_size, image_size, 3) float32 in [0, 1], as test.py's `read_data` makes it
  (`np.array(image) / 255.` in float64, then float32).

  At 224 this is upstream exactly; a smaller image_size (FACE3D_SMALL) crops the same region
  (rescale factor scaled with the size) at a lower resolution."""
  rescale_factor = RESCALE_FACTOR * image_size / TARGET_SIZE
  faces = [align_face(frame, landmarks, image_size, rescale_factor)
           for frame, landmarks in zip(frames, landmarks_px, strict=True)]
  if not faces:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  return (np.stack(faces).astype(np.float64) / 255.0).astype(np.float32)
