"""`etalk prepare`: a folder of talking-head videos -> a TFDS ArrayRecord dataset of cropped clips.

Per video (cached, so a re-run after a crash reuses every finished video):
  probe -> audio as 16 kHz mono (MEAD: the matching .m4a) -> 25 fps frames -> MediaPipe landmarks
  (largest face, tracked) -> runs of frames with a face, cut into clips of at most `clip_frames` ->
  one stable square crop box per clip -> H.264 crop at `resolution`², audio, landmarks.
Then the TFDS builder (`hdtf`, `mead` or `talking_heads`) splits clips 90/10 (seeded, by clip or by
speaker) and writes array_record files. TFDS writes into a temporary folder and renames it when
complete, so a crash never leaves a partial dataset visible.

Anything wrong with one input (corrupt, truncated or empty file, no audio or a silent track, no
face, too small) skips that input with its reason, counted in `<dst>/prepare_report.json`; it never
stops the run. What concerns every input stops it before any work, as one user error: a missing
`faces` extra (`faces.require_mediapipe`), and, once every video is done, nothing to write
(`NothingPrepared`: every video skipped). Unusual but valid inputs are prepared: variable frame
rates, a display matrix (turned upright), odd sizes, any audio rate or channel layout, gaps in the
audio's timestamps (silence). A run killed at any point (SIGKILL) and started again redoes only the
video it was on and writes the same records as an uninterrupted run.
The command itself (`prepare_command`) sits above the builders, in data_pipeline.builders.real.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline import EMOTION_LABELS, SAMPLE_RATE, SAMPLES_PER_FRAME, faces, media
from etalk_jax.errors import InputNotFound, MissingDependency, UserError

LAYOUTS = ("hdtf", "mead", "folder")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
MEAD_EMOTIONS = {"angry": "angry", "contempt": "contempt", "disgusted": "disgusted",
                 "fear": "fearful", "happy": "happy", "neutral": "neutral", "sad": "sad",
                 "surprised": "surprised"}
# The paper drops MEAD clips shorter than one 120-frame window from training.
MEAD_MIN_TRAIN_FRAMES = 120
WORK_DIR_NAME = "_prepare_work"
TEMPORARY_PREFIX = "."  # a video's folder while it is being prepared: .<key>.tmp-<pid>
# A track whose loudest sample stays under this (int16; -60 dBFS) holds no speech: skipped, since
# lip sync cannot be learnt from it. Silence inside a track with speech is kept.
SILENT_PEAK = 33


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  resolution: int = 512
  clip_frames: int = 250  # longest clip; longer face runs are cut into near-equal clips
  min_clip_frames: int = 25  # shorter runs are dropped
  min_source_side: int = 64  # videos smaller than this (either side) are skipped as too small
  min_face_fraction: float = 0.25  # crop side in source pixels must be >= this x resolution
  max_gap_frames: int = 3  # face lost for at most this many frames: landmarks interpolated
  crf: int = 18
  test_fraction: float = 0.1
  split_by_speaker: bool = False
  seed: int = 0
  workers: int = 1  # processes, one video each

  def fingerprint(self) -> str:
    """What changes the per-video work (not the split): part of the cache key."""
    fields = (self.resolution, self.clip_frames, self.min_clip_frames, self.min_source_side,
              self.min_face_fraction, self.max_gap_frames, self.crf)
    return hashlib.sha1(repr(fields).encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class VideoItem:
  path: Path
  relative: str  # path relative to the source folder (stable name across machines)
  speaker: str
  emotion: str = "unknown"
  level: int = 0
  audio_path: Path | None = None  # separate audio (MEAD); None: the video's own track


# ------------------------------------------------------------------------------------------ layouts

def list_videos(src: str | os.PathLike, layout: str) -> list[VideoItem]:
  """The videos of a source folder in a given layout, sorted by path.

  hdtf:   <src>/**/<Name>_<NNN>.mp4, speaker = file name without a trailing _<number>
  mead:   <src>/<speaker>/video/front/<emotion>/level_<k>/<NNN>.mp4, audio from
          <src>/<speaker>/audio/<emotion>/level_<k>/<NNN>.m4a when present
  folder: <src>/**/*.<video>, speaker = first sub-folder, or the file name for files at the top
  """
  src = Path(src)
  if layout not in LAYOUTS:
    raise UserError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
  if not src.is_dir():
    raise InputNotFound(f"{src}: source folder not found; pass --src DIR with the videos")
  items = []
  for path in sorted(p for p in src.rglob("*")
                     if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
    relative = path.relative_to(src).as_posix()
    if layout == "mead":
      parts = path.relative_to(src).parts
      if (len(parts) != 6 or parts[1:3] != ("video", "front")
          or not re.fullmatch(r"level_\d+", parts[4])):
        continue  # MEAD's other camera angles and stray files are not used
      speaker, emotion_folder, level_folder = parts[0], parts[3], parts[4]
      emotion = MEAD_EMOTIONS.get(emotion_folder, "unknown")
      audio = src / speaker / "audio" / emotion_folder / level_folder / f"{path.stem}.m4a"
      items.append(VideoItem(path, relative, speaker, emotion, int(level_folder.split("_")[1]),
                             audio if audio.is_file() else None))
    elif layout == "hdtf":
      items.append(VideoItem(path, relative, re.sub(r"_\d+$", "", path.stem)))
    else:
      parts = path.relative_to(src).parts
      items.append(VideoItem(path, relative, parts[0] if len(parts) > 1 else path.stem))
  return items


# ---------------------------------------------------------------------------------------- per video

class Skip(Exception):
  """An input that cannot be used: `category` counts it in the report, the message explains it."""

  def __init__(self, category: str, message: str):
    super().__init__(message)
    self.category = category


class NothingPrepared(UserError):
  """Every video was skipped (or no clip was kept): there is no dataset to write. `report` is the
  summary (`summarize`), which the command writes before raising this."""

  def __init__(self, message: str, report: dict):
    super().__init__(message)
    self.report = report


def nothing_prepared_message(src, report: dict, report_path=None) -> str:
  """One line: why nothing was prepared, the most common skip reasons, where each file's is."""
  reasons = sorted(report["skipped_by_reason"].items(), key=lambda pair: (-pair[1], pair[0]))
  counts = ", ".join(f"{name}: {count}" for name, count in reasons[:3])
  if len(reasons) > 3:
    counts += f", {len(reasons) - 3} more kinds"
  if report["videos_skipped"] == report["videos"]:
    videos = "the only video" if report["videos"] == 1 else f"all {report['videos']} videos"
    what = f"{videos} in {src} skipped ({counts})"
    most_common = reasons[0][0]
    example = next(item["reason"] for item in report["skipped_files"]
                   if item["category"] == most_common)
    what += f"; e.g. {example}"
  else:
    what = (f"no clip of {src} was kept: {report['videos_ok']} usable video(s) gave "
            f"{report['clips_dropped_short_from_train']} clip(s), all of them shorter than "
            f"{MEAD_MIN_TRAIN_FRAMES} frames, which MEAD's training split leaves out")
  where = f"; every file's reason is in {report_path}" if report_path else ""
  return f"nothing prepared: {what}{where}"


def _cache_key(item: VideoItem, options: PrepareOptions) -> str:
  stat = item.path.stat()
  audio = item.audio_path.stat() if item.audio_path else None
  identity = (item.relative, stat.st_size, stat.st_mtime_ns,
              audio and (audio.st_size, audio.st_mtime_ns), options.fingerprint())
  stem = re.sub(r"[^A-Za-z0-9_.-]", "_", item.relative)[-80:]
  return f"{stem}-{hashlib.sha1(repr(identity).encode()).hexdigest()[:12]}"


def process_video(item: VideoItem, options: PrepareOptions, work_dir: str | os.PathLike) -> dict:
  """Prepares one video into `work_dir/<key>/` (result.json + clip_NNN.mp4/.npz), atomically: the
  folder appears only when complete, and an existing one is reused. Returns result.json's content:
  {"status": "ok" | "skipped", "category", "reason", "clips": [...], ...}."""
  work_dir = Path(work_dir)
  final = work_dir / _cache_key(item, options)
  if (final / "result.json").is_file():
    return json.loads((final / "result.json").read_text())
  temporary = work_dir / f"{TEMPORARY_PREFIX}{final.name}.tmp-{os.getpid()}"
  shutil.rmtree(temporary, ignore_errors=True)
  temporary.mkdir(parents=True)
  started = time.time()
  try:
    try:
      result = {"status": "ok", "clips": _prepare_clips(item, options, temporary)}
    except Skip as skip:
      result = {"status": "skipped", "category": skip.category, "reason": str(skip), "clips": []}
    except MissingDependency:
      raise  # concerns every video, not this one: stop (and cache nothing)
    except Exception as error:  # an unexpected library failure on one file must not end the run
      result = {"status": "skipped", "category": "error",
                "reason": f"{item.relative}: {type(error).__name__}: {error}", "clips": []}
    result.update(source=item.relative, speaker=item.speaker, emotion=item.emotion,
                  level=item.level, seconds=round(time.time() - started, 2),
                  directory=final.name)
    if result["status"] == "ok" and not result["clips"]:
      result.update(status="skipped", category="too_short",
                    reason=f"{item.relative}: no run of >= {options.min_clip_frames} frames with "
                           "a usable face")
    (temporary / "result.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)  # gone after the rename; else half-done work
  return result


def remove_stale_temporaries(work_dir: Path) -> list[Path]:
  """Removes the half-done folders of runs that were killed (their process is gone), so a
  restarted run does not keep them on disk; returns what it removed. A live process's (another
  run on the same folder, or a worker) is left alone."""
  removed = []
  for folder in work_dir.glob(f"{TEMPORARY_PREFIX}*.tmp-*"):
    pid = folder.name.rsplit(".tmp-", 1)[1]
    if pid.isdigit() and not _process_alive(int(pid)):
      shutil.rmtree(folder, ignore_errors=True)
      removed.append(folder)
  return removed


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, someone else's
  return True


def _prepare_clips(item: VideoItem, options: PrepareOptions, out: Path) -> list[dict]:
  name = item.relative
  try:
    info = media.probe(item.path)
  except media.MediaError as error:
    raise Skip("unreadable", str(error)) from None
  if min(info.width, info.height) < options.min_source_side:
    raise Skip("too_small", f"{name}: {info.width}x{info.height} is below the "
                            f"{options.min_source_side} px minimum")
  try:
    audio, audio_start = media.read_audio(item.audio_path or item.path)
  except media.MediaError as error:
    raise Skip("no_audio", str(error)) from None
  peak = int(np.abs(audio.astype(np.int32)).max())
  if peak < SILENT_PEAK:
    raise Skip("silent_audio", f"{item.audio_path or name}: the audio track is silent (loudest "
                               f"sample {peak} of 32767); the pipeline learns lip sync from speech")
  # Separate audio files (MEAD) start with the video; an embedded track may start later or earlier.
  audio_offset = 0.0 if item.audio_path else audio_start - info.start_time

  landmarks = []
  faces_max = 0
  try:
    with faces.FaceLandmarker() as landmarker:
      for frame in media.iter_video_frames(item.path):
        landmarks.append(landmarker(frame))
      faces_max = landmarker.faces_seen_max
  except media.MediaError as error:
    raise Skip("corrupt", str(error)) from None
  if not any(points is not None for points in landmarks):
    raise Skip("no_face", f"{name}: no face found in {len(landmarks)} frames")

  clips = []
  for start, stop in _clip_ranges(_face_runs(landmarks, options.max_gap_frames), options):
    track = _interpolate(landmarks[start:stop])
    box = faces.clip_crop_box(track)
    side = box[2] - box[0]
    if side < options.min_face_fraction * options.resolution:
      continue  # counted below when nothing usable remains
    clips.append({"start": start, "stop": stop, "box": box, "track": track})
  if not clips:
    raise Skip("face_too_small",
               f"{name}: face crop under {options.min_face_fraction * options.resolution:.0f} "
               f"px; the source is too small for --resolution {options.resolution}")

  # Second pass: crop and encode each clip while streaming the frames again.
  encoders = {}
  try:
    for index, frame in enumerate(media.iter_video_frames(item.path)):
      for number, clip in enumerate(clips):
        if clip["start"] <= index < clip["stop"]:
          encoder = encoders.setdefault(number, media.H264Encoder(crf=options.crf))
          encoder.add(faces.crop_frame(frame, clip["box"], options.resolution))
  except media.MediaError as error:
    raise Skip("corrupt", str(error)) from None
  records = []
  for number, clip in enumerate(clips):
    frames = clip["stop"] - clip["start"]
    encoder = encoders.get(number)
    if encoder is None or encoder.frames != frames:
      raise Skip("corrupt", f"{name}: the second decoding pass returned a different number of "
                            "frames")
    stem = f"clip_{number:03d}"
    (out / f"{stem}.mp4").write_bytes(encoder.finish())
    first_sample = int(round((clip["start"] / 25 - audio_offset) * SAMPLE_RATE))
    np.savez(out / f"{stem}.npz",
             audio=_audio_slice(audio, first_sample, frames * SAMPLES_PER_FRAME),
             landmarks=faces.to_crop_coordinates(clip["track"], clip["box"]).astype(np.float16),
             crop_box=clip["box"].astype(np.float32))
    records.append({"file": stem, "start_frame": clip["start"], "num_frames": frames})
  if faces_max > 1:
    records[0]["note"] = f"{name}: {faces_max} faces seen; the largest was tracked"
  return records


def _face_runs(landmarks: list, max_gap: int) -> list[tuple[int, int]]:
  """[start, stop) runs of frames with a face, bridging gaps of at most `max_gap` frames."""
  runs, start, last = [], None, None
  for index, points in enumerate(landmarks):
    if points is None:
      continue
    if start is None:
      start = index
    elif index - last - 1 > max_gap:
      runs.append((start, last + 1))
      start = index
    last = index
  if start is not None:
    runs.append((start, last + 1))
  return runs


def _clip_ranges(runs, options: PrepareOptions):
  """Cuts runs into near-equal clips of at most clip_frames, dropping those under
  min_clip_frames."""
  for start, stop in runs:
    length = stop - start
    if length < options.min_clip_frames:
      continue
    pieces = -(-length // options.clip_frames)
    bounds = np.linspace(start, stop, pieces + 1).round().astype(int)
    for begin, end in zip(bounds[:-1], bounds[1:]):
      if end - begin >= options.min_clip_frames:
        yield int(begin), int(end)


def _interpolate(track: list) -> np.ndarray:
  """(T, 478, 2) landmarks with missing frames (None) filled linearly from their neighbours."""
  known = [i for i, points in enumerate(track) if points is not None]
  stacked = np.stack([track[i] for i in known]).astype(np.float64)
  out = np.empty((len(track),) + stacked.shape[1:])
  flat = stacked.reshape(len(known), -1)
  for column in range(flat.shape[1]):
    out.reshape(len(track), -1)[:, column] = np.interp(np.arange(len(track)), known,
                                                       flat[:, column])
  return out


def _audio_slice(audio: np.ndarray, first: int, length: int) -> np.ndarray:
  """audio[first : first + length], zero-padded where it runs past either end."""
  out = np.zeros(length, np.int16)
  lo, hi = max(first, 0), min(first + length, len(audio))
  if hi > lo:
    out[lo - first:hi - first] = audio[lo:hi]
  return out


def process_all(items: list[VideoItem], options: PrepareOptions, work_dir: Path,
                progress: bool = True) -> list[dict]:
  """Runs `process_video` over all items (in `options.workers` processes), with a progress bar.
  Videos finished by an earlier (killed) run are read from `work_dir`; its half-done folders are
  removed first."""
  work_dir.mkdir(parents=True, exist_ok=True)
  remove_stale_temporaries(work_dir)
  bar = tqdm(total=len(items), desc="prepare videos", unit="video", disable=not progress)
  results = []
  if options.workers <= 1:
    for item in items:
      results.append(process_video(item, options, work_dir))
      bar.update()
  else:
    # spawn: MediaPipe's graph threads do not survive fork.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=context) as pool:
      futures = [pool.submit(process_video, item, options, work_dir) for item in items]
      for future in futures:
        results.append(future.result())
        bar.update()
  bar.close()
  return results


def summarize(results: list[dict], assignment: dict[str, str], dropped_short: int) -> dict:
  """The report's counts from per-video results and the clip split."""
  skipped = [r for r in results if r["status"] != "ok"]
  by_reason: dict[str, int] = {}
  for result in skipped:
    by_reason[result["category"]] = by_reason.get(result["category"], 0) + 1
  clips: dict[str, int] = {}
  for split in assignment.values():
    clips[split] = clips.get(split, 0) + 1
  return {
    "videos": len(results),
    "videos_ok": len(results) - len(skipped),
    "videos_skipped": len(skipped),
    "skipped_by_reason": by_reason,
    "skipped_files": [{"source": r["source"], "category": r["category"], "reason": r["reason"]}
                      for r in skipped],
    "notes": [clip["note"] for r in results for clip in r["clips"] if "note" in clip],
    "clips": clips,
    "clips_dropped_short_from_train": dropped_short,
    "frames": sum(clip["num_frames"] for r in results for clip in r["clips"]),
    "emotion_labels": list(EMOTION_LABELS),
  }
