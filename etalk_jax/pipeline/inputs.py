"""The pipeline's inputs: the portrait, the speech and a driving video read and checked, the face
found and cropped as training crops faces, and the generated crops pasted back into the portrait.

Face detection is MediaPipe's (`data_pipeline.faces.FaceLandmarker`, loaded when first used);
every crop is the training crop (`clip_crop_box`) at the pipeline's resolution.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline import SAMPLE_RATE, faces, media
from etalk_jax.audio.features import load_speech
from etalk_jax.errors import InputNotFound, UserError

log = logging.getLogger(__name__)

MIN_SPEECH_SECONDS = 0.2


def read_image(source: Any, what: str = "the portrait") -> tuple[np.ndarray, str]:
  """A path or an array -> (uint8 RGB (H, W, 3), its name for messages: `what` and the path,
  e.g. "the emotion image face.png")."""
  if isinstance(source, (str, Path)):
    path = Path(source)
    if not path.is_file():
      raise InputNotFound(f"{what} {path} does not exist; give a PNG or JPEG photo.")
    try:
      with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), f"{what} {path}"
    except (UnidentifiedImageError, OSError) as error:
      raise UserError(f"{what} {path} could not be read as an image ({error}); give a PNG or "
                      "JPEG photo.") from None
  image = np.asarray(source)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise UserError(f"{what} array has shape {image.shape} and dtype {image.dtype}; give "
                    "uint8 RGB (height, width, 3).")
  return image, f"{what} array"


def detect_face(image: np.ndarray, name: str) -> np.ndarray:
  """Pixel landmarks (478, 2) of the largest face in an RGB image (MediaPipe). With several
  faces, a warning is logged (one line on `etalk`'s stderr; Python's last-resort handler prints
  it where logging is not set up) and the largest is used."""
  with faces.FaceLandmarker() as landmarker:
    landmarks = landmarker(image)
    count = landmarker.faces_seen_max
  if landmarks is None:
    raise UserError(f"no face found in {name}; use a photo with one clearly visible, frontal "
                    "face")
  if count > 1:
    log.warning("%d faces found in %s; using the largest (crop the photo to choose another)",
                count, name)
  return np.asarray(landmarks, np.float32)


@dataclasses.dataclass(frozen=True)
class FaceCrop:
  """The square face crop of one image at the pipeline's resolution."""
  crop: np.ndarray       # uint8 (R, R, 3)
  box: np.ndarray        # (x0, y0, x1, y1) in the source image's pixels
  landmarks: np.ndarray  # (478, 2) pixels of the crop


def crop_face(image: np.ndarray, landmarks_px: np.ndarray, resolution: int) -> FaceCrop:
  """The training crop (`clip_crop_box`) of one image, with its landmarks in crop pixels."""
  landmarks_px = np.asarray(landmarks_px, np.float32)
  if landmarks_px.shape != (478, 2):
    raise UserError(f"landmarks have shape {landmarks_px.shape}; give (478, 2) pixel "
                    "coordinates (MediaPipe's face mesh).")
  box = faces.clip_crop_box(landmarks_px[None])
  return FaceCrop(faces.crop_frame(image, box, resolution), box,
                  faces.to_crop_coordinates(landmarks_px, box) * resolution)


def aligned_face(image: np.ndarray, landmarks_px: np.ndarray, resolution: int,
                 name: str) -> FaceCrop:
  """An image that already is a training crop at `resolution` (a frame of a prepared dataset),
  with `landmarks_px` in its pixels: the crop as it is, its box the whole image."""
  if image.shape[:2] != (resolution, resolution):
    raise UserError(f"an aligned portrait must be {resolution}x{resolution} (the pipeline's "
                    f"resolution); {name} is {image.shape[1]}x{image.shape[0]}. Pass "
                    "aligned=False to crop it.")
  return FaceCrop(image, np.array([0, 0, resolution, resolution], np.float64),
                  np.asarray(landmarks_px, np.float32))


def read_speech(source: Any) -> tuple[np.ndarray, str]:
  """A path, a `(samples, rate)` pair or 16 kHz float samples -> (float32 16 kHz mono, name);
  speech shorter than MIN_SPEECH_SECONDS is refused."""
  if isinstance(source, np.ndarray):
    source = (source, SAMPLE_RATE)
  what = str(source) if isinstance(source, (str, Path)) else "the speech array"
  samples = load_speech(source, what)
  if samples.shape[0] < MIN_SPEECH_SECONDS * SAMPLE_RATE:
    raise UserError(f"{what} lasts {samples.shape[0] / SAMPLE_RATE:.3f} s; the speech must last "
                    f"at least {MIN_SPEECH_SECONDS} s.")
  return samples, what


def check_driving_video(video_path: Any) -> Path:
  """The driving video's path, checked to exist and to be a video: a still image (a PNG or JPEG
  decodes as one frame) is refused, pointing to --emotion-image."""
  path = Path(video_path)
  if not path.is_file():
    raise InputNotFound(f"the emotion video {path} does not exist; give an mp4 of a talking "
                        "face.")
  frames = 0
  for _ in media.iter_video_frames(path):
    frames += 1
    if frames == 2:
      return path
  raise UserError(f"the emotion video {path} is a still image ({frames} frame); give a video "
                  "of a talking face, or pass a photo as --emotion-image.")


def video_face_crops(video_path: Any, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """A driving video -> (uint8 crops (n, R, R, 3), their landmarks (n, 478, 2) in crop pixels)
  of its frames with a face, all cut with one box (the training crop of the whole clip)."""
  path = check_driving_video(video_path)
  video, landmarks = [], []
  with faces.FaceLandmarker() as landmarker:
    for frame in media.iter_video_frames(path):
      points = landmarker(frame)
      if points is not None:
        video.append(frame)
        landmarks.append(points)
  if not landmarks:
    raise UserError(f"no face found in the emotion video {path}; use a video with one clearly "
                    "visible, frontal face")
  landmarks = np.stack(landmarks)
  box = faces.clip_crop_box(landmarks)
  crops = np.stack([faces.crop_frame(frame, box, resolution) for frame in video])
  return crops, faces.to_crop_coordinates(landmarks, box) * resolution


def resample_frames(values: np.ndarray, frames: int) -> np.ndarray:
  """Per-frame values (m, ...) -> (frames, ...): cut when m >= frames, else stretched by nearest
  frame (a driving video shorter than the speech is slowed down, not looped)."""
  count = values.shape[0]
  if count >= frames:
    return values[:frames]
  return values[np.floor(np.arange(frames) * count / frames).astype(np.int64)]


def paste_into_portrait(portrait: np.ndarray, crops: np.ndarray, box: np.ndarray,
                        feather: float = 0.06) -> np.ndarray:
  """Generated crops (n, R, R, 3) resized to the crop box and pasted into copies of the portrait
  frame; the crop's border fades into the portrait over `feather` of its side so no seam shows.
  Parts of the box outside the portrait are dropped."""
  height, width = portrait.shape[:2]
  x0, y0 = int(round(box[0])), int(round(box[1]))
  side = max(int(round(box[2] - box[0])), 1)
  left, top = max(x0, 0), max(y0, 0)
  right, bottom = min(x0 + side, width), min(y0 + side, height)
  frames = np.repeat(portrait[None], crops.shape[0], axis=0)
  if right <= left or bottom <= top:
    return frames
  ramp = np.clip((np.minimum(np.arange(side), side - 1 - np.arange(side)) + 0.5)
                 / max(feather * side, 1.0), 0.0, 1.0)
  alpha = np.minimum(ramp[:, None], ramp[None, :])[..., None]
  alpha = alpha[top - y0:bottom - y0, left - x0:right - x0]
  for index, crop in enumerate(crops):
    resized = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BILINEAR),
                         np.float32)[top - y0:bottom - y0, left - x0:right - x0]
    region = frames[index, top:bottom, left:right].astype(np.float32)
    frames[index, top:bottom, left:right] = np.round(
        alpha * resized + (1 - alpha) * region).astype(np.uint8)
  return frames
