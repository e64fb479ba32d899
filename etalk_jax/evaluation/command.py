"""`etalk eval`: the paper's metrics of generated videos against their ground truth.

  etalk eval --generated DIR --reference DIR --protocol hdtf|mead --models DIR [--out FILE]
  etalk eval --checkpoint DIR --data DIR [--split test] --protocol hdtf|mead --models DIR
             [--workdir DIR] [--out FILE]

The first measures two folders of videos paired by file name. The second first generates the
split's clips with a pipeline checkpoint (each clip's first frame as the portrait, its speech and
its emotion label, as `evaluation.protocol` cuts and pads them) into WORKDIR/generated, writes
the ground truth cut the same way into WORKDIR/reference, then measures those folders. Videos
already generated are kept (a stopped run continues where it was).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipeline import EMOTIONS, SAMPLE_RATE, SAMPLES_PER_FRAME
from data_pipeline.loader import data_source
from etalk_jax.demo.report import clip_from_record
from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.evaluation.protocol import Protocol, pair_videos, protocol_of
from etalk_jax.evaluation.scores import (
  Evaluator,
  Video,
  parse_metrics,
  read_frames,
  read_speech,
  track_landmarks,
)
from etalk_jax.pipeline.core import EmotiveTalkPipeline, Result
from etalk_jax.records import write_text_atomically

REPORT_FORMAT = "etalk_eval_report"
REPORT_VERSION = 1


def evaluate_folders(generated: str | Path, reference: str | Path, protocol: str | Protocol,
                     models: str | Path, *, metrics: str = "fid,fvd,sync,efid",
                     batch_size: int = 16, fvd_convention: str = "stylegan_v",
                     out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
  """Measures every (generated, ground truth) pair of two folders; returns the report (and
  writes it as JSON to `out`, atomically, when given)."""
  # 1. Check the inputs: the protocol, the metrics, the pairs and the networks' folders.
  protocol = protocol if isinstance(protocol, Protocol) else protocol_of(protocol)
  chosen = parse_metrics(metrics)
  pairs = pair_videos(generated, reference)
  began = time.perf_counter()
  # 2. Load the networks (each compiled once, at its first batch).
  evaluator = Evaluator(models, chosen, protocol, batch_size=batch_size,
                        fvd_convention=fvd_convention)
  # 3. Each pair: decode, find the faces, extract features.
  for name, generated_path, reference_path in tqdm(pairs, desc="etalk eval", unit="video",
                                                   disable=not progress, dynamic_ncols=True):
    videos = [Video(read_frames(path, protocol.frames))
              for path in (generated_path, reference_path)]
    if evaluator.needs_landmarks:
      for video in videos:
        video.landmarks_px = track_landmarks(video.frames)
    speech = read_speech(reference_path, protocol.seconds) if "sync" in chosen else None
    evaluator.add(name, *videos, speech)
  # 4. The metrics over all pairs.
  report = {"format": REPORT_FORMAT, "version": REPORT_VERSION,
            "protocol": protocol.describe(), "generated": str(Path(generated).absolute()),
            "reference": str(Path(reference).absolute()), "models": str(Path(models).absolute()),
            **evaluator.result(), "seconds": round(time.perf_counter() - began, 2)}
  if out is not None:
    write_text_atomically(out, json.dumps(report, indent=2) + "\n")
  return report


def report_table(report: dict[str, Any]) -> str:
  """The report's metrics as a small text table (generated | ground truth)."""
  protocol = report["protocol"]
  lines = [f"{report['videos']} video pairs, protocol {protocol['name']} ({protocol['seconds']} s"
           f" = {protocol['frames']} frames per video; FVD on the first {protocol['fvd_frames']})",
           f"{'metric':<10}{'generated':>22}{'ground truth':>22}"]
  metrics = report["metrics"]
  for key, label in (("fid", "FID"), ("fvd", f"FVD{protocol['fvd_frames']}"), ("efid", "E-FID")):
    if key in metrics:
      lines.append(f"{label:<10}{metrics[key]['value']:>22.3f}{'(reference)':>22}")
  if "sync" in metrics:
    for key, label in (("sync_c", "Sync-C"), ("sync_d", "Sync-D")):
      cells = []
      for side in ("generated", "reference"):
        stats = metrics["sync"][f"{side}/{key}"]
        cells.append("-" if stats is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}")
      lines.append(f"{label:<10}{cells[0]:>22}{cells[1]:>22}")
  return "\n".join(lines)


def _driving_speech(speech: np.ndarray, clip_frames: int, protocol: Protocol) -> np.ndarray:
  """The clip's speech as the protocol drives generation: its first `driving_frames` frames,
  zero-padded past the clip's end (§7.1)."""
  samples = protocol.driving_frames(clip_frames) * SAMPLES_PER_FRAME
  speech = np.asarray(speech, np.float32)[:samples]
  return np.pad(speech, (0, samples - len(speech)))


def generate_split(checkpoint: str | Path, data: str | Path, split: str, protocol: Protocol,
                   workdir: str | Path, *, steps: int | None = None, seed: int = 0,
                   progress: bool = True) -> tuple[Path, Path]:
  """Generates every clip of `data`'s `split` with the pipeline at `checkpoint` into
  workdir/generated and writes its cut ground truth to workdir/reference; returns both folders.
  A clip whose generated video exists already is not generated again."""
  if not Path(data).exists():
    raise InputNotFound(f"--data {data} does not exist; give a folder written by `etalk prepare`.")
  source = data_source(str(data), split)
  if len(source) == 0:
    raise UserError(f"--data {data} has no {split!r} clips; give another --split.")
  workdir = Path(workdir)
  generated, reference = workdir / "generated", workdir / "reference"
  generated.mkdir(parents=True, exist_ok=True)
  reference.mkdir(parents=True, exist_ok=True)
  pipeline = None
  for index in tqdm(range(len(source)), desc=f"generate {split}", unit="clip",
                    disable=not progress, dynamic_ncols=True):
    clip = clip_from_record(source[index])
    name = clip.clip_id.replace("/", "_")
    if (generated / f"{name}.mp4").exists() and (reference / f"{name}.mp4").exists():
      continue
    pipeline = pipeline or EmotiveTalkPipeline.load(checkpoint)
    kept = protocol.trim(len(clip.frames))
    result = pipeline(clip.frames[0], (_driving_speech(clip.speech, len(clip.frames), protocol),
                                       SAMPLE_RATE),
                      # contempt and unlabelled clips: the portrait's own expression
                      emotion=clip.emotion if clip.emotion in EMOTIONS else None,
                      landmarks=clip.landmarks_px[0], aligned=True,
                      steps=steps, seed=seed, progress=False)
    speech = clip.speech[:kept * SAMPLES_PER_FRAME]
    Result(frames=clip.frames[:kept], audio=speech, fps=result.fps, expressions=np.zeros((0,)),
           lip_latents=np.zeros((0,)), emotion=clip.emotion).write(reference / f"{name}.mp4")
    Result(frames=result.frames[:kept], audio=speech, fps=result.fps,
           expressions=result.expressions[:kept], lip_latents=result.lip_latents[:kept],
           emotion=result.emotion).write(generated / f"{name}.mp4")
  return generated, reference


def eval_command(args) -> dict[str, Any]:
  """`etalk eval` from its parsed arguments; prints the table, returns the report."""
  protocol = protocol_of(args.protocol)
  parse_metrics(args.metrics)  # a typo is reported before any generation
  if args.checkpoint is not None or args.data is not None:
    if args.generated is not None or args.reference is not None:
      raise UserError("give either --generated and --reference, or --checkpoint and --data")
    if args.checkpoint is None or args.data is None:
      raise UserError("--checkpoint and --data go together: the pipeline generates --data's "
                      f"--split ({args.split}) clips, then they are measured")
    generated, reference = generate_split(
        args.checkpoint, args.data, args.split, protocol, args.workdir, steps=args.steps,
        seed=args.seed, progress=not args.no_progress)
  else:
    if args.generated is None or args.reference is None:
      raise UserError("give --generated DIR and --reference DIR (videos paired by file name), "
                      "or --checkpoint DIR and --data DIR to generate them first")
    generated, reference = args.generated, args.reference
  report = evaluate_folders(generated, reference, protocol, args.models, metrics=args.metrics,
                            batch_size=args.batch_size, fvd_convention=args.fvd_convention,
                            out=args.out, progress=not args.no_progress)
  print(report_table(report))
  if args.out:
    print(f"wrote {args.out}")
  return report
