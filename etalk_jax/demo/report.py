"""The report's readers and measures: held-out clips, the mouth reader (mouth opening from the
mouth region's pixels), the speech envelope and the lip-sync score (their correlation), the emotion
reader (keyword from the face's colour difference to the person's neutral portrait).

Both readers are fitted on training identities' ground-truth frames only and never see the
generator: the mouth opening is a ridge regression from the mouth region's pixels (placed by the
portrait's landmarks) to the synthetic renderer's exact mouth opening; the emotion is a ridge
one-vs-rest classifier of the frame's downsampled colour difference to the person's neutral
portrait (so the identity's appearance cancels).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline import EMOTION_LABELS, INT16_SCALE, SAMPLES_PER_FRAME, media
from data_pipeline.faces import LIPS_OUTER
from data_pipeline.loader import data_source


@dataclasses.dataclass
class HeldOutClip:
  """A dataset clip as the report reads it (decoded frames, speech in [-1, 1], landmarks in
  pixels): the held-out identity's at test, training identities' to fit the readers."""
  clip_id: str
  emotion: str
  frames: np.ndarray  # uint8 (n, R, R, 3)
  speech: np.ndarray  # float32 16 kHz
  landmarks_px: np.ndarray  # (n, 478, 2)
  mouth_open: np.ndarray  # (n,)


def clip_from_record(record) -> HeldOutClip:
  """A `data_pipeline.loader.data_source` record, decoded."""
  frames = media.decode_frames(record["video"])
  resolution = frames.shape[1]
  clip_id = record["clip_id"]
  return HeldOutClip(
      clip_id=clip_id.decode() if isinstance(clip_id, bytes) else str(clip_id),
      emotion=EMOTION_LABELS[int(record["emotion"])], frames=frames,
      speech=np.asarray(record["audio"], np.float32) / INT16_SCALE,
      landmarks_px=np.asarray(record["landmarks"], np.float32) * resolution,
      mouth_open=np.asarray(record["mouth_open"], np.float32))


def held_out_clips(dataset_dir: str) -> dict[str, list[HeldOutClip]]:
  """Test-split clips (identities never trained on), by speaker."""
  source = data_source(dataset_dir, "test")
  by_speaker: dict[str, list[HeldOutClip]] = {}
  for index in range(len(source)):
    record = source[index]
    speaker = record["speaker"]
    speaker = speaker.decode() if isinstance(speaker, bytes) else str(speaker)
    by_speaker.setdefault(speaker, []).append(clip_from_record(record))
  if not by_speaker:
    raise ValueError(f"{dataset_dir} has no test clips; the demo needs a held-out identity")
  return by_speaker


MOUTH_PATCH = (8, 16)  # rows, columns of the resampled mouth region


def mouth_box(landmarks_px: np.ndarray, size: int) -> tuple[int, int, int, int]:
  """The mouth region (left, top, right, bottom) from one frame's landmarks, with margin for an
  open jaw."""
  lips = landmarks_px[list(LIPS_OUTER)]
  (left, top), (right, bottom) = lips.min(axis=0), lips.max(axis=0)
  width, height = right - left, bottom - top
  box = (left - 0.25 * width, top - 0.5 * height, right + 0.25 * width, bottom + 1.0 * height)
  left, top, right, bottom = (int(round(v)) for v in box)
  return max(left, 0), max(top, 0), min(right, size), min(bottom, size)


def _mouth_patches(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
  """Colour mouth-region pixels in [0, 1], resampled to MOUTH_PATCH: `(n, rows * cols * 3)`."""
  left, top, right, bottom = box
  rows, cols = MOUTH_PATCH
  return np.stack([np.asarray(Image.fromarray(frame[top:bottom, left:right]).resize(
      (cols, rows), Image.BILINEAR), np.float32).reshape(-1) / 255.0 for frame in frames])


def mouth_features(frames: np.ndarray, portrait: np.ndarray,
                   portrait_landmarks_px: np.ndarray) -> np.ndarray:
  """Per frame, the mouth region of the portrait's box in colour and its absolute difference to
  the portrait's: `(n, 2 * rows * cols * 3 + 1)` with a bias column. Grey levels alone are
  ambiguous (an opening shows a dark cavity on one face and white teeth on another, which read
  inverted); the difference to the closed-mouth portrait grows either way."""
  box = mouth_box(portrait_landmarks_px, frames.shape[1])
  patches = _mouth_patches(frames, box)
  difference = np.abs(patches - _mouth_patches(portrait[None], box))
  return np.concatenate([patches, difference, np.ones((len(patches), 1), np.float32)], axis=1)


class MouthReader:
  """Ridge regression: mouth-region pixels -> mouth opening (0 shut .. 1 wide)."""

  def __init__(self, clips_with_portraits: list[tuple[HeldOutClip, np.ndarray, np.ndarray]],
               ridge: float = 1.0):
    """`clips_with_portraits`: (clip, its speaker's portrait frame, the portrait's landmarks in
    pixels). The mouth box comes from the portrait, as at test, so the reader learns to read
    mouths that an emotion moves within that box (a sad mouth's lowered corners, a surprised
    jaw)."""
    features, targets = [], []
    for clip, portrait, portrait_landmarks_px in clips_with_portraits:
      features.append(mouth_features(clip.frames, portrait, portrait_landmarks_px))
      targets.append(clip.mouth_open)
    x, y = np.concatenate(features), np.concatenate(targets)
    self.weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    self.fit_correlation = float(np.corrcoef(x @ self.weights, y)[0, 1])

  def __call__(self, frames: np.ndarray, portrait: np.ndarray,
               portrait_landmarks_px: np.ndarray) -> np.ndarray:
    return mouth_features(frames, portrait, portrait_landmarks_px) @ self.weights


def speech_envelope(speech: np.ndarray, frames: int) -> np.ndarray:
  """RMS of each frame's 640 samples, smoothed over 3 frames."""
  samples = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
  samples[:min(len(speech), len(samples))] = speech[:len(samples)]
  rms = np.sqrt(np.mean(samples.reshape(frames, SAMPLES_PER_FRAME) ** 2, axis=1))
  return np.convolve(np.pad(rms, 1, mode="edge"), np.ones(3) / 3, mode="valid")


def lip_sync_score(mouth_opening: np.ndarray, envelope: np.ndarray) -> float:
  if np.std(mouth_opening) < 1e-8 or np.std(envelope) < 1e-8:
    return 0.0
  return float(np.corrcoef(mouth_opening, envelope)[0, 1])


FACE_PATCH = 32  # side of the downsampled face difference image the emotion reader sees


def face_difference(frames: np.ndarray, portrait: np.ndarray) -> np.ndarray:
  """Per frame, the colour difference to the person's neutral portrait, area-downsampled to
  FACE_PATCH² (identity appearance cancels; brows, eyes and mouth remain): `(n, features + 1)`
  with a bias column."""
  size = frames.shape[1]
  factor = size // FACE_PATCH
  difference = frames.astype(np.float32) / 255.0 - portrait.astype(np.float32)[None] / 255.0
  small = difference.reshape(len(frames), FACE_PATCH, factor, FACE_PATCH, factor, 3).mean((2, 4))
  features = small.reshape(len(frames), -1)
  return np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)


class EmotionReader:
  """Ridge one-vs-rest classifier: face difference to the person's neutral portrait -> emotion
  keyword, fitted on training identities' ground-truth frames."""

  def __init__(self, clips_with_portraits: list[tuple[HeldOutClip, np.ndarray]], keywords,
               ridge: float = 10.0):
    self.keywords = tuple(keywords)
    features, labels = [], []
    for clip, portrait in clips_with_portraits:
      features.append(face_difference(clip.frames, portrait))
      labels.append(np.full(len(clip.frames), self.keywords.index(clip.emotion)))
    x, y = np.concatenate(features), np.concatenate(labels)
    targets = np.eye(len(self.keywords), dtype=np.float32)[y]
    self.weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ targets)
    self.fit_accuracy = float(np.mean((x @ self.weights).argmax(1) == y))

  def accuracy(self, frames: np.ndarray, portrait: np.ndarray, emotion: str) -> float:
    """Fraction of frames read as `emotion`."""
    predicted = (face_difference(frames, portrait) @ self.weights).argmax(1)
    return float(np.mean(predicted == self.keywords.index(emotion)))


def fit_readers(dataset_dir: str) -> tuple[MouthReader, EmotionReader]:
  """The mouth and emotion readers, fitted on training identities' ground truth only."""
  source = data_source(dataset_dir, "train")
  clips = [clip_from_record(source[i]) for i in range(len(source))]
  speakers: dict[str, list[HeldOutClip]] = {}
  for record_index, clip in enumerate(clips):
    speakers.setdefault(str(source[record_index]["speaker"]), []).append(clip)
  with_portraits = []  # (clip, its speaker's neutral portrait frame, the portrait's landmarks)
  for speaker_clips in speakers.values():
    neutral = next((c for c in speaker_clips if c.emotion == "neutral"), speaker_clips[0])
    with_portraits += [(clip, neutral.frames[0], neutral.landmarks_px[0])
                       for clip in speaker_clips]
  keywords = sorted({clip.emotion for clip in clips})
  step = max(1, len(clips) // 24)
  return (MouthReader(with_portraits[::step]),
          EmotionReader([(clip, portrait) for clip, portrait, _ in with_portraits], keywords))




KINDS = ("generated", "ground truth", "no-audio baseline")  # the report's rows


def write_frame_grid(path: Path, rows: list[tuple[str, np.ndarray]], columns: int = 8,
                     scale: int = 2) -> Path:
  """A PNG of `columns` evenly spaced frames of each row's video (uint8 (n, H, W, 3)), one row
  per video with its label on the left, each frame enlarged `scale` times (nearest)."""
  label_width = 110
  height, width = rows[0][1].shape[1:3]
  cell_h, cell_w = height * scale, width * scale
  grid = Image.new("RGB", (label_width + columns * cell_w, len(rows) * cell_h), "white")
  draw = ImageDraw.Draw(grid)
  for row, (label, frames) in enumerate(rows):
    draw.text((6, row * cell_h + cell_h // 2 - 6), label, fill="black")
    picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
    for column, index in enumerate(picks):
      tile = Image.fromarray(frames[index]).resize((cell_w, cell_h), Image.NEAREST)
      grid.paste(tile, (label_width + column * cell_w, row * cell_h))
  path = Path(path)
  grid.save(path)
  return path


def write_report(workdir: Path, videos: list[tuple[str, str]],
                 rows: dict[str, dict[str, list[float]]], generation: list[dict[str, float]],
                 readers: tuple[MouthReader, EmotionReader], phases: dict[str, float],
                 total_seconds: float, checkpoint: dict | None = None) -> dict:
  """report.json from each kind's per-video scores (`rows`: kind -> "lip_sync" / "emotion" ->
  one score per video, `videos`: each video's (held-out speaker, emotion)) and the sampler's
  timings (`generation`: frames and seconds per video), printed as the demo's closing table;
  returns the report. Each kind's score is the mean over the videos, with their standard
  deviation beside it: one 100-frame video's lip sync moves by 0.1-0.2 by chance. `checkpoint`:
  where the sampled checkpoint came from, recorded as given."""
  reader, emotion_reader = readers
  report: dict = {}
  for kind, scores in rows.items():
    report[kind] = {}
    for name, values in scores.items():
      report[kind][name] = float(np.mean(values))
      report[kind][f"{name}_std"] = float(np.std(values))
  report["videos"] = [{"speaker": speaker, "emotion": emotion,
                       **{kind: {name: float(values[index]) for name, values in scores.items()}
                          for kind, scores in rows.items()}}
                      for index, (speaker, emotion) in enumerate(videos)]
  later = generation[1:] or generation
  report["sampling"] = {
      "first_video_seconds_incl_compile": round(generation[0]["seconds"], 1),
      "frames_per_second": round(sum(g["frames"] for g in later) /
                                 sum(g["seconds"] for g in later), 2)}
  report["phases_seconds"] = phases
  report["total_seconds"] = round(total_seconds, 1)
  report["mouth_reader_fit_correlation"] = reader.fit_correlation
  report["emotion_reader_fit_accuracy"] = emotion_reader.fit_accuracy
  if checkpoint is not None:
    report["checkpoint"] = checkpoint
  (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")

  speakers = sorted({speaker for speaker, _ in videos})
  order = ("generated", "no-audio baseline", "ground truth")
  print(f"\n== report ({len(videos)} videos: held-out identities {', '.join(speakers)} x "
        f"emotions {', '.join(dict.fromkeys(e for _, e in videos))}; {workdir / 'report.json'})")
  labels = ("generated", "no audio", "truth")
  print(f"   {'':22s}{'lip sync':^30s}  {'emotion accuracy':^30s}")
  print(f"   {'video':22s}" + "".join(f"{label:>10s}" for label in labels) + "  " +
        "".join(f"{label:>10s}" for label in labels))

  def line(title: str, values) -> None:
    lip, emotion = values
    print(f"   {title:22s}" + "".join(f"{value:10.3f}" for value in lip) + "  " +
          "".join(f"{value:10.3f}" for value in emotion))

  for index, (speaker, emotion) in enumerate(videos):
    line(f"{speaker} {emotion}", [[rows[kind][name][index] for kind in order]
                                  for name in ("lip_sync", "emotion")])
  line("mean", [[report[kind][name] for kind in order] for name in ("lip_sync", "emotion")])
  line("std over the videos", [[report[kind][f"{name}_std"] for kind in order]
                               for name in ("lip_sync", "emotion")])
  print(f"   (generated; the same without the audio; the ground truth. Emotion chance "
        f"{1 / len(emotion_reader.keywords):.3f})")
  print(f"   sampling: {report['sampling']['frames_per_second']} frames/s after the first video "
        f"({report['sampling']['first_video_seconds_incl_compile']} s incl. compile)")
  margin = report["generated"]["lip_sync"] - report["no-audio baseline"]["lip_sync"]
  print(f"   generated lip sync is {abs(margin):.3f} {'above' if margin >= 0 else 'below'} the "
        "no-audio baseline's (mean over the videos)")
  print(f"   total {report['total_seconds'] / 60:.1f} min; videos (generated, no-audio, ground "
        f"truth) in {workdir / 'videos'}")
  print(f"   try it in the browser: etalk app --checkpoint {workdir / 'checkpoint'}")
  return report
