"""A reference of PD-FGC's input preprocessing in upstream's own style, for the alignment tests.

Written from reading PC-AVS's `scripts/align_68.py` (which PD-FGC's readme names for new footage)
and PD-FGC-inference's `VOXTestDataset.load_img`: skimage's `SimilarityTransform` fitted from the
eye and mouth centres to PC-AVS's template (pixel indices), the shift corrected so the mouth lands
on the template's, `cv2.warpAffine` into a black 224x224 canvas, then rows 0:192 / columns 16:208
resized back to 224x224 with `cv2.resize` (both bilinear, 8-bit in between, as upstream writes the
aligned frames to disk). Single frame: PC-AVS's per-clip mean points and smoothed shift reduce to
the frame's own points and an exact mouth shift.

The only departure: the eye and mouth centres are means of MediaPipe's eye contours and inner-lip
ring (our landmark layout) instead of the 68-point sets 36:42, 42:48, 60:68, and MediaPipe's
continuous pixel coordinates are moved to pixel indices (-0.5), the convention cv2 and the
template use.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage import transform

from data_pipeline.faces import LEFT_EYE, LIPS_INNER, RIGHT_EYE

TEMPLATE = np.array([[87, 59], [137, 59], [112, 120]], np.float32)  # right eye, left eye, mouth
CANVAS = 224
CROP_LEN = 16


def eye_mouth_points(landmarks_index: np.ndarray) -> np.ndarray:
  """The right eye, left eye and mouth centres: means of contours, as align_68's get_eyes_mouths."""
  return np.stack([landmarks_index[list(indices)].mean(0)
                   for indices in (RIGHT_EYE, LEFT_EYE, LIPS_INNER)])


def aligning_matrix(landmarks_px: np.ndarray) -> np.ndarray:
  """2x3 matrix source pixel index -> aligned-canvas pixel index (cv2.warpAffine's M)."""
  points = eye_mouth_points(np.asarray(landmarks_px, np.float64) - 0.5)
  matrix = transform.SimilarityTransform.from_estimate(points, TEMPLATE).params[:2].copy()
  mouth = matrix @ np.append(points[2], 1.0)
  matrix[:, 2] += TEMPLATE[2] - mouth
  return matrix


def pdfgc_input(frame: np.ndarray, landmarks_px: np.ndarray, size: int = 224) -> np.ndarray:
  """uint8 frame + its pixel landmarks -> the uint8 (size, size, 3) image PD-FGC reads."""
  aligned = cv2.warpAffine(frame, aligning_matrix(landmarks_px), (CANVAS, CANVAS), borderValue=0.0)
  crop = aligned[:CANVAS - 2 * CROP_LEN, CROP_LEN:CANVAS - CROP_LEN]
  return cv2.resize(crop, (size, size))
