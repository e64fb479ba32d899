"""The emotion codebook: one expression latent per keyword (docs/ARCHITECTURE.md §3.10).

Each latent is the mean of the expression encoder's output `e_v` (PD-FGC's 30-d expression code,
through the trained adapter) over frames labelled with that keyword; MEAD gives such labels. At
generation an emotion keyword and an intensity alpha in [0, 1.5] give Di-CTE's condition

    e_cond = e_neutral + alpha * (e_keyword - e_neutral)

so alpha = 0 is the neutral face, 1 the keyword's mean face, and up to 1.5 exaggerates it. A
blend ("happy:0.7,surprised:0.3") puts the weighted mean of its keywords' latents in place of
e_keyword (weights normalised to sum 1).
`Codebook.nearest` reads the emotion back from expression codes (of generated frames, say).

Frames are encoded exactly as V-AID's training targets are (`VAIDFeaturizer.encode_frames`: each
frame aligned on its own landmarks as PD-FGC reads faces), so `e_cond` lives in the space Di-CTE
learned.

A dataset need not hold all eight keywords (the tiny synthetic set has four): `etalk codebook
build` then writes the keywords it found and logs a warning naming the missing ones, and
`Codebook.condition` of a missing keyword raises ValueError naming the keywords the codebook has.
Neutral is always required: every condition is measured from it. `build_codebook` called directly
requires all eight unless `allow_missing=True`.

The file is JSON (keywords, latents, frame counts, where they came from), written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipeline import EMOTIONS, loader, media
from etalk_jax.emotion.keywords import check_keyword, parse_emotion
from etalk_jax.errors import OutputExists, UserError
from etalk_jax.records import read_record, write_text_atomically

log = logging.getLogger(__name__)

FORMAT = "etalk-emotion-codebook"
VERSION = 1
MAX_INTENSITY = 1.5  # docs/ARCHITECTURE.md §3.10: alpha in [0, 1.5]
BUILD_COMMAND = "etalk codebook build --data DIR --dst FILE"


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
  """Expression latents per emotion keyword.

  keywords: the keywords held, a subset of `EMOTIONS` in its order, always with "neutral".
  latents:  float32 `(len(keywords), dim)`, the mean expression code of each keyword's frames.
  counts:   int64 `(len(keywords),)`, how many frames each mean is over.
  source:   where the latents came from (dataset, split, encoder), for the record.
  """

  keywords: tuple[str, ...]
  latents: np.ndarray
  counts: np.ndarray
  source: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    keywords = tuple(self.keywords)
    latents = np.asarray(self.latents, np.float32)
    counts = np.asarray(self.counts, np.int64)
    problems = []
    unknown = [k for k in keywords if k not in EMOTIONS]
    if unknown:
      problems.append(f"unknown keywords {unknown} (the keywords are {', '.join(EMOTIONS)})")
    elif keywords != tuple(k for k in EMOTIONS if k in keywords) or len(set(keywords)) != len(
        keywords):
      problems.append(f"keywords {list(keywords)} must be distinct and in the order "
                      f"{', '.join(EMOTIONS)}")
    if "neutral" not in keywords:
      problems.append("it has no 'neutral' latent, which every condition is measured from")
    if latents.ndim != 2 or latents.shape[0] != len(keywords) or latents.shape[1] < 1:
      problems.append(f"latents have shape {latents.shape}, not ({len(keywords)}, dim)")
    elif not np.isfinite(latents).all():
      problems.append("latents hold NaN or infinite values")
    if counts.shape != (len(keywords),) or (counts < 1).any():
      problems.append(f"counts {counts.tolist()} must be one positive frame count per keyword")
    if problems:
      raise UserError("invalid emotion codebook: " + "; ".join(problems) + ".")
    object.__setattr__(self, "keywords", keywords)
    object.__setattr__(self, "latents", latents)
    object.__setattr__(self, "counts", counts)
    object.__setattr__(self, "source", dict(self.source))

  @property
  def dim(self) -> int:
    return self.latents.shape[1]

  def latent(self, keyword: str) -> np.ndarray:
    """The mean expression code `(dim,)` of `keyword` (any spelling `check_keyword` accepts)."""
    keyword = check_keyword(keyword)
    if keyword not in self.keywords:
      raise UserError(f"this emotion codebook has no latent for {keyword!r}: its data had no "
                      f"frames labelled so. It holds {', '.join(self.keywords)}; choose one of "
                      f"those or rebuild it from data that has {keyword!r} ({BUILD_COMMAND}).")
    return self.latents[self.keywords.index(keyword)]

  def condition(self, keyword: str, intensity: float = 1.0) -> np.ndarray:
    """e_cond `(dim,)` = e_neutral + intensity * (e_keyword - e_neutral), intensity in [0, 1.5].

    `keyword` may be a blend, "happy:0.7,surprised:0.3" (`keywords.parse_emotion`): then
    e_keyword is the weighted mean of the keywords' latents (weights normalised to sum 1), so
    the intensity scales the mixture from neutral as it scales one keyword."""
    try:
      alpha = float(intensity)
    except (TypeError, ValueError):
      alpha = math.nan
    if not 0.0 <= alpha <= MAX_INTENSITY:  # also rejects NaN
      raise UserError(f"emotion intensity {intensity!r} is out of range; give a number from 0 "
                      f"(neutral) to 1 (the keyword's mean face) up to {MAX_INTENSITY} "
                      "(exaggerated).")
    neutral = self.latent("neutral")
    target = sum(np.float32(weight) * self.latent(name) for name, weight in parse_emotion(keyword))
    return (neutral + np.float32(alpha) * (target - neutral)).astype(np.float32)

  def nearest(self, expressions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expression codes `(..., dim)` -> (keywords `(...)` str, indices `(...)` into `keywords`):
    for each code, the keyword whose latent is closest (Euclidean)."""
    expressions = np.asarray(expressions, np.float32)
    if expressions.ndim < 1 or expressions.shape[-1] != self.dim:
      raise ValueError(f"expression codes of shape {expressions.shape} do not match the "
                       f"codebook's {self.dim}-d latents.")
    distances = np.sum((expressions[..., None, :] - self.latents) ** 2, axis=-1)
    indices = np.argmin(distances, axis=-1)
    return np.asarray(self.keywords)[indices], indices

  def to_dict(self) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "keywords": list(self.keywords),
            "dim": self.dim, "latents": self.latents.tolist(), "counts": self.counts.tolist(),
            "source": self.source}

  def save(self, path: str | Path) -> Path:
    """Writes the codebook as JSON at `path`, atomically (a temporary file, then a rename)."""
    return write_text_atomically(path, json.dumps(self.to_dict(), indent=1) + "\n")

  @classmethod
  def load(cls, path: str | Path) -> "Codebook":
    data = read_record(path, format=FORMAT, version=VERSION, what="an emotion codebook",
                       fix=f"Build one with `{BUILD_COMMAND}`.",
                       required=("keywords", "latents", "counts"))
    try:
      return cls(tuple(data["keywords"]), np.asarray(data["latents"], np.float32),
                 np.asarray(data["counts"], np.int64), data.get("source") or {})
    except (ValueError, TypeError) as error:
      raise UserError(f"{path}: {error} Rebuild it with `{BUILD_COMMAND}`.") from None


def build_codebook(expressions: np.ndarray, labels: Sequence[str],
                   source: dict[str, Any] | None = None, *, allow_missing: bool = False
                   ) -> Codebook:
  """Expression codes `(n, dim)` and one keyword per code -> the codebook of per-keyword means.

  Labels go through `check_keyword` (an unknown one raises). A keyword without frames raises
  ValueError naming it, unless `allow_missing` (then it is left out; neutral never may be).
  """
  expressions = np.asarray(expressions, np.float32)
  if expressions.ndim != 2 or expressions.shape[0] != len(labels):
    raise ValueError(f"expressions of shape {expressions.shape} need shape (n, dim) with one row "
                     f"per label ({len(labels)} labels).")
  labels = np.asarray([check_keyword(label) for label in labels])
  present = [keyword for keyword in EMOTIONS if (labels == keyword).any()]
  missing = [keyword for keyword in EMOTIONS if keyword not in present]
  if "neutral" in missing or (missing and not allow_missing):
    raise UserError(f"no frames labelled {', '.join(missing)}; a codebook needs frames of "
                    + ("every keyword" if not allow_missing else "'neutral'")
                    + f" ({', '.join(EMOTIONS)}).")
  latents = np.stack([expressions[labels == keyword].mean(axis=0, dtype=np.float64)
                      for keyword in present]).astype(np.float32)
  counts = np.asarray([(labels == keyword).sum() for keyword in present], np.int64)
  return Codebook(tuple(present), latents, counts, source or {})


def _frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
  """At most `max_frames` frame indices spread evenly over a clip (all of a short clip)."""
  if num_frames <= max_frames:
    return np.arange(num_frames)
  return np.unique(np.linspace(0, num_frames - 1, max_frames).round().astype(np.int64))


def codebook_build_command(data_dir: str | Path, dst: str | Path,
                           encoders_dir: str | Path | None = None, *, split: str = "train",
                           max_frames_per_clip: int = 32, overwrite: bool = False,
                           progress: bool = True, encoders=None) -> dict[str, Any]:
  """`etalk codebook build`: a prepared dataset's labelled frames -> the emotion codebook at `dst`.

  data_dir: a prepared dataset folder (`<data_dir>/<name>/<config>/<version>`, the one holding
    dataset_info.json, as `etalk prepare` / `etalk synthesize` write).
  encoders_dir: the trained lip / expression encoders (`vision.params.save_encoders`); tests and
    callers holding the model pass `encoders` (an `AdaptedPDFGC`) instead.
  max_frames_per_clip: frames encoded per clip, spread evenly over it.
  overwrite: replace an existing `dst` (else FileExistsError).
  Clips labelled with something other than the eight keywords (MEAD's contempt, unknown) are
  skipped and counted. Returns a summary (frames per keyword, clips, skipped, missing, dst,
  seconds).
  """
  # JAX loads only to build a codebook: etalk_jax.emotion itself imports without it.
  from etalk_jax.vaid.data import VISION_CHUNK_FRAMES, VAIDFeaturizer  # noqa: PLC0415 (JAX)
  started = time.time()
  dst = Path(dst)
  if dst.exists() and not overwrite:
    raise OutputExists(f"{dst} already exists; choose another destination or pass "
                       "--overwrite.")
  if max_frames_per_clip < 1:
    raise UserError(f"max_frames_per_clip is {max_frames_per_clip}; encode at least one frame "
                    "per clip.")
  if encoders is None:
    if encoders_dir is None:
      raise UserError("no expression encoder given; pass --encoders DIR (the trained encoders "
                      "saved by the encoder pre-training stage).")
    from etalk_jax.vision.params import load_encoders  # noqa: PLC0415 (JAX, as above)
    encoders = load_encoders(encoders_dir)
  # Only the vision half of the featurizer is used: the same alignment and jitted encoder as
  # V-AID's training targets.
  featurizer = VAIDFeaturizer(audio=None, vision=encoders)

  records = loader.data_source(data_dir, split)
  label_names = records.dataset_info.features["emotion"].names  # EMOTION_LABELS when written
  expressions, labels, pending, pending_landmarks = [], [], [], []
  clips, skipped = 0, {}

  def encode_pending():  # frames of several clips per call: short clips fill one encoder batch
    if pending:
      expressions.append(featurizer.encode_frames(np.concatenate(pending),
                                                  np.concatenate(pending_landmarks))[1])
      pending.clear()
      pending_landmarks.clear()

  for index in tqdm(range(len(records)), desc="codebook", unit="clip", disable=not progress):
    record = records[index]
    label = label_names[int(record["emotion"])]
    if label not in EMOTIONS:
      skipped[label] = skipped.get(label, 0) + 1
      continue
    frames = media.decode_frames(record["video"])
    chosen = _frame_indices(len(frames), max_frames_per_clip)
    pending.append(frames[chosen])
    # Each frame's own landmarks, [0, 1] crop coordinates -> its pixels.
    pending_landmarks.append(np.asarray(record["landmarks"], np.float32)[chosen] * frames.shape[2])
    labels.extend([label] * len(pending[-1]))
    clips += 1
    if sum(map(len, pending)) >= VISION_CHUNK_FRAMES:
      encode_pending()
  encode_pending()
  if not expressions:
    raise UserError(f"{data_dir} split {split!r} has no clip labelled with an emotion keyword "
                    f"({', '.join(EMOTIONS)}); skipped: {skipped or 'none'}.")

  source = {"dataset": str(Path(data_dir).absolute()), "split": split,
            "encoders": str(Path(encoders_dir).absolute()) if encoders_dir else "in memory",
            "expression_encoder": type(encoders).__name__,
            "image_size": encoders.config.image_size, "max_frames_per_clip": max_frames_per_clip}
  codebook = build_codebook(np.concatenate(expressions), labels, source, allow_missing=True)
  missing = [keyword for keyword in EMOTIONS if keyword not in codebook.keywords]
  if missing:
    log.warning("%s has no frames labelled %s; the codebook holds only %s.", data_dir,
                ", ".join(missing), ", ".join(codebook.keywords))
  codebook.save(dst)
  return {"dst": str(Path(dst).absolute()), "clips": clips,
          "frames": dict(zip(codebook.keywords, codebook.counts.tolist())),
          "skipped": skipped, "missing": missing, "seconds": round(time.time() - started, 1)}
