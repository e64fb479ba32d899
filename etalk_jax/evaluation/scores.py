"""`etalk eval`'s measuring: the metric networks loaded from one `--models` folder, each video
pair's features, and the paper's numbers from them (the protocol: `evaluation.protocol`).

  fid    Inception-v3 pool3 of every evaluated frame, both sides pooled -> Fréchet distance
  fvd    I3D features of each video's first `fvd_frames` frames -> Fréchet distance over videos
  sync   SyncNet v2 on face crops against the ground truth's speech -> Sync-C, Sync-D per video
  efid   Deep3DFaceRecon's 64 expression coefficients of every frame with a face, both sides
         pooled -> Fréchet distance

The `--models` folder holds one sub-folder per network, each written by `etalk convert`:
inception/, i3d/, syncnet/, face3d/ (only those of the metrics asked for are needed).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import INT16_SCALE, SAMPLE_RATE, media
from data_pipeline.faces import FaceLandmarker
from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.evaluation.extract import BatchedForward
from etalk_jax.evaluation.face3d import expression_coefficients, face3d_inputs
from etalk_jax.evaluation.face3d_params import load_face3d
from etalk_jax.evaluation.frechet import frechet_distance_of_features
from etalk_jax.evaluation.i3d import CONVENTIONS, preprocess_videos
from etalk_jax.evaluation.i3d_params import load_i3d
from etalk_jax.evaluation.inception import inception_inputs
from etalk_jax.evaluation.inception_params import load_inception
from etalk_jax.evaluation.protocol import Protocol, pad_frames
from etalk_jax.evaluation.syncnet import SyncNetScorer, crop_faces
from etalk_jax.evaluation.syncnet_params import load_syncnet
from etalk_jax.layers.compute import FP32, Compute

# metric -> (the --models sub-folder, the `etalk convert` model name, the upstream file)
NETWORKS = {
    "fid": ("inception", "inception", "pt_inception-2015-12-05-6726825d.pth"),
    "fvd": ("i3d", "i3d", "i3d_torchscript.pt"),
    "sync": ("syncnet", "syncnet", "syncnet_v2.model"),
    "efid": ("face3d", "face3d", "epoch_20.pth"),
}
METRICS = tuple(NETWORKS)


def parse_metrics(text: str) -> tuple[str, ...]:
  """"fid,fvd" -> ("fid", "fvd"), in METRICS' order; an unknown name is a user error."""
  names = [name.strip().lower() for name in text.split(",") if name.strip()]
  unknown = [name for name in names if name not in NETWORKS]
  if unknown or not names:
    raise UserError(f"--metrics {text!r}: choose from {', '.join(METRICS)} (comma-separated)")
  return tuple(name for name in METRICS if name in names)


def check_models(models_dir: str | Path, metrics: tuple[str, ...]) -> dict[str, Path]:
  """metric -> its network's folder under `models_dir`; one error lists every one missing,
  with the command that writes it."""
  models_dir = Path(models_dir)
  if not models_dir.is_dir():
    raise InputNotFound(f"--models {models_dir} is not a folder; convert the metric networks "
                        "into it first (`etalk convert inception|i3d|syncnet|face3d`).")
  folders = {metric: models_dir / NETWORKS[metric][0] for metric in metrics}
  missing = [metric for metric, folder in folders.items() if not folder.is_dir()]
  if missing:
    commands = "; ".join(f"`etalk convert {NETWORKS[m][1]} --src {NETWORKS[m][2]} --dst "
                         f"{models_dir / NETWORKS[m][0]}`" for m in missing)
    raise InputNotFound(f"--models {models_dir} lacks the network(s) of {', '.join(missing)}: "
                        f"{commands}; or leave the metric out with --metrics.")
  return folders


@dataclasses.dataclass
class Video:
  """One video as the metrics read it."""
  frames: np.ndarray  # uint8 (n, H, W, 3), 25 fps, at most the protocol's frames
  landmarks_px: np.ndarray | None = None  # (n, 478, 2), NaN where no face was found


def read_frames(path: str | Path, max_frames: int) -> np.ndarray:
  """The first `max_frames` frames of a video at 25 fps (resampled as `media` does), uint8 RGB."""
  frames = []
  for frame in media.iter_video_frames(path):
    frames.append(frame)
    if len(frames) == max_frames:
      break
  if not frames:
    raise UserError(f"{path} has no video frames; give a video file.")
  return np.stack(frames)


def read_speech(path: str | Path, seconds: float) -> np.ndarray:
  """A video's (or audio file's) speech, 16 kHz mono float32 in [-1, 1], its first `seconds`."""
  samples, _ = media.read_audio(path, SAMPLE_RATE)
  return (np.asarray(samples, np.float32) / INT16_SCALE)[:int(round(seconds * SAMPLE_RATE))]


def track_landmarks(frames: np.ndarray) -> np.ndarray:
  """MediaPipe's 478 landmarks per frame (pixels), NaN for a frame without a face."""
  track = np.full((len(frames), 478, 2), np.nan, np.float32)
  with FaceLandmarker() as landmarker:
    for index, frame in enumerate(frames):
      found = landmarker(frame)
      if found is not None:
        track[index] = found
  return track


def _has_face(landmarks_px: np.ndarray) -> np.ndarray:
  return ~np.isnan(landmarks_px).any(axis=(1, 2))


def _mean_and_spread(values: list[float]) -> dict[str, float] | None:
  if not values:
    return None
  array = np.asarray(values, np.float64)
  return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
          "min": float(array.min()), "max": float(array.max()), "videos": len(array)}


class Evaluator:
  """Collects each video pair's features (`add`), then computes the metrics (`result`)."""

  def __init__(self, models_dir: str | Path, metrics: tuple[str, ...], protocol: Protocol, *,
               batch_size: int = 16, fvd_convention: str = "stylegan_v",
               compute: Compute = FP32):
    if fvd_convention not in CONVENTIONS:
      raise UserError(f"--fvd-convention {fvd_convention}: use one of {', '.join(CONVENTIONS)}")
    folders = check_models(models_dir, metrics)
    self.metrics, self.protocol, self.fvd_convention = metrics, protocol, fvd_convention
    self.needs_landmarks = "sync" in metrics or "efid" in metrics
    self._features: dict[str, dict[str, list[np.ndarray]]] = {
        metric: {"generated": [], "reference": []} for metric in ("fid", "fvd", "efid")}
    self._sync: dict[str, list[float]] = {}
    self.rows: list[dict[str, Any]] = []
    self.seconds: dict[str, float] = {metric: 0.0 for metric in metrics}
    self.frames_seen: dict[str, int] = {metric: 0 for metric in metrics}
    self.padded_for_fvd = 0
    if "fid" in metrics:
      self._inception = BatchedForward(load_inception(folders["fid"], compute),
                                       lambda model, images: model(images), batch_size)
    if "fvd" in metrics:
      convention = fvd_convention
      i3d = load_i3d(folders["fvd"], compute)
      size = i3d.config.input_size
      # One video per device and call: a 128-frame clip at 224² is already a large activation.
      self._i3d = BatchedForward(
          i3d, lambda model, clips: model(preprocess_videos(clips, convention, size)), 1)
    if "sync" in metrics:
      syncnet = load_syncnet(folders["sync"], compute)
      self._crop_size = syncnet.config.image_size
      self._syncnet = SyncNetScorer(syncnet)
    if "efid" in metrics:
      face3d = load_face3d(folders["efid"], compute)
      self._face_size = face3d.config.image_size
      self._face3d = BatchedForward(face3d, expression_coefficients, batch_size)

  def _timed(self, metric: str, frames: int, function, *args):
    began = time.perf_counter()
    result = function(*args)
    self.seconds[metric] += time.perf_counter() - began
    self.frames_seen[metric] += frames
    return result

  def _sync_scores(self, video: Video, speech: np.ndarray) -> dict[str, float] | None:
    """Sync-C, Sync-D and the offset of one video against `speech`; None without any face."""
    if not _has_face(video.landmarks_px).any():
      return None
    crops = crop_faces(video.frames, video.landmarks_px, size=self._crop_size)
    scores = self._syncnet(crops, speech)
    return {"sync_c": float(scores.confidence), "sync_d": float(scores.min_distance),
            "offset": int(scores.offset)}

  def _expressions(self, video: Video) -> np.ndarray:
    found = _has_face(video.landmarks_px)
    if not found.any():
      return np.zeros((0, 64), np.float32)
    return self._face3d(face3d_inputs(video.frames[found], video.landmarks_px[found],
                                      self._face_size))

  def add(self, name: str, generated: Video, reference: Video, speech: np.ndarray
          ) -> dict[str, Any]:
    """Measures one pair (`speech`: the ground truth's, 16 kHz float) and returns its row."""
    row: dict[str, Any] = {"name": name, "frames": {"generated": len(generated.frames),
                                                    "reference": len(reference.frames)}}
    sides = {"generated": generated, "reference": reference}
    for side, video in sides.items():
      if "fid" in self.metrics:
        self._features["fid"][side].append(self._timed(
            "fid", len(video.frames), self._inception, inception_inputs(video.frames)))
      if "fvd" in self.metrics:
        clip, padded = pad_frames(video.frames, self.protocol.fvd_frames)
        self.padded_for_fvd += padded
        row.setdefault("fvd_padded", {})[side] = padded
        self._features["fvd"][side].append(self._timed(
            "fvd", self.protocol.fvd_frames, self._i3d, clip[None]))
      if "sync" in self.metrics:
        scores = self._timed("sync", len(video.frames), self._sync_scores, video, speech)
        row.setdefault("sync", {})[side] = scores
        if scores is not None:
          for key in ("sync_c", "sync_d"):
            self._sync.setdefault(f"{side}/{key}", []).append(scores[key])
      if "efid" in self.metrics:
        expressions = self._timed("efid", len(video.frames), self._expressions, video)
        row.setdefault("efid_frames", {})[side] = len(expressions)
        self._features["efid"][side].append(expressions)
    self.rows.append(row)
    return row

  def result(self) -> dict[str, Any]:
    """The metrics over every pair added, with what each was computed from."""
    metrics: dict[str, Any] = {}
    for metric in ("fid", "fvd", "efid"):
      if metric not in self.metrics:
        continue
      generated = np.concatenate(self._features[metric]["generated"])
      reference = np.concatenate(self._features[metric]["reference"])
      metrics[metric] = {
          "value": frechet_distance_of_features(generated, reference),
          "samples": {"generated": len(generated), "reference": len(reference)}}
    if "fvd" in metrics:
      metrics["fvd"].update(frames=self.protocol.fvd_frames, convention=self.fvd_convention,
                            zero_padded_videos=self.padded_for_fvd)
    if "sync" in self.metrics:
      metrics["sync"] = {key: _mean_and_spread(self._sync.get(key, []))
                         for key in ("generated/sync_c", "generated/sync_d",
                                     "reference/sync_c", "reference/sync_d")}
      metrics["sync"]["videos_without_face"] = sum(
          1 for row in self.rows for scores in row["sync"].values() if scores is None)
    throughput = {metric: (self.frames_seen[metric] / self.seconds[metric]
                           if self.seconds[metric] else None) for metric in self.metrics}
    return {"metrics": metrics, "videos": len(self.rows), "per_video": self.rows,
            "frames_per_second": throughput}
