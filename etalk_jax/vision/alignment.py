"""PD-FGC's own input preprocessing, on device: frame + its landmarks -> the encoder's input.

Upstream PD-FGC reads faces aligned as PC-AVS aligns them (`scripts/align_68.py`): a least-squares
similarity (rotation, uniform scale, shift) taking the two eye centres and the mouth centre to a
fixed template in a 224x224 canvas, the shift then corrected so that the mouth centre lands exactly
on the template's, and a bilinear warp with black outside the frame. Its loader then crops rows
0:192 and columns 16:208 of that canvas and resizes the crop back to 224x224 (bilinear). The
pretrained FAN trunk saw only such crops, so every l_v / e_v must be computed on them.

Here both resamplings happen as upstream does them, in one jittable function: the warp samples
only the 192x192 crop of the canvas (the crop of a warp is the warp onto the crop's pixels), and
`jax.image.resize` takes that crop to the encoder's size. At 224 that is upstream's pipeline; a
smaller encoder (PDFGC_SMALL, 56 px) sees the same region of the same aligned canvas, resized
(antialiased) to its size, so its input is upstream's input at a lower resolution.

Each frame is aligned on its own landmarks (PC-AVS's rule for a single image); the eye and mouth
centres are the means of MediaPipe's eye contours and inner-lip ring, the counterparts of the
68-point sets (36:42, 42:48, 60:68) PC-AVS averages. Coordinates are continuous (pixel centres at
.5, as MediaPipe's landmarks times the frame size are); PC-AVS gives its template in pixel
indices, `data_pipeline.faces.PDFGC_TEMPLATE` holds it +0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import NUM_LANDMARKS
from data_pipeline.faces import LEFT_EYE, LIPS_INNER, PDFGC_INNER, PDFGC_TEMPLATE, RIGHT_EYE

# The eye / mouth centres as one (3, 478) averaging matrix: a matmul instead of three gathers.
_CENTRES = np.zeros((3, NUM_LANDMARKS), np.float32)
for _row, _indices in enumerate((RIGHT_EYE, LEFT_EYE, LIPS_INNER)):
  _CENTRES[_row, list(_indices)] = 1.0 / len(_indices)
del _row, _indices
# Full float32 in the small contractions: the default on TPU (bf16 passes) or GPU (TF32) would move
# pixel coordinates by up to a pixel.
_EXACT = jax.lax.Precision.HIGHEST


def eye_mouth_centres(landmarks_px: jax.Array) -> jax.Array:
  """(..., 478, 2) pixel landmarks -> (..., 3, 2): right eye, left eye, mouth centre."""
  return jnp.einsum("kn,...nd->...kd", jnp.asarray(_CENTRES), landmarks_px, precision=_EXACT)


def canvas_to_source(landmarks_px: jax.Array) -> jax.Array:
  """(..., 478, 2) pixel landmarks -> (..., 2, 3) matrices taking a point (x, y, 1) of PC-AVS's
  aligned 224x224 canvas to the frame's pixels (continuous coordinates, both sides).

  The forward similarity is the least-squares fit of the three centres to the template (in complex
  numbers: b - mean(b) = z (a - mean(a)), z = sum(conj(a) b) / sum(|a|^2), which is what
  skimage's SimilarityTransform.estimate solves), its shift moved so the mouth centre maps exactly
  onto the template's mouth; the matrix returned is its inverse."""
  source = eye_mouth_centres(jnp.asarray(landmarks_px, jnp.float32))
  template = jnp.asarray(PDFGC_TEMPLATE, jnp.float32)
  a = source - source.mean(axis=-2, keepdims=True)
  b = template - template.mean(axis=-2, keepdims=True)
  norm = jnp.sum(a * a, axis=(-2, -1))
  cos = jnp.sum(a * b, axis=(-2, -1)) / norm   # Re z: s cos(theta)
  sin = jnp.sum(a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0], axis=-1) / norm  # Im z
  # forward(p) = L p + t with L = [[cos, -sin], [sin, cos]] and t putting the mouth on the template.
  linear = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
  shift = template[2] - jnp.einsum("...ij,...j->...i", linear, source[..., 2, :], precision=_EXACT)
  # Inverse: p = L^-1 (q - t); L^-1 = L^T / (cos^2 + sin^2).
  inverse = jnp.swapaxes(linear, -1, -2) / (cos * cos + sin * sin)[..., None, None]
  offset = -jnp.einsum("...ij,...j->...i", inverse, shift, precision=_EXACT)
  return jnp.concatenate([inverse, offset[..., None]], axis=-1)


def _warp_crop(frame: jax.Array, matrix: jax.Array) -> jax.Array:
  """One frame (H, W, 3) float -> the canvas crop (rows 0:192, columns 16:208) (192, 192, 3):
  bilinear over the four neighbours, a neighbour outside the frame counting as black (as
  cv2.warpAffine with a constant border, PC-AVS's warp, blends the edge with it)."""
  height, width = frame.shape[:2]
  x0, y0, x1, y1 = PDFGC_INNER
  # Pixel centres of the crop, in canvas coordinates.
  u = jnp.arange(int(x1 - x0), dtype=jnp.float32) + x0 + 0.5
  v = jnp.arange(int(y1 - y0), dtype=jnp.float32) + y0 + 0.5
  uu, vv = jnp.meshgrid(u, v)  # (192, 192): row = v
  # Source pixel indices (centres at integers) of every crop pixel.
  sx = matrix[0, 0] * uu + matrix[0, 1] * vv + matrix[0, 2] - 0.5
  sy = matrix[1, 0] * uu + matrix[1, 1] * vv + matrix[1, 2] - 0.5
  left, top = jnp.floor(sx), jnp.floor(sy)
  fx, fy = (sx - left)[..., None], (sy - top)[..., None]
  left, top = left.astype(jnp.int32), top.astype(jnp.int32)
  flat = frame.reshape(height * width, frame.shape[-1])

  def tap(dx: int, dy: int) -> jax.Array:
    x, y = left + dx, top + dy
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    index = jnp.clip(y, 0, height - 1) * width + jnp.clip(x, 0, width - 1)
    return jnp.where(inside[..., None], flat[index], 0.0)

  return ((tap(0, 0) * (1 - fx) + tap(1, 0) * fx) * (1 - fy)
          + (tap(0, 1) * (1 - fx) + tap(1, 1) * fx) * fy)


def pdfgc_inputs(frames: jax.Array, landmarks_px: jax.Array, size: int) -> jax.Array:
  """uint8 frames (..., H, W, 3) and each frame's own pixel landmarks (..., 478, 2) -> PD-FGC's
  input (..., size, size, 3) float32 in [-1, 1]: aligned, cropped and resized as upstream (see the
  module docstring). Jittable; any frame size."""
  frames = jnp.asarray(frames)
  landmarks_px = jnp.asarray(landmarks_px, jnp.float32)
  lead = frames.shape[:-3]
  if frames.ndim < 3 or frames.shape[-1] != 3:
    raise ValueError(f"frames have shape {tuple(frames.shape)}; give RGB (..., height, width, 3).")
  if landmarks_px.shape != lead + (NUM_LANDMARKS, 2):
    raise ValueError(f"landmarks have shape {tuple(landmarks_px.shape)} for frames of shape "
                     f"{tuple(frames.shape)}; give each frame's own (478, 2) pixel landmarks, "
                     f"shape {lead + (NUM_LANDMARKS, 2)}.")
  images = frames.reshape((-1,) + frames.shape[-3:]).astype(jnp.float32)
  matrices = canvas_to_source(landmarks_px.reshape(-1, NUM_LANDMARKS, 2))
  crops = jax.vmap(_warp_crop)(images, matrices)
  # Upstream stores the aligned face as 8-bit, then resizes; the rounding is left out (< 0.5 grey).
  resized = jax.image.resize(crops, (crops.shape[0], size, size, 3), method="linear",
                             antialias=True, precision=_EXACT)
  return (resized / 127.5 - 1.0).reshape(lead + (size, size, 3))
