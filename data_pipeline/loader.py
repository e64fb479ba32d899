"""Grain loading of prepared talking-head records into training windows.

Pipeline (docs/ARCHITECTURE.md §5): TFDS ArrayRecord data source -> `grain.MapDataset` -> this
process's slice (`jax.process_index()` of `jax.process_count()`) -> seeded shuffle, reshuffled every
epoch -> clips long enough for a window -> random window (decodes only its frames) -> batch ->
worker processes (`mp_prefetch`).

A window of N frames starting at clip frame s holds:
  frames      (N, R, R, 3) uint8      frames s .. s+N-1
  audio       ((N + 2c) * 640,) float32 in [-1, 1]: frames s-c .. s+N+c-1 (c = audio_context_frames,
              zero outside the clip), so audio[640 (c + i) : 640 (c + i + 1)] is frame s+i's audio,
              and the ±2-frame audio window of every frame in the window is inside
  utterance_stats (2,) float32        mean and std of the whole clip's audio: normalise the window's
              speech with them (`normalize(audio, stats)`), as inference normalises the utterance
  reference   (R, R, 3) uint8         another frame of the same clip (a keyframe, outside the window
              when the clip allows; or its first frame, `reference="first"`), with face_mask /
              lip_mask (R, R) uint8 from its landmarks, and reference_landmarks (478, 2) float32
              in [0, 1] (PD-FGC aligns the reference on them for e_ref); with probability
              `cross_clip_reference` a frame of another clip of the same identity instead (see
              `ClipIndex`), its masks and landmarks with it
  frame_face_mask, frame_lip_mask (N, R, R) uint8, with `frame_masks`: each frame's own masks
  landmarks   (N, 478, 2) float32     crop coordinates in [0, 1]
  emotion, level, speaker, clip_id, start, clip_start_frame (the clip's first frame in its source
  video), reference_index, reference_clip_id and reference_emotion (the clip the reference frame
  comes from, and its emotion label), cross_clip (bool: that clip is not the window's), and every
  per-frame ground-truth track
  the records carry (synthetic: mouth_open, eye_open, pose), cut to the window.

Deterministic for a seed (the window of record k in epoch e depends only on (seed, e, k)); the
iterator's state saves and restores through Orbax with `grain.checkpoint.CheckpointSave/Restore`
(see `save_iterator` / `restore_iterator`), and a restored iterator yields exactly the batches the
uninterrupted one would have.

`make_precomputed_dataset` reads a folder of `etalk precompute` the same way, its windows holding
latents and encoder outputs instead of frames and audio (see `PrecomputedWindowSampler`).

Grain's worker processes re-import this module: scripts that use `num_workers > 0` need an
`if __name__ == "__main__":` guard, and `make_dataset` marks absl flags as parsed (Grain reads its
own flags in the workers).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from data_pipeline import EMOTION_LABELS, INT16_SCALE, SAMPLES_PER_FRAME, faces, media
from data_pipeline.media import KEYFRAME_INTERVAL, speech_stats
from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.records import write_text_atomically

# Per-frame tracks a record may carry besides frames/audio/landmarks; each is cut to the window.
GROUND_TRUTH_TRACKS = ("mouth_open", "eye_open", "pose")
# Window lengths of the paper's training stages.
WINDOW_FRAMES = {"ethd_512": 120, "ethd_1024": 32, "dicte": 220}


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  window: int = WINDOW_FRAMES["ethd_512"]
  batch_size: int = 1
  seed: int = 0
  num_epochs: int | None = None  # None: repeat forever (reshuffled every epoch)
  audio_context_frames: int = 2  # audio frames on each side, for the ±2-frame audio window
  with_frames: bool = True  # False: audio, landmarks and labels only (Di-CTE's expression targets
  #                           come from precomputed encoder outputs, not pixels)
  with_reference: bool = True
  # Which frame is the reference: "keyframe" (a random keyframe of the clip, outside the window when
  # the clip allows) or "first" (the clip's first frame, like a portrait before the speech starts:
  # a closed mouth, which the window's lips are then measured against).
  reference: str = "keyframe"
  with_masks: bool = True
  # Probability that the reference frame comes from another clip of the same identity, in another
  # emotion where the dataset has one (docs/ARCHITECTURE.md §3.11): ETHD then sees E_ref != E_dri
  # and EDI learns to swap the reference's emotion for the driving one. 0: always the window's
  # clip.
  cross_clip_reference: float = 0.0
  # The emotion label (data_pipeline.EMOTION_LABELS) cross-clip references come from when the
  # identity has a clip in it, e.g. "neutral": the case of inference from a neutral portrait.
  # "": any other emotion.
  cross_clip_emotion: str = ""
  frame_masks: bool = False  # also every window frame's face / lip masks (N, R, R) uint8
  with_pdfgc: bool = False  # also the PD-FGC encoder inputs (N, 224, 224, 3) uint8, one per frame
  # Parallelism. Decoding (FFmpeg) releases the GIL, so threads in this process decode windows in
  # parallel without copying ~94 MB per 512² window between processes; worker processes
  # (`mp_prefetch`) pay that copy but also parallelise the Python-side work (masks, PD-FGC crops).
  # Measured on the 2-core dev machine: see benchmarks/loader.py.
  read_threads: int = 2  # threads evaluating windows ahead of the consumer, per process (buffer: 2
  #                         per thread; Grain's default of 16 threads x 500 elements would hold
  #                         ~47 GB of windows)
  num_workers: int = 2  # Grain worker processes (mp_prefetch); 0 = none
  worker_buffer_size: int = 2
  decoder_threads: int = 1  # FFmpeg threads per decode (keep 1 when workers fill the cores)
  shard_index: int | None = None  # None: jax.process_index()
  shard_count: int | None = None  # None: jax.process_count()

  def __post_init__(self):
    if self.reference not in ("keyframe", "first"):
      raise UserError(f"reference must be 'keyframe' or 'first', got {self.reference!r}")
    if not 0.0 <= self.cross_clip_reference <= 1.0:
      raise UserError(f"cross_clip_reference is a probability in [0, 1], got "
                      f"{self.cross_clip_reference!r}")
    if self.cross_clip_emotion and self.cross_clip_emotion not in EMOTION_LABELS:
      raise UserError(f"cross_clip_emotion {self.cross_clip_emotion!r} is not an emotion label; "
                      f"give one of {', '.join(EMOTION_LABELS)} or '' (any other emotion)")


def _mark_absl_flags_parsed() -> None:
  # Grain's workers read absl flags; in a program that never ran absl.app they would fail as
  # unparsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def data_source(dataset_dir: str | Path, split: str):
  """The random-access TFDS ArrayRecord source of a prepared dataset directory (the one holding
  dataset_info.json, e.g. <data_dir>/talking_heads/res512/1.0.0). Works for any builder config,
  registered or not, and never imports TensorFlow."""
  import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy: only reading records needs TFDS)
  dataset_dir = Path(dataset_dir)
  if not (dataset_dir / "dataset_info.json").is_file():
    raise InputNotFound(f"{dataset_dir}: not a prepared dataset (no dataset_info.json); run "
                        f"`etalk prepare` or pass the folder "
                        f"<data_dir>/<name>/<config>/<version>")
  builder = tfds.builder_from_directory(str(dataset_dir))
  if split not in builder.info.splits:
    raise UserError(f"{dataset_dir}: no split {split!r}; it has {', '.join(builder.info.splits)}")
  return builder.as_data_source(split=split)


class ClipIndex:
  """Which records of a source share an identity: every record's clip_id, speaker and emotion
  label, for drawing cross-clip references (`LoaderConfig.cross_clip_reference`). Picklable, so
  Grain's worker processes get it with the sampler.

  Built by reading every record once (`of_source`); that pass is cached as JSON beside the records
  when their folder is writable, so a later run over the same source starts at once.
  """

  def __init__(self, clip_ids, speakers, emotions):
    self.clip_ids = [str(c) for c in clip_ids]
    self.speakers = np.asarray([str(s) for s in speakers])
    self.emotions = np.asarray(emotions, np.int32)
    self.position = {clip_id: i for i, clip_id in enumerate(self.clip_ids)}
    if len(self.position) != len(self.clip_ids):
      raise ValueError("ClipIndex: clip_ids repeat; each record needs its own clip_id")

  @classmethod
  def of_source(cls, source, cache: str | Path | None = None) -> ClipIndex:
    if cache is not None and Path(cache).is_file():
      stored = json.loads(Path(cache).read_text())
      if len(stored["clip_ids"]) == len(source):
        return cls(stored["clip_ids"], stored["speakers"], stored["emotions"])
    rows = [(_text(r["clip_id"]), _text(r["speaker"]), int(r["emotion"]))
            for r in (source[i] for i in range(len(source)))]
    index = cls(*zip(*rows)) if rows else cls([], [], [])
    if cache is not None:
      # Written to a temporary name, then renamed: processes that start together (hosts, workers)
      # never read a half-written index.
      try:
        write_text_atomically(cache, json.dumps({"clip_ids": index.clip_ids,
                                                 "speakers": index.speakers.tolist(),
                                                 "emotions": index.emotions.tolist()}))
      except OSError:  # a read-only dataset: the index is rebuilt on every run
        pass
    return index

  def other_clip(self, rng: np.random.Generator, clip_id: str, emotion: int | None = None
                 ) -> int | None:
    """A record index of another clip of `clip_id`'s identity: one in `emotion` (a label index)
    when given and the identity has one, else one in another emotion when it has one, else one
    in the same emotion (another take or level); None when the identity has this clip only (the
    caller keeps the window's own clip)."""
    if clip_id not in self.position:
      raise KeyError(f"clip {clip_id!r} is not in the ClipIndex of this source")
    i = self.position[clip_id]
    same_identity = self.speakers == self.speakers[i]
    same_identity[i] = False
    candidates = [] if emotion is None else np.flatnonzero(same_identity &
                                                           (self.emotions == emotion))
    if not len(candidates):
      candidates = np.flatnonzero(same_identity & (self.emotions != self.emotions[i]))
    if not len(candidates):
      candidates = np.flatnonzero(same_identity)
    if not len(candidates):
      return None
    return int(candidates[rng.integers(len(candidates))])


def _draw_reference(rng: np.random.Generator, record: dict[str, Any], reference_index: int,
                    config: LoaderConfig, source, clips: ClipIndex | None
                    ) -> tuple[dict[str, Any], int]:
  """(record, frame index) the window's reference comes from: with probability
  config.cross_clip_reference a frame of another clip of the same identity (`ClipIndex.other_clip`;
  a random keyframe, or frame 0 for reference "first"), else the window's own `reference_index`.
  An identity with a single clip keeps its own clip. Draws from `rng` only when the probability is
  above 0, and after the window's own draws, so the windows are the same at every probability."""
  if clips is None or config.cross_clip_reference <= 0.0:
    return record, reference_index
  if rng.random() >= config.cross_clip_reference:
    return record, reference_index
  emotion = (EMOTION_LABELS.index(config.cross_clip_emotion) if config.cross_clip_emotion
             else None)
  other = clips.other_clip(rng, _text(record["clip_id"]), emotion)
  if other is None:
    return record, reference_index
  other_record = source[other]
  return other_record, _reference_index(rng, int(other_record["num_frames"]), 0, 0,
                                        config.reference)


def _frame_masks(landmarks: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Every frame's (face mask, lip mask) `(N, R, R)` uint8 from its own landmarks `(N, 478, 2)` in
  crop coordinates: the regions where that frame's face and mouth are, not the reference's."""
  masks = [faces.face_and_lip_masks(points * resolution, resolution) for points in landmarks]
  return np.stack([m[0] for m in masks]), np.stack([m[1] for m in masks])


class WindowSampler:
  """Record -> one training window (a grain random map; picklable for worker processes).
  `source` and `clips` (the whole data source and its `ClipIndex`) are needed only for
  cross-clip references."""

  def __init__(self, config: LoaderConfig, source=None, clips: ClipIndex | None = None):
    if config.cross_clip_reference > 0 and (source is None or clips is None):
      raise UserError("cross_clip_reference > 0 needs the data source and its ClipIndex")
    self.config = config
    self.source = source
    self.clips = clips

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    config = self.config
    num_frames = int(record["num_frames"])
    window = config.window
    start = int(rng.integers(0, num_frames - window + 1))
    reference_index = _reference_index(rng, num_frames, start, window, config.reference)
    reference_record, reference_index = _draw_reference(rng, record, reference_index, config,
                                                        self.source, self.clips)
    landmarks = np.asarray(record["landmarks"], np.float32)
    out = {
      **_window_labels(record, start, reference_index, reference_record),
      "landmarks": landmarks[start:start + window],
      "audio": _audio_window(record["audio"], start, window, config.audio_context_frames),
      "utterance_stats": utterance_stats(record["audio"]),
    }
    for track in GROUND_TRUTH_TRACKS:
      if track in record:
        out[track] = np.asarray(record[track], np.float32)[start:start + window]
    video = record["video"]
    if config.with_frames:
      out["frames"] = media.decode_frames(video, start, window, threads=config.decoder_threads)
    resolution = None
    if config.with_reference or config.with_masks:
      reference = media.decode_frames(reference_record["video"], reference_index, 1,
                                      threads=config.decoder_threads)[0]
      resolution = reference.shape[0]
      # The reference frame's own landmarks: another clip's when the reference is cross-clip.
      reference_landmarks = np.asarray(reference_record["landmarks"][reference_index], np.float32)
      if config.with_reference:
        out["reference"] = reference
        out["reference_landmarks"] = reference_landmarks
      if config.with_masks:
        out["face_mask"], out["lip_mask"] = faces.face_and_lip_masks(
            reference_landmarks * resolution, resolution)
    if config.frame_masks:
      if resolution is None:
        resolution = (out["frames"] if "frames" in out else
                      media.decode_frames(video, start, 1, threads=config.decoder_threads)).shape[1]
      out["frame_face_mask"], out["frame_lip_mask"] = _frame_masks(out["landmarks"], resolution)
    if config.with_pdfgc:
      frames = out.get("frames")
      if frames is None:
        frames = media.decode_frames(video, start, window, threads=config.decoder_threads)
      # Aligned over the whole clip (one rotation and scale, smoothed shifts), so a window's crops
      # do not depend on where the window starts.
      matrices = faces.pdfgc_affines(landmarks * frames.shape[1])[start:start + window]
      out["pdfgc"] = np.stack([faces.pdfgc_warp(frame, matrix)
                               for frame, matrix in zip(frames, matrices)])
    return out


def _window_labels(record: dict[str, Any], start: int, reference_index: int,
                   reference_record: dict[str, Any]) -> dict[str, Any]:
  """What a window says about where it and its reference come from (both samplers' windows hold
  it)."""
  reference_clip = _text(reference_record["clip_id"])
  return {
    "clip_id": _text(record["clip_id"]),
    "speaker": _text(record["speaker"]),
    "emotion": np.int32(record["emotion"]),
    "level": np.int32(record["level"]),
    "start": np.int32(start),
    "clip_start_frame": np.int32(record["start_frame"]),
    "reference_index": np.int32(reference_index),
    "reference_clip_id": reference_clip,
    "reference_emotion": np.int32(reference_record["emotion"]),
    "cross_clip": np.bool_(reference_clip != _text(record["clip_id"])),
  }


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _reference_index(rng: np.random.Generator, num_frames: int, start: int, window: int,
                     kind: str = "keyframe") -> int:
  """A keyframe (decodes alone) of the clip, outside the window if there is one, else any keyframe;
  or, for `kind` "first", frame 0. The draw happens either way, so both kinds see the same
  windows for a seed."""
  keyframes = np.arange(0, num_frames, KEYFRAME_INTERVAL)
  outside = keyframes[(keyframes < start) | (keyframes >= start + window)]
  candidates = outside if len(outside) else keyframes
  drawn = int(candidates[rng.integers(len(candidates))])
  return 0 if kind == "first" else drawn


def _audio_window(audio: np.ndarray, start: int, window: int, context: int) -> np.ndarray:
  """Samples of frames [start - context, start + window + context), zero outside the clip, as
  float32."""
  begin = (start - context) * SAMPLES_PER_FRAME
  length = (window + 2 * context) * SAMPLES_PER_FRAME
  out = np.zeros(length, np.float32)
  lo, hi = max(begin, 0), min(begin + length, len(audio))
  if hi > lo:
    out[lo - begin:hi - begin] = np.asarray(audio[lo:hi], np.float32) / INT16_SCALE
  return out


def utterance_stats(audio: np.ndarray) -> np.ndarray:
  """(mean, std) of a whole clip's int16 audio as float32 in [-1, 1]: a window's speech is
  normalised with them (`etalk_jax.audio.features.normalize`) as the whole utterance is at
  inference, not over its own span (a pause alone would be scaled up to speech level)."""
  return speech_stats(np.asarray(audio, np.float32) / INT16_SCALE)


class _LongEnough:
  """Keeps records with at least `frames` frames (a picklable grain filter)."""

  def __init__(self, frames: int):
    self.frames = frames

  def __call__(self, record) -> bool:
    return int(record["num_frames"]) >= self.frames


def make_dataset(dataset_dir: str | Path, split: str = "train",
                 config: LoaderConfig = LoaderConfig()):
  """The Grain pipeline as an IterDataset of batches (dicts of arrays with a leading batch axis).

  Iterate it with `iter(...)`; the iterator has `get_state()` / `set_state()` and works with
  `save_iterator` / `restore_iterator`.
  """
  source = data_source(dataset_dir, split)
  clips = _clip_index(source, Path(dataset_dir), split, config)
  return _window_batches(source, WindowSampler(config, source, clips), config,
                         f"{dataset_dir} split {split!r}")


def _clip_index(source, folder: Path, split: str, config: LoaderConfig) -> ClipIndex | None:
  """The source's `ClipIndex` when the config draws cross-clip references (cached in `folder`)."""
  if config.cross_clip_reference <= 0.0:
    return None
  return ClipIndex.of_source(source, folder / f"clip_index.{split}.json")


def _window_batches(source, sampler, config: LoaderConfig, what: str):
  """source -> this process's slice -> shuffled, repeated records long enough for a window ->
  `sampler` (a grain random map: record -> window) -> batches, in worker processes if asked."""
  import grain  # noqa: PLC0415 (Grain imports JAX: only building a pipeline needs it)

  _mark_absl_flags_parsed()
  if config.shard_index is None or config.shard_count is None:
    import jax  # noqa: PLC0415 (heavy, kept out of the loader's import like Grain)
    shard_index, shard_count = jax.process_index(), jax.process_count()
  else:
    shard_index, shard_count = config.shard_index, config.shard_count
  if len(source) < shard_count:
    raise UserError(f"{what} has {len(source)} clips, fewer than the {shard_count} "
                    f"processes reading it; prepare more data or read with fewer processes")
  dataset = grain.MapDataset.source(source)
  dataset = dataset[shard_index::shard_count]  # disjoint records per process
  dataset = dataset.shuffle(seed=config.seed).repeat(config.num_epochs)
  dataset = dataset.filter(_LongEnough(config.window))
  dataset = dataset.random_map(sampler, seed=config.seed)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=max(config.read_threads, 1),
      prefetch_buffer_size=2 * max(config.read_threads, 1)))
  dataset = dataset.batch(config.batch_size, drop_remainder=True, batch_fn=_stack)
  if config.num_workers > 0:
    dataset = dataset.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
      num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
  return dataset


# ----------------------------------------------------------- precomputed records (etalk precompute)

PRECOMPUTE_FILE = "precompute.json"  # beside the records: their versioning and where they lie


def read_precompute_info(folder: str | Path) -> dict[str, Any]:
  """The `precompute.json` of a folder written by `etalk precompute` (clear error if it is not
  one)."""
  info_file = Path(folder) / PRECOMPUTE_FILE
  if not info_file.is_file():
    raise InputNotFound(f"{folder}: not a precomputed dataset ({PRECOMPUTE_FILE} is missing); "
                        f"write one with `etalk precompute`")
  return json.loads(info_file.read_text())


class PrecomputedWindowSampler:
  """Precomputed record -> one training window (a grain random map; picklable).

  Draws the window start and the reference keyframe exactly as `WindowSampler` does, so the same
  seed picks the same frames from a clip's precomputed and pixel records. The window holds, as
  float32: latents (N, h, w, c), reference_latents (h, w, c), lip_vision (N, lip_dim) = l_v,
  expression (N, expression_dim) = e_v, reference_expression, and audio_windows
  (N, audio_window, layers, hidden) = A_w (frame i's window: the states of frames
  i - audio_window//2 .. i + audio_window//2 of the clip, clamped at its ends, as
  `etalk_jax.audio.features.frame_windows` over `pad_edges` gives them); the reference frame's
  pixels (R, R, 3) uint8 (Di-CTE reads them) and its face_mask / lip_mask (R, R) uint8 (all of
  another clip's frame with `cross_clip_reference`, drawn as `WindowSampler` draws it);
  frame_face_mask / frame_lip_mask (N, R, R) with `frame_masks`; and the labels of
  `_window_labels`.
  """

  def __init__(self, config: LoaderConfig, audio_window: int, source=None,
               clips: ClipIndex | None = None):
    if config.cross_clip_reference > 0 and (source is None or clips is None):
      raise UserError("cross_clip_reference > 0 needs the data source and its ClipIndex")
    self.config = config
    self.audio_window = audio_window
    self.source = source
    self.clips = clips

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    window = self.config.window
    num_frames = int(record["num_frames"])
    start = int(rng.integers(0, num_frames - window + 1))
    reference_index = _reference_index(rng, num_frames, start, window, self.config.reference)
    reference_record, reference_index = _draw_reference(rng, record, reference_index, self.config,
                                                        self.source, self.clips)
    frames = slice(start, start + window)
    latents = np.asarray(record["latents"])
    expression = np.asarray(record["expression"])
    half = self.audio_window // 2
    # A gather instead of etalk_jax's views: the loader's workers must not import jax.
    audio_frames = np.clip(np.arange(start, start + window)[:, None] + np.arange(-half, half + 1),
                           0, num_frames - 1)
    resolution = int(record["resolution"])
    reference_landmarks = (np.asarray(reference_record["landmarks"][reference_index], np.float32)
                           * resolution)
    face_mask, lip_mask = faces.face_and_lip_masks(reference_landmarks, resolution)
    out = {
      **_window_labels(record, start, reference_index, reference_record),
      "latents": latents[frames].astype(np.float32),
      "reference_latents": np.asarray(reference_record["latents"][reference_index], np.float32),
      "lip_vision": np.asarray(record["lip"])[frames].astype(np.float32),
      "expression": expression[frames].astype(np.float32),
      "reference_expression": np.asarray(reference_record["expression"][reference_index],
                                         np.float32),
      "audio_windows": np.asarray(record["audio_states"])[audio_frames].astype(np.float32),
      "reference": media.decode_frames(reference_record["video"], reference_index, 1,
                                       threads=self.config.decoder_threads)[0],
      "face_mask": face_mask,
      "lip_mask": lip_mask,
    }
    if self.config.frame_masks:
      out["frame_face_mask"], out["frame_lip_mask"] = _frame_masks(
          np.asarray(record["landmarks"][frames], np.float32), resolution)
    return out


def make_precomputed_dataset(folder: str | Path, split: str = "train",
                             config: LoaderConfig = LoaderConfig()):
  """`make_dataset` over a folder written by `etalk precompute`: batches of
  `PrecomputedWindowSampler` windows (latents and encoder outputs, no video decoded but the
  reference keyframe). The LoaderConfig's with_* fields do not apply."""
  info = read_precompute_info(folder)
  if split != info["split"]:
    raise UserError(f"{folder} holds the precomputed split {info['split']!r}, not {split!r}; run "
                    f"`etalk precompute --split {split}` into another folder")
  source = data_source(Path(folder) / info["dataset"], split)
  sampler = PrecomputedWindowSampler(config, int(info["encoders"]["audio_features"]["window"]),
                                     source, _clip_index(source, Path(folder), split, config))
  return _window_batches(source, sampler, config, f"{folder} split {split!r}")


def _stack(windows: list[dict[str, Any]]) -> dict[str, Any]:
  """Batches windows: arrays stack, strings become numpy unicode arrays."""
  return {key: np.stack([np.asarray(w[key]) for w in windows]) for key in windows[0]}


def save_iterator(directory: str | Path, step: int, iterator) -> None:
  """Saves the iterator's state as an Orbax checkpoint item `data` at `step` (the training loop
  saves model and optimizer beside it under other item names with the same grain handler
  registration)."""
  import grain  # noqa: PLC0415 (Grain imports JAX: only checkpointing an iterator needs it)
  import orbax.checkpoint as ocp  # noqa: PLC0415 (Orbax imports JAX, like Grain)
  with ocp.CheckpointManager(
      Path(directory).absolute(), item_names=("data",),
      item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as manager:
    manager.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()


def restore_iterator(directory: str | Path, iterator, step: int | None = None):
  """Restores the iterator's state from `save_iterator` (latest step if `step` is None), in
  place."""
  import grain  # noqa: PLC0415 (Grain imports JAX: only checkpointing an iterator needs it)
  import orbax.checkpoint as ocp  # noqa: PLC0415 (Orbax imports JAX, like Grain)
  with ocp.CheckpointManager(
      Path(directory).absolute(), item_names=("data",),
      item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise InputNotFound(f"{directory}: no iterator checkpoint to restore")
    manager.restore(step,
                    args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
  return iterator

