"""Faces: 478-point landmarks (MediaPipe), stable per-clip crop boxes, the PD-FGC encoder crop, and
the face / lip masks of docs/ARCHITECTURE.md §3.6.

Only `FaceLandmarker` needs MediaPipe (the optional `faces` extra); everything else works on
landmark arrays, so synthetic faces (which carry their own landmarks) and the loader never import
it.
Landmarks are (478, 2) arrays of (x, y); the functions say whether they expect pixels or [0, 1].
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline import NUM_LANDMARKS
from etalk_jax.errors import MissingDependency

# Closed contours of MediaPipe's face mesh, in drawing order (from mp.solutions.face_mesh's
# FACEMESH_* connection sets). "Left"/"right" are the subject's: the right eye is on the image's
# left.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
             377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67,
             109)
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40,
              185)
LIPS_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80,
              191)
RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_BROW = (46, 53, 52, 65, 55, 107, 66, 105, 63, 70)
LEFT_BROW = (276, 283, 282, 295, 285, 336, 296, 334, 293, 300)
RIGHT_IRIS = (468, 469, 470, 471, 472)  # centre first
LEFT_IRIS = (473, 474, 475, 476, 477)
# Single points used for alignment and measurement.
MOUTH_CORNERS = (61, 291)
INNER_LIP_MIDDLE = (13, 14)  # upper, lower
FOREHEAD_TOP, CHIN = 10, 152


# -------------------------------------------------------------------------------------------- masks

@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """Dilation radii as fractions of the face height (forehead top to chin), so masks scale with the
  face."""
  face_dilation: float = 0.06
  mouth_cutout_dilation: float = 0.04  # the mouth region removed from the face mask
  lip_dilation: float = 0.06


def face_height(landmarks: np.ndarray) -> float:
  return float(np.linalg.norm(landmarks[CHIN] - landmarks[FOREHEAD_TOP]))


def _draw_region(draw: ImageDraw.ImageDraw, points: np.ndarray, radius: float, value: int) -> None:
  """Fills a polygon dilated by `radius` pixels: the polygon plus a round-jointed stroke of width 2r
  along its outline (the Minkowski sum with a disc, up to the stroke's polygonal joints)."""
  polygon = [tuple(p) for p in points.tolist()]
  draw.polygon(polygon, fill=value)
  if radius >= 0.5:
    width = int(round(2 * radius))
    draw.line(polygon + [polygon[0]], fill=value, width=width, joint="curve")
    for x, y in polygon:  # round caps at every vertex close the gaps the joints leave
      draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=value)


def face_and_lip_masks(landmarks_px: np.ndarray, size: int | tuple[int, int],
                       config: MaskConfig = MaskConfig()) -> tuple[np.ndarray, np.ndarray]:
  """(face mask, lip mask), each (H, W) uint8 in {0, 1}, from pixel landmarks of one frame.

  face mask = face oval, dilated, minus the dilated mouth; lip mask = the mouth (outer lip contour),
  dilated. `size` is the image size, int for square or (height, width).
  """
  height, width = (size, size) if isinstance(size, int) else size
  scale = face_height(landmarks_px)
  face = Image.new("L", (width, height), 0)
  draw = ImageDraw.Draw(face)
  _draw_region(draw, landmarks_px[list(FACE_OVAL)], config.face_dilation * scale, 1)
  _draw_region(draw, landmarks_px[list(LIPS_OUTER)], config.mouth_cutout_dilation * scale, 0)
  lips = Image.new("L", (width, height), 0)
  _draw_region(ImageDraw.Draw(lips), landmarks_px[list(LIPS_OUTER)], config.lip_dilation * scale, 1)
  return np.asarray(face, np.uint8), np.asarray(lips, np.uint8)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
  """Inner-lip gap over face height, per frame: landmarks (..., 478, 2) -> (...). Unitless, so it
  compares across resolutions and crops (a measurement on generated frames uses the same
  function)."""
  gap = np.linalg.norm(
      landmarks[..., INNER_LIP_MIDDLE[1], :] - landmarks[..., INNER_LIP_MIDDLE[0], :], axis=-1)
  height = np.linalg.norm(landmarks[..., CHIN, :] - landmarks[..., FOREHEAD_TOP, :], axis=-1)
  return gap / np.maximum(height, 1e-6)


# --------------------------------------------------------------------------------------- crop boxes

@dataclasses.dataclass(frozen=True)
class CropConfig:
  """The training crop: a square around the face, like Hallo's (face box enlarged so that hair, chin
  and some shoulder are in, and so that head motion within a clip stays inside)."""
  enlarge: float = 1.9  # crop side / face size (the larger of the landmark box's width and height)
  shift_down: float = 0.05  # of the crop side: centre a little below the face centre, to keep
  #                           the chin in
  size_percentile: float = 90.0  # face size over the clip's frames (robust to a few bad detections)


def landmark_box(landmarks_px: np.ndarray) -> np.ndarray:
  """(x0, y0, x1, y1) of the landmarks of one frame."""
  return np.concatenate([landmarks_px.min(axis=0), landmarks_px.max(axis=0)])


def clip_crop_box(landmarks_px: np.ndarray, config: CropConfig = CropConfig()) -> np.ndarray:
  """One square box (x0, y0, x1, y1), float, for a whole clip from its per-frame pixel landmarks
  (T, 478, 2): median face centre, a high percentile of the face size, enlarged. One box per clip
  is the most stable crop there is (no jitter at all), and it keeps the background still."""
  mins, maxs = landmarks_px.min(axis=1), landmarks_px.max(axis=1)
  centres = (mins + maxs) / 2
  sizes = (maxs - mins).max(axis=1)
  side = float(np.percentile(sizes, config.size_percentile)) * config.enlarge
  cx, cy = np.median(centres, axis=0)
  cy += config.shift_down * side
  return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float64)


def crop_frame(frame: np.ndarray, box: np.ndarray, resolution: int) -> np.ndarray:
  """The square `box` of an RGB frame, resized to resolution²; parts outside the frame are filled
  with the nearest edge pixels (a face near the border still gets a full crop)."""
  x0, y0, x1, y1 = (float(v) for v in box)
  height, width = frame.shape[:2]
  image = Image.fromarray(frame)
  left, top = int(np.floor(x0)), int(np.floor(y0))
  right, bottom = int(np.ceil(x1)), int(np.ceil(y1))
  if left < 0 or top < 0 or right > width or bottom > height:
    pad = max(-left, -top, right - width, bottom - height, 0)
    frame = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    image = Image.fromarray(frame)
    x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
  return np.asarray(image.resize((resolution, resolution), Image.Resampling.BILINEAR,
                                 box=(x0, y0, x1, y1), reducing_gap=2.0))


def to_crop_coordinates(landmarks_px: np.ndarray, box: np.ndarray) -> np.ndarray:
  """Source-pixel landmarks -> [0, 1] coordinates of the square crop `box`."""
  return (landmarks_px - box[:2]) / (box[2] - box[0])


# ------------------------------------------------------------------------------ PD-FGC encoder crop

# Every l_v / e_v is computed on `etalk_jax.vision.alignment.pdfgc_inputs` (per-frame alignment,
# upstream's two resamplings, on device), which reads the template and crop below. The host
# functions here (one resampling, a clip's rotation and smoothed shifts) serve only the loader's
# `with_pdfgc`.
PDFGC_SIZE = 224
# PD-FGC's loader crops rows 0..192 and columns 16..208 of the aligned 224² face and resizes that
# back to 224² (../shared/reference/pdfgc-encoder.md).
PDFGC_INNER = (16.0, 0.0, 208.0, 192.0)
# PC-AVS's alignment (scripts/align_68.py, which PD-FGC's readme names for new footage): a
# similarity transform taking the eye centres and the mouth centre to these points of the aligned
# 224² image.
# Given there in pixel indices; here +0.5, as all coordinates in this module are continuous (pixel
# centres at .5, as MediaPipe's normalised landmarks and PIL's transforms have them).
# Right eye, left eye, mouth.
PDFGC_TEMPLATE = np.array([[87.5, 59.5], [137.5, 59.5], [112.5, 120.5]])
# PC-AVS smooths the per-frame shift: 0.2 of the previous one, 0.8 of this frame's.
_PDFGC_SHIFT_MEMORY = 0.2


def _pdfgc_points(landmarks_px: np.ndarray) -> np.ndarray:
  """(..., 478, 2) -> (..., 3, 2): right eye, left eye and mouth centres, the means of the eye
  contours and the inner lip ring (MediaPipe's counterparts of the 68-point sets PC-AVS
  averages)."""
  return np.stack([landmarks_px[..., list(RIGHT_EYE), :].mean(-2),
                   landmarks_px[..., list(LEFT_EYE), :].mean(-2),
                   landmarks_px[..., list(LIPS_INNER), :].mean(-2)], axis=-2)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The least-squares similarity (rotation, uniform scale, shift) taking points src (N, 2) to dst,
  as a 2x3 matrix. In complex numbers, dst - mean = z (src - mean) with
  z = sum(conj(a) b) / sum(|a|²)."""
  src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
  a = (src - src_mean) @ np.array([1, 1j])
  b = (dst - dst_mean) @ np.array([1, 1j])
  z = np.vdot(a, b) / np.vdot(a, a).real
  linear = np.array([[z.real, -z.imag], [z.imag, z.real]])
  return np.c_[linear, dst_mean - linear @ src_mean]


def pdfgc_affines(track_px: np.ndarray) -> np.ndarray:
  """(T, 478, 2) pixel landmarks of consecutive frames -> (T, 2, 3) matrices A_t, each
  mapping an encoder-input pixel (u, v, 1) to a source pixel (x, y) of frame t.

  As PC-AVS aligns a video: one rotation and scale for the whole track, fitted to its mean eye and
  mouth centres (so the crop does not wobble with landmark noise), and a per-frame shift that puts
  that frame's mouth centre on the template's, smoothed over time. Then PD-FGC's inner crop, resized
  back to 224².
  """
  points = _pdfgc_points(np.asarray(track_px, np.float64))
  forward = _similarity(points.mean(axis=0), PDFGC_TEMPLATE)  # source -> aligned 224²
  linear, offset = forward[:, :2], forward[:, 2]
  shifts = PDFGC_TEMPLATE[2] - (points[:, 2] @ linear.T + offset)
  for t in range(1, len(shifts)):
    shifts[t] = _PDFGC_SHIFT_MEMORY * shifts[t - 1] + (1 - _PDFGC_SHIFT_MEMORY) * shifts[t]
  # Encoder pixel e -> aligned pixel s * e + o (the inner crop) -> source
  # L^-1 (aligned - offset - shift).
  u0, v0, u1, v1 = PDFGC_INNER
  scale = np.diag([(u1 - u0) / PDFGC_SIZE, (v1 - v0) / PDFGC_SIZE])
  inverse = np.linalg.inv(linear)
  matrices = np.empty((len(shifts), 2, 3))
  matrices[:, :, :2] = inverse @ scale
  matrices[:, :, 2] = (np.array([u0, v0]) - offset - shifts) @ inverse.T
  return matrices


def pdfgc_affine(landmarks_px: np.ndarray) -> np.ndarray:
  """`pdfgc_affines` of a single frame (478, 2): its 2x3 matrix (the mouth centre lands exactly on
  the template's)."""
  return pdfgc_affines(landmarks_px[None])[0]


def pdfgc_warp(frame: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """The PD-FGC encoder input (224, 224, 3) uint8 of an RGB frame for a `pdfgc_affines` matrix
  (scale to [-1, 1] on device). Outside the frame is black, as PC-AVS's warp leaves it."""
  image = Image.fromarray(frame).transform((PDFGC_SIZE, PDFGC_SIZE), Image.Transform.AFFINE,
                                           data=tuple(np.asarray(matrix).reshape(-1)),
                                           resample=Image.Resampling.BILINEAR)
  return np.asarray(image)


def pdfgc_crop(frame: np.ndarray, landmarks_px: np.ndarray) -> np.ndarray:
  """The PD-FGC encoder input of one frame aligned on its own landmarks (for a video, prefer
  `pdfgc_affines` over the clip and `pdfgc_warp`: steadier)."""
  return pdfgc_warp(frame, pdfgc_affine(landmarks_px))


# ---------------------------------------------------------------------------------------- detection

def require_mediapipe():
  """The `mediapipe` module, or MissingDependency naming the `faces` extra. Commands that detect
  faces call it before any work (`etalk prepare` would otherwise skip every video for it)."""
  try:
    import mediapipe  # noqa: PLC0415 (optional, the `faces` extra: detection only)
  except ImportError as error:
    raise MissingDependency(f"face detection needs MediaPipe ({error}): pip install "
                            "'etalk-jax[faces]' (mediapipe==0.10.14, which ships its models)"
                            ) from None
  return mediapipe


# mediapipe 0.10.14 calls protobuf 4's deprecated GetPrototype on every frame: not the user's
# concern (the `faces` extra pins both).
warnings.filterwarnings("ignore", message="SymbolDatabase.GetPrototype", category=UserWarning)


@contextlib.contextmanager
def _start_up_notes_hidden():
  """MediaPipe's native side (TFLite's "Created ... delegate", absl's "All log messages before
  absl::InitializeLog()", the "Feedback manager" warnings) writes start-up notes straight to file
  descriptor 2, which no Python or environment setting of mediapipe 0.10.14 silences; protobuf
  prints. They come from the graph's threads as it starts, so the mesh is created and runs one
  blank frame inside this (tens of milliseconds; nothing else writes to stderr meanwhile)."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


class FaceLandmarker:
  """MediaPipe face mesh (478 points with refined eyes and lips) over the frames of one video.

  Several faces: the largest is taken in the first frame, then the face nearest the previous one
  (so a passer-by does not steal the track). Use as a context manager; one instance per video.
  """

  def __init__(self, max_faces: int = 4, min_confidence: float = 0.5):
    mp = require_mediapipe()
    with _start_up_notes_hidden():
      self._mesh = mp.solutions.face_mesh.FaceMesh(
          static_image_mode=False, max_num_faces=max_faces, refine_landmarks=True,
          min_detection_confidence=min_confidence, min_tracking_confidence=min_confidence)
      # A blank frame starts the inference threads (which log) here; it finds no face, so the
      # tracking state is as before.
      self._mesh.process(np.zeros((64, 64, 3), np.uint8))
    self._previous_centre: np.ndarray | None = None
    self.faces_seen_max = 0

  def __enter__(self) -> "FaceLandmarker":
    return self

  def __exit__(self, *exc) -> None:
    self._mesh.close()

  def __call__(self, frame: np.ndarray) -> np.ndarray | None:
    """Pixel landmarks (478, 2) float32 of the tracked face in an RGB frame, or None if no face."""
    result = self._mesh.process(np.ascontiguousarray(frame))
    if not result.multi_face_landmarks:
      return None
    height, width = frame.shape[:2]
    faces = [np.array([(p.x * width, p.y * height) for p in face.landmark[:NUM_LANDMARKS]],
                      np.float32)
             for face in result.multi_face_landmarks]
    self.faces_seen_max = max(self.faces_seen_max, len(faces))
    if self._previous_centre is None or len(faces) == 1:
      chosen = max(faces, key=lambda f: np.prod(f.max(axis=0) - f.min(axis=0)))
    else:
      chosen = min(faces, key=lambda f: np.linalg.norm(f.mean(axis=0) - self._previous_centre))
    self._previous_centre = chosen.mean(axis=0)
    return chosen
