"""`etalk precompute`: a prepared dataset's clips -> records of what the frozen encoders make of
them (latents, l_v, e_v, speech-encoder states), so ETHD training at scale reads latents, not
pixels.

The output folder holds the TFDS records (`data_pipeline.builders.precomputed`, one per clip) and
`precompute.json`: the source dataset (path, name, config, version, split), the sizes, and what
the arrays depend on (`encoder_record`: the codec spec with a digest of the VAE's files, digests of
the speech and vision encoder folders, and the audio feature settings) with its `fingerprint`.
A training run that reads the folder (`config.data.precomputed`) recomputes the record from the
encoders its config names and refuses a mismatch (`check_precomputed`), so latents from other
encoders are never mixed into a run.

The speech states are computed over each whole clip (normalised over it, the transformer seeing the
whole clip, as inference sees the whole speech); the pixel path computes them over the window's
audio with ±2 frames of context, so the two differ slightly at the level of wav2vec2's context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from data_pipeline import INT16_SCALE, loader, media
from data_pipeline.builders import precomputed
from data_pipeline.loader import read_precompute_info
from etalk_jax.audio import AudioFeatures
from etalk_jax.audio.features import normalize
from etalk_jax.audio.params import load_wav2vec2
from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.train.frozen import (
  codec_weights_folder,
  feature_config,
  latent_codec_from_spec,
  vision_encoders_from_folder,
)
from etalk_jax.vaid.data import VAIDFeaturizer
from etalk_jax.weights import atomic_folder

FORMAT = "etalk_precomputed"
# 3: l_v / e_v of PD-FGC's aligned crops (`vision.alignment`; 2 and before: of the loose crops
# resized, which the pretrained trunk never saw); 2: per-frame arrays stored as raw float16 bytes.
FORMAT_VERSION = 3
DEFAULT_CHUNK_FRAMES = 16  # frames per codec call: one compiled shape, bounded memory at 512²
_READ_BLOCK = 1 << 22
# The source record's fields a precomputed record keeps (all of `builders.common.clip_features`).
COPIED_FIELDS = ("clip_id", "source", "speaker", "emotion", "level", "num_frames", "start_frame",
                 "video", "audio", "landmarks", "crop_box")


def folder_digest(folder: str | Path) -> str:
  """sha256 over every file under `folder` (relative path, size and bytes, in path order): the
  same weights give the same digest wherever the folder lies."""
  folder = Path(folder)
  digest = hashlib.sha256()
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as file:
      for block in iter(lambda: file.read(_READ_BLOCK), b""):
        digest.update(block)
  return digest.hexdigest()


def _existing_folder(folder: str | Path | None, what: str, flag: str) -> Path:
  if not folder:
    raise UserError(f"no {what} given; pass {flag}")
  if not Path(folder).is_dir():
    raise InputNotFound(f"{what} {folder} is not a folder")
  return Path(folder)


def _codec_record(codec_spec: dict[str, Any]) -> dict[str, Any]:
  """The codec's part of `encoder_record`: kind, and factor and scale or its weights' digest."""
  spec = dict(codec_spec)
  codec: dict[str, Any] = {"kind": spec.get("kind")}
  if codec["kind"] == "pixel_shuffle":
    codec["factor"] = int(spec.get("factor", 4))
    codec["scale"] = float(spec.get("scale", 2.0))
  elif codec["kind"] == "vae":
    codec["sha256"] = folder_digest(_existing_folder(
        spec.get("folder") and codec_weights_folder(spec), "VAE folder",
        "--codec vae:DIR (config.codec.folder in training)"))
  elif codec["kind"] == "patch_pca":
    codec_file = Path(spec.get("file", ""))
    if not codec_file.is_file():
      raise InputNotFound(f"patch-PCA codec file {codec_file} does not exist; pass --codec "
                          "patch_pca:FILE (config.codec.file in training)")
    codec["sha256"] = hashlib.sha256(codec_file.read_bytes()).hexdigest()
  else:
    raise UserError(f"codec kind {codec['kind']!r}: use 'pixel_shuffle', 'patch_pca' or 'vae'")
  return codec


def encoder_record(codec_spec: dict[str, Any] | None, audio_encoder_dir: str | Path,
                   vision_encoders_dir: str | Path,
                   audio_features: dict[str, Any] | None = None) -> dict[str, Any]:
  """What precomputed arrays depend on, without folder paths (moving a folder changes nothing):
  the codec (kind, factor, or the digest of the VAE folder or patch-PCA file; left out when
  `codec_spec` is None, for readers of the encoder outputs only), the speech and vision encoder
  folders' digests and every `FeatureConfig` field."""
  features = dataclasses.asdict(feature_config(audio_features or {}))
  return {
      **({} if codec_spec is None else {"codec": _codec_record(codec_spec)}),
      "audio_encoder": {"sha256": folder_digest(_existing_folder(
          audio_encoder_dir, "speech encoder", "--audio-encoder DIR (config.encoders.audio)"))},
      "vision_encoders": {"sha256": folder_digest(_existing_folder(
          vision_encoders_dir, "vision encoders",
          "--vision-encoders DIR (config.encoders.vision)"))},
      # Through JSON, so tuples compare equal to the lists precompute.json gives back.
      "audio_features": json.loads(json.dumps(features)),
  }


def fingerprint(record: dict[str, Any]) -> str:
  """sha256 of an `encoder_record`."""
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def check_precomputed(folder: str | Path, codec_spec: dict[str, Any] | None,
                      audio_encoder_dir: str | Path, vision_encoders_dir: str | Path,
                      audio_features: dict[str, Any] | None = None) -> dict[str, Any]:
  """`precompute.json` of `folder` if it was computed with these encoders, else one ValueError
  naming what differs. `codec_spec` None: the latents are not read (the V-AID stages), so the
  codec is not compared."""
  info = read_precompute_info(folder)
  if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{folder} is not a precomputed dataset of format {FORMAT} "
                    f"v{FORMAT_VERSION} (it says {info.get('format')} "
                    f"v{info.get('format_version')}; before v3 its l_v / e_v were computed on "
                    "unaligned crops); run etalk precompute again")
  wanted = encoder_record(codec_spec, audio_encoder_dir, vision_encoders_dir, audio_features)
  differing = [name for name, value in wanted.items() if info["encoders"].get(name) != value]
  if differing:
    raise UserError(f"{folder} was precomputed with other encoders ({', '.join(differing)} differ "
                    "from the ones this config names); run etalk precompute again with them, or "
                    "point config.data.precomputed at a matching folder")
  return info


def parse_codec(text: str) -> dict[str, Any]:
  """The CLI's --codec: "pixel_shuffle[:FACTOR[:SCALE]]", "vae:DIR" or "patch_pca:FILE" -> a
  codec spec (config.codec)."""
  kind, _, argument = text.partition(":")
  if kind == "pixel_shuffle":
    factor, _, scale = argument.partition(":")
    try:
      return {"kind": kind, "factor": int(factor or 4), "scale": float(scale or 2.0)}
    except ValueError:
      raise UserError(f"--codec {text}: the pixel-shuffle factor must be an integer and the "
                      "scale a number") from None
  if kind == "vae" and argument:
    return {"kind": kind, "folder": argument}
  if kind == "patch_pca" and argument:
    return {"kind": kind, "file": argument}
  raise UserError(f"--codec {text}: use pixel_shuffle[:FACTOR[:SCALE]], vae:DIR (a folder "
                  "of `etalk convert svd`, or its vae/) or patch_pca:FILE (a fitted codec's "
                  "JSON)")


def _float16(array, what: str) -> np.ndarray:
  """float32 -> float16, refusing values past its range (65504) rather than storing infinities."""
  half = np.asarray(array, np.float16)
  if not np.isfinite(half).all():
    raise UserError(f"{what} does not fit in float16 (largest magnitude "
                    f"{np.abs(np.asarray(array)).max():.4g}); these encoders cannot be "
                    "precomputed")
  return half


def encode_in_chunks(encode, frames: np.ndarray, chunk_frames: int) -> np.ndarray:
  """uint8 frames `(n, H, W, 3)` -> float32 latents `(n, h, w, c)`, `chunk_frames` per `encode`
  call (the last chunk zero-padded, so every call has one shape)."""
  count = frames.shape[0]
  padded = -(-count // chunk_frames) * chunk_frames
  frames = np.concatenate([frames, np.zeros((padded - count,) + frames.shape[1:], frames.dtype)])
  chunks = [np.asarray(encode(frames[start:start + chunk_frames]), np.float32)
            for start in range(0, padded, chunk_frames)]
  return np.concatenate(chunks)[:count]


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def precompute_command(dataset_dir: str | Path, dst: str | Path, *, codec_spec: dict[str, Any],
                       audio_encoder_dir: str | Path, vision_encoders_dir: str | Path,
                       audio_features: dict[str, Any] | None = None, split: str = "train",
                       chunk_frames: int = DEFAULT_CHUNK_FRAMES, progress: bool = True,
                       overwrite: bool = False) -> dict[str, Any]:
  """`etalk precompute`: every clip of a prepared dataset's split -> one record at `dst`.

  dataset_dir: a prepared dataset folder (`<data_dir>/<name>/<config>/<version>`).
  codec_spec: {"kind": "pixel_shuffle", "factor": f}, {"kind": "vae", "folder": DIR} or
    {"kind": "patch_pca", "file": FILE}, as config.codec of the ETHD stage.
  audio_encoder_dir / vision_encoders_dir / audio_features: config.encoders.audio / .vision /
    .audio_features of the ETHD stage (a `save_encoders` folder or a bare PD-FGC one).
  overwrite: replace an existing, non-empty `dst` (else FileExistsError). The folder appears only
    once everything is written. Returns a summary: clips, frames, bytes, seconds, fingerprint, dst.
  """
  started = time.time()
  if chunk_frames < 1:
    raise UserError(f"chunk_frames is {chunk_frames}; encode at least one frame per call")
  records = loader.data_source(dataset_dir, split)
  if len(records) == 0:
    raise UserError(f"{dataset_dir} split {split!r} has no clips to precompute")
  with atomic_folder(Path(dst), overwrite=overwrite) as tmp:  # refuses an existing dst first
    encoders = encoder_record(codec_spec, audio_encoder_dir, vision_encoders_dir, audio_features)
    _, encode = latent_codec_from_spec(codec_spec)
    featurizer = VAIDFeaturizer(AudioFeatures(load_wav2vec2(audio_encoder_dir),
                                              feature_config(audio_features or {})),
                                vision_encoders_from_folder(vision_encoders_dir))
    resolution = media.decode_frames(records[0]["video"], 0, 1).shape[1]
    latent_shape = jax.eval_shape(encode, jax.ShapeDtypeStruct(
        (1, resolution, resolution, 3), np.uint8)).shape[1:]
    totals = {"frames": 0}

    def examples():
      for index in tqdm(range(len(records)), desc="precompute", unit="clip", disable=not progress):
        record = records[index]
        clip_id = _text(record["clip_id"])
        num_frames = int(record["num_frames"])
        frames = media.decode_frames(record["video"], 0, num_frames)
        if frames.shape[1:3] != (resolution, resolution):
          raise UserError(f"clip {clip_id} is {frames.shape[2]}x{frames.shape[1]} px, the first "
                          f"clip {resolution}² px; precompute one resolution at a time")
        # Each frame aligned on its own landmarks (the record's, in [0, 1] crop coordinates).
        lip, expression = featurizer.encode_frames(
            frames, np.asarray(record["landmarks"], np.float32) * resolution)
        speech = normalize(np.asarray(record["audio"], np.float32) / INT16_SCALE)
        states = featurizer.audio.frame_states(speech, num_frames, what=f"clip {clip_id}")
        totals["frames"] += num_frames
        yield clip_id, {
            **{name: record[name] for name in COPIED_FIELDS},
            "latents": _float16(encode_in_chunks(encode, frames, chunk_frames),
                                f"clip {clip_id}'s latents"),
            "lip": _float16(lip, f"clip {clip_id}'s l_v"),
            "expression": _float16(expression, f"clip {clip_id}'s e_v"),
            "audio_states": _float16(states, f"clip {clip_id}'s speech states"),
            "resolution": np.int32(resolution)}

    config = precomputed.PrecomputedConfig(
        name=split, description=f"etalk precompute of {dataset_dir}", split=split,
        latent_shape=tuple(latent_shape), lip_dim=featurizer.lip_dim,
        expression_dim=featurizer.expression_dim, audio_layers=featurizer.audio_layers,
        audio_dim=featurizer.audio_dim, examples=examples)
    dataset = Path(precomputed.build(str(tmp), config))
    info = records.dataset_info
    summary = {
        "clips": len(records), "frames": totals["frames"],
        "bytes": sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file()),
        "seconds": round(time.time() - started, 3), "fingerprint": fingerprint(encoders)}
    (tmp / loader.PRECOMPUTE_FILE).write_text(json.dumps({
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "dataset": dataset.relative_to(tmp).as_posix(), "split": split,
        "source": {"dataset_dir": str(Path(dataset_dir).absolute()), "name": info.name,
                   "config": info.config_name, "version": str(info.version)},
        "resolution": int(resolution), "latent_shape": list(latent_shape),
        "lip_dim": featurizer.lip_dim, "expression_dim": featurizer.expression_dim,
        "encoders": encoders, **summary}, indent=2))
  return {**summary, "dst": str(Path(dst))}

