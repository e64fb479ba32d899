"""TFDS builders for real footage: `hdtf`, `mead` and `talking_heads` (a plain folder of videos).

They differ only in how the source folder is read (data_pipeline.prepare.list_videos); the per-video
work (faces, crops, clips) is data_pipeline.prepare.process_video, cached under
<data_dir>/_prepare_work/. Configs are named by resolution (`res512`, `res1024`; any `res<N>` can be
passed as `config=RealConfig(name="res256", resolution=256)`). `prepare_command` is `etalk
prepare`: the builder for a layout, run, and its report.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import faces, prepare
from data_pipeline.builders import common
from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.records import write_text_atomically

REPORT_NAME = "prepare_report.json"


@dataclasses.dataclass(kw_only=True)
class RealConfig(tfds.core.BuilderConfig):
  resolution: int = 512


_CONFIGS = [RealConfig(name="res512", resolution=512,
                       description="512² crops (120-frame training windows)"),
            RealConfig(name="res1024", resolution=1024,
                       description="1024² crops (32-frame training windows)")]


class _PreparedVideos(common.QuietBuilder, skip_registration=True):
  """Shared by the three layouts: `LAYOUT` picks the source reader."""

  VERSION = common.VERSION
  BUILDER_CONFIGS = _CONFIGS
  LAYOUT = "folder"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the folder of source videos as `src` (etalk prepare "
                                  "--src DIR).")

  def __init__(self, *, src: str | Path | None = None,
               options: prepare.PrepareOptions | None = None, progress: bool = True, **kwargs):
    self._src = Path(src) if src is not None else None
    self._options = options
    self._progress = progress
    self.report: dict | None = None  # filled when the dataset is generated
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=common.clip_features(),
                                          homepage="https://github.com/etalk-jax")

  def _split_generators(self, dl_manager):
    if self._src is None:
      raise UserError(f"{self.name}: no source folder; pass src=DIR (etalk prepare --src DIR)")
    options = self._options or prepare.PrepareOptions(resolution=self.builder_config.resolution)
    if options.resolution != self.builder_config.resolution:
      raise ValueError(f"options.resolution {options.resolution} differs from config "
                       f"{self.builder_config.name}")
    items = prepare.list_videos(self._src, self.LAYOUT)
    if not items:
      raise InputNotFound(f"{self._src}: no videos found for layout {self.LAYOUT!r} "
                          f"(suffixes {', '.join(prepare.VIDEO_SUFFIXES)}); check --src and "
                          "--layout")
    faces.require_mediapipe()  # else every video would be skipped for it
    work_dir = (Path(self._data_dir_root) / prepare.WORK_DIR_NAME
                / f"{self.name}-{self.builder_config.name}")
    results = prepare.process_all(items, options, work_dir, progress=self._progress)
    clips = [(result, clip) for result in results if result["status"] == "ok"
             for clip in result["clips"]]
    clip_key = lambda pair: f"{pair[0]['directory']}/{pair[1]['file']}"  # noqa: E731
    split_key = (lambda pair: pair[0]["speaker"]) if options.split_by_speaker else clip_key
    assignment = common.split_of((split_key(pair) for pair in clips), options.seed,
                                 options.test_fraction)
    splits = {common.TRAIN: [], common.TEST: []}
    dropped_short = 0
    for pair in clips:
      split = assignment[split_key(pair)]
      if (split == common.TRAIN and self.LAYOUT == "mead"
          and pair[1]["num_frames"] < prepare.MEAD_MIN_TRAIN_FRAMES):
        dropped_short += 1
        continue
      splits[split].append(pair)
    per_clip = {clip_key(pair): split for split, pairs in splits.items() for pair in pairs}
    self.report = prepare.summarize(results, per_clip, dropped_short)
    if not per_clip:
      raise prepare.NothingPrepared(prepare.nothing_prepared_message(self._src, self.report),
                                    self.report)
    # A split with no clip (one clip in all, --test-fraction 0) is left out: TFDS cannot write an
    # empty one.
    return {split: self._generate_examples(work_dir, pairs) for split, pairs in splits.items()
            if pairs}

  def _generate_examples(self, work_dir: Path, pairs):
    for result, clip in pairs:
      folder = work_dir / result["directory"]
      arrays = np.load(folder / f"{clip['file']}.npz")
      clip_id = f"{result['directory']}_{clip['file']}"
      yield clip_id, {
        "clip_id": clip_id,
        "source": result["source"],
        "speaker": result["speaker"],
        "emotion": result["emotion"],
        "level": np.int32(result["level"]),
        "num_frames": np.int32(clip["num_frames"]),
        "start_frame": np.int32(clip["start_frame"]),
        "video": (folder / f"{clip['file']}.mp4").read_bytes(),
        "audio": arrays["audio"],
        "landmarks": arrays["landmarks"],
        "crop_box": arrays["crop_box"],
      }


class TalkingHeads(_PreparedVideos):
  """A plain folder of talking-head videos (speaker = first sub-folder, or the file name)."""
  LAYOUT = "folder"


class Hdtf(_PreparedVideos):
  """HDTF: <Name>_<NNN>.mp4 files (speaker = the name without the number)."""
  LAYOUT = "hdtf"


class Mead(_PreparedVideos):
  """MEAD front view: <speaker>/video/front/<emotion>/level_<k>/NNN.mp4 with audio under
  <speaker>/audio/...; clips under 120 frames are kept out of train."""
  LAYOUT = "mead"


_BY_LAYOUT = {"folder": TalkingHeads, "hdtf": Hdtf, "mead": Mead}


def builder_for(layout: str, src: Path, data_dir: Path, options: prepare.PrepareOptions,
                progress: bool = True) -> _PreparedVideos:
  """The builder for a layout, configured for `options.resolution`, writing array_record under
  data_dir."""
  if layout not in _BY_LAYOUT:
    raise UserError(f"unknown layout {layout!r}; use one of {', '.join(_BY_LAYOUT)}")
  name = f"res{options.resolution}"
  config = (next((c for c in _CONFIGS if c.name == name), None)
            or RealConfig(name=name, resolution=options.resolution))
  return _BY_LAYOUT[layout](src=src, options=options, progress=progress, config=config,
                            data_dir=str(data_dir), file_format="array_record")


# ------------------------------------------------------------------------------------------ command

def prepare_command(src: str, layout: str, dst: str, resolution: int = 512, **options) -> dict:
  """`etalk prepare`: videos in `src` (layout hdtf | mead | folder) -> TFDS dataset under `dst`.

  Options (prepare.PrepareOptions fields): clip_frames, min_clip_frames, min_source_side,
  min_face_fraction, max_gap_frames, crf, test_fraction, split_by_speaker, seed, workers; plus
  progress (bool). Writes `<dst>/prepare_report.json` and returns it: counts of videos ok /
  skipped by reason, the skipped files with reasons, clips and frames per split (a split with no
  clip is not written), and `dataset_dir` (what the loader reads).

  User errors, before any work: no MediaPipe (the `faces` extra), a bad resolution, no videos.
  When every video is skipped, the report is written and `prepare.NothingPrepared` names it with
  the most common reasons. Killed and started again, it reuses every finished video
  (`<dst>/_prepare_work/`) and writes the same records.
  """
  progress = options.pop("progress", True)
  unknown = set(options) - {f.name for f in dataclasses.fields(prepare.PrepareOptions)}
  if unknown:
    raise TypeError(f"unknown prepare option(s): {', '.join(sorted(unknown))}")
  settings = prepare.PrepareOptions(resolution=resolution, **options)
  if resolution % 16 or resolution < 64:
    raise UserError("--resolution must be a multiple of 16 and >= 64 (the VAE downsamples by 8, "
                    f"the UNet by 8 more), got {resolution}")
  dst_path = Path(dst)
  started = time.time()
  builder = builder_for(layout, Path(src), dst_path, settings, progress=progress)
  if not builder.data_path.exists():  # a finished dataset is reported without detecting faces
    faces.require_mediapipe()
  try:
    with common.tfds_progress(progress):
      builder.download_and_prepare()
  except prepare.NothingPrepared as nothing:
    _write_report(nothing.report, dst_path, src, layout, resolution, None, started)
    raise prepare.NothingPrepared(
        prepare.nothing_prepared_message(src, nothing.report, dst_path / REPORT_NAME),
        nothing.report) from None
  report = builder.report if builder.report is not None else _report_of_existing(builder)
  _write_report(report, dst_path, src, layout, resolution, str(builder.data_path), started)
  return report


def _write_report(report: dict, dst: Path, src, layout: str, resolution: int,
                  dataset_dir: str | None, started: float) -> None:
  report.update(src=str(src), layout=layout, resolution=resolution, dataset_dir=dataset_dir,
                seconds=round(time.time() - started, 1))
  dst.mkdir(parents=True, exist_ok=True)
  write_text_atomically(dst / REPORT_NAME, json.dumps(report, indent=1))


def _report_of_existing(builder) -> dict:
  """The dataset was already complete: report what it holds (no video was processed)."""
  return {"already_prepared": True,
          "clips": {split: info.num_examples for split, info in builder.info.splits.items()}}
