"""`etalk precompute`: fp16 records of latents, l_v, e_v and speech states equal (to fp16 rounding)
what the pixel path computes, refused when stale or in the way, and read by the ETHD stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from data_pipeline import INT16_SCALE, loader
from data_pipeline.builders import synthetic_talking_heads
from data_pipeline.loader import PRECOMPUTE_FILE
from etalk_jax import parallel
from etalk_jax.audio import AudioFeatures, Wav2Vec2
from etalk_jax.audio.features import normalize
from etalk_jax.audio.params import save_speech_encoder
from etalk_jax.codecs import PatchPCACodec, PixelShuffleCodec
from etalk_jax.train.config import load_config
from etalk_jax.train.frozen import feature_config, vision_encoders_from_folder
from etalk_jax.train.precompute import (
  FORMAT,
  check_precomputed,
  encoder_record,
  parse_codec,
  precompute_command,
)
from etalk_jax.train.stages import (
  common,
  dicte as dicte_stage,
  ethd,
  projector as projector_stage,
)
from etalk_jax.vaid.data import VAIDFeaturizer
from etalk_jax.vaid.dicte import DICTE_TINY, DiCTE
from etalk_jax.vaid.projector import PROJECTOR_TINY, AudioLipProjector
from etalk_jax.vaid.storage import save_vaid_model
from etalk_jax.vision.params import save_pdfgc
from etalk_jax.vision.pdfgc import PDFGC_SMALL, PDFGCEncoder
from tests.pipeline.test_pipeline import random_model
from tests.vaid.test_learning import TINY_WAV2VEC2

CONFIGS = Path(__file__).parents[2] / "configs"
CODEC = {"kind": "pixel_shuffle", "factor": 4, "scale": 2.0}
AUDIO_FEATURES = {"chunk_frames": 100, "context_frames": 10, "bucket_frames": [60, 100]}
WINDOW = 8


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
  """The tiny synthetic set, random frozen encoders and V-AID models saved as folders, and the
  set precomputed with them."""
  root = tmp_path_factory.mktemp("precompute")
  # Weights drawn by NumPy: flax's eager init of PD-FGC alone takes ~20 s on 2 busy cores.
  audio_model = random_model(lambda rngs: Wav2Vec2(TINY_WAV2VEC2, rngs=rngs), 0)
  save_speech_encoder(audio_model, root / "wav2vec2")
  save_pdfgc(random_model(lambda rngs: PDFGCEncoder(PDFGC_SMALL, rngs=rngs), 1), root / "pdfgc")
  featurizer = VAIDFeaturizer(AudioFeatures(audio_model, feature_config(AUDIO_FEATURES)),
                              vision_encoders_from_folder(root / "pdfgc"))
  projector = featurizer.projector_config(PROJECTOR_TINY)
  save_vaid_model(random_model(lambda rngs: AudioLipProjector(projector, rngs=rngs), 2),
                  root / "projector")
  dicte = featurizer.dicte_config(DICTE_TINY)
  save_vaid_model(random_model(lambda rngs: DiCTE(dicte, rngs=rngs), 3), root / "dicte")
  dataset = synthetic_talking_heads.build(str(root / "data"), "tiny")
  folders = {"dataset": dataset, "wav2vec2": root / "wav2vec2", "pdfgc": root / "pdfgc",
             "projector": root / "projector", "dicte": root / "dicte", "dst": root / "pre"}
  summary = precompute_command(dataset, folders["dst"], codec_spec=CODEC,
                               audio_encoder_dir=folders["wav2vec2"],
                               vision_encoders_dir=folders["pdfgc"],
                               audio_features=AUDIO_FEATURES, progress=False)
  return {**folders, "summary": summary, "featurizer": featurizer}


def _by_clip(source) -> dict:
  return {(r["clip_id"].decode() if isinstance(r["clip_id"], bytes) else r["clip_id"]): r
          for r in (source[i] for i in range(len(source)))}


def test_records_are_fp16_and_equal_the_pixel_path(precomputed):
  info = loader.read_precompute_info(precomputed["dst"])
  summary = precomputed["summary"]
  assert info["fingerprint"] == summary["fingerprint"] and info["split"] == "train"
  assert (info["source"]["name"], info["source"]["version"]) == ("synthetic_talking_heads",
                                                                 "1.0.0")
  pixel_records = _by_clip(loader.data_source(precomputed["dataset"], "train"))
  records = _by_clip(loader.data_source(precomputed["dst"] / info["dataset"], "train"))
  assert set(records) == set(pixel_records) and summary["clips"] == len(records)
  assert summary["frames"] == 48 * len(records) and summary["bytes"] > 0

  featurizer = precomputed["featurizer"]
  clip_id = sorted(records)[0]
  record, pixel_record = records[clip_id], pixel_records[clip_id]
  shapes = {"latents": (48, 16, 16, 48), "lip": (48, featurizer.lip_dim),
            "expression": (48, featurizer.expression_dim),
            "audio_states": (48, featurizer.audio_layers, featurizer.audio_dim)}
  for name, shape in shapes.items():
    assert record[name].shape == shape and record[name].dtype == np.float16, name
  assert int(record["resolution"]) == 64

  # The same seed draws the same window and reference frame from both records.
  config = loader.LoaderConfig(window=WINDOW)
  window = loader.PrecomputedWindowSampler(config, 5)(record, np.random.default_rng(7))
  pixels = loader.WindowSampler(config)(pixel_record, np.random.default_rng(7))
  for name in ("start", "reference_index"):
    assert window[name] == pixels[name], name
  for name in ("reference", "face_mask", "lip_mask"):
    np.testing.assert_array_equal(window[name], pixels[name], err_msg=name)

  def close(got, want, name):  # float16 rounding of the stored value
    assert got.dtype == np.float32 and got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max(), err_msg=name)

  codec = PixelShuffleCodec(4)
  close(window["latents"], np.asarray(codec.encode(pixels["frames"])), "latents")
  close(window["reference_latents"], np.asarray(codec.encode(pixels["reference"])),
        "reference_latents")
  # Each frame aligned on its own landmarks, the reference on its own.
  size = pixels["frames"].shape[2]
  lip, expression = featurizer.encode_frames(
      np.concatenate([pixels["frames"], pixels["reference"][None]]),
      np.concatenate([pixels["landmarks"], pixels["reference_landmarks"][None]]) * size)
  close(window["lip_vision"], lip[:WINDOW], "lip_vision")
  close(window["expression"], expression[:WINDOW], "expression")
  close(window["reference_expression"], expression[WINDOW], "reference_expression")
  # A_w over the whole clip (as from_clip and inference compute it), cut to the window.
  speech = normalize(np.asarray(pixel_record["audio"], np.float32) / INT16_SCALE)
  audio_windows = np.asarray(featurizer.audio.windows(speech, 48))
  start = int(window["start"])
  close(window["audio_windows"], audio_windows[start:start + WINDOW], "audio_windows")


def test_stale_encoders_and_existing_destination_are_refused(precomputed, tmp_path):
  dst, audio, vision = precomputed["dst"], precomputed["wav2vec2"], precomputed["pdfgc"]
  moved = tmp_path / "pdfgc_copy"
  shutil.copytree(vision, moved)  # the same weights elsewhere still match
  assert check_precomputed(dst, CODEC, audio, moved, AUDIO_FEATURES)["clips"] > 0
  stale = {"vision_encoders": (CODEC, audio, audio, AUDIO_FEATURES),
           "codec": ({"kind": "pixel_shuffle", "factor": 8}, audio, vision, AUDIO_FEATURES),
           "audio_features": (CODEC, audio, vision, {**AUDIO_FEATURES, "window": 3})}
  for differing, arguments in stale.items():
    with pytest.raises(ValueError, match=f"precomputed with other encoders \\({differing} "
                                         ".*run etalk precompute again"):
      check_precomputed(dst, *arguments)
  with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
    precompute_command(precomputed["dataset"], dst, codec_spec=CODEC, audio_encoder_dir=audio,
                       vision_encoders_dir=vision, audio_features=AUDIO_FEATURES, progress=False)
  with pytest.raises(FileNotFoundError, match="precompute.json is missing"):
    loader.read_precompute_info(tmp_path)


def _stage_config(file: str, precomputed):
  """configs/<file>:tiny reading the fixture's dataset with its frozen encoders."""
  config = load_config(f"{CONFIGS / file}:tiny")
  config.data.dataset_dir = str(precomputed["dataset"])
  config.data.window = WINDOW
  config.encoders.audio = str(precomputed["wav2vec2"])
  config.encoders.vision = str(precomputed["pdfgc"])
  config.encoders.audio_features = AUDIO_FEATURES
  return config


def test_ethd_stage_reads_precomputed_batches_like_pixel_ones(precomputed, monkeypatch):
  # featurize never reads the model being trained: skip initialising ETHD (twice), keeping the
  # lip statistics each path measured for it.
  lip_statistics = []
  monkeypatch.setattr(common, "build_ethd", lambda *args: lip_statistics.append(args[4]))

  config = _stage_config("ethd_512.py", precomputed)
  config.vaid.projector = str(precomputed["projector"])
  config.vaid.dicte = str(precomputed["dicte"])
  config.vaid.dicte_steps = 2
  config.ethd.lip_statistics_batches = 3
  mesh = parallel.make_mesh({"data": -1})

  pixel_task = ethd.make_task(config, mesh)
  key = jax.random.key(0)  # the step key's featurize stream (the reference's augmentation)
  assert pixel_task.featurize_key
  pixel_batch = pixel_task.featurize(next(pixel_task.batches), key)
  config.data.precomputed = str(precomputed["dst"])
  task = ethd.make_task(config, mesh)
  batch = task.featurize(next(task.batches), key)
  assert set(batch) == set(pixel_batch)
  for name, value in pixel_batch.items():
    assert np.shape(batch[name]) == np.shape(value), name
    assert np.asarray(batch[name]).dtype == np.asarray(value).dtype, name
  # l_a's statistics, measured on the same windows either way. Precomputed A_w is the whole
  # clip's (speech normalised over the clip, not over the window's span) in fp16: the random
  # projector's l_a then moves by up to 0.024 on means of 0.06-4.6, more than its std in time.
  (pixel_mean, pixel_std), (mean, std) = (tuple(np.asarray(v) for v in stats)
                                          for stats in lip_statistics)
  assert mean.shape == std.shape == (precomputed["featurizer"].lip_dim,)
  np.testing.assert_allclose(mean, pixel_mean, rtol=2e-2, atol=5e-2)
  assert np.all((std > 0.3 * pixel_std) & (std < 3 * pixel_std))

  # Trained on ground-truth expressions only (as `etalk demo` trains ETHD), the stage reads no
  # Di-CTE: none named, and the ground truth stands where its e_a would.
  config.expression_from_truth, config.vaid.dicte = 1.0, ""
  truth_only = ethd.make_task(config, mesh).featurize(next(task.batches), key)
  assert set(truth_only) == set(batch)
  np.testing.assert_array_equal(truth_only["predicted_expression"], truth_only["expression"])

  config.encoders.vision = str(precomputed["wav2vec2"])
  with pytest.raises(ValueError, match="precomputed with other encoders"):
    ethd.make_task(config, mesh)


def test_vaid_stages_read_precomputed_examples_like_pixel_ones(precomputed):
  mesh = parallel.make_mesh({"data": -1})
  for stage, file in ((projector_stage, "vaid.py"), (dicte_stage, "dicte.py")):
    config = _stage_config(file, precomputed)
    if stage is dicte_stage:  # every reference from another clip: both samplers draw the same ones
      config.data.cross_clip_reference = 1.0
    pixel_task = stage.make_task(config, mesh)
    pixel_windows = next(pixel_task.batches)
    config.data.precomputed = str(precomputed["dst"])
    task = stage.make_task(config, mesh)
    windows = next(task.batches)
    # The same seed draws the same clips, windows and reference frames from either folder.
    for name in ("clip_id", "start", "reference_index", "reference_clip_id", "cross_clip"):
      np.testing.assert_array_equal(windows[name], pixel_windows[name], err_msg=name)
    batch, pixel_batch = task.featurize(windows), pixel_task.featurize(pixel_windows)
    assert set(batch) == set(pixel_batch)
    for name, value in pixel_batch.items():
      got = np.asarray(batch[name])
      assert got.shape == np.shape(value) and got.dtype == np.asarray(value).dtype, name
      if name != "audio_windows":  # the whole clip's A_w, not the window's: checked above
        np.testing.assert_allclose(got, value, rtol=1e-3, atol=1e-3 * np.abs(value).max(),
                                   err_msg=f"{stage.__name__} {name}")
    # The codec is not compared (these stages read no latents); the encoders are.
    config.encoders.audio_features = {**AUDIO_FEATURES, "window": 3}
    with pytest.raises(ValueError, match=r"precomputed with other encoders \(audio_features"):
      stage.make_task(config, mesh)


def test_patch_pca_codec_is_recorded_by_its_file(tmp_path):
  frames = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  codec_file = tmp_path / "codec.json"
  codec_file.write_text(json.dumps(PatchPCACodec.fit(frames, 4).spec()))
  spec = parse_codec(f"patch_pca:{codec_file}")
  assert spec == {"kind": "patch_pca", "file": str(codec_file)}
  folder = tmp_path / "encoder"
  folder.mkdir()
  (folder / "weights").write_bytes(b"0")
  record = encoder_record(spec, folder, folder)
  assert record["codec"]["kind"] == "patch_pca" and len(record["codec"]["sha256"]) == 64
  refit = PatchPCACodec.fit(frames[::-1][:3], 4).spec()
  codec_file.write_text(json.dumps(refit))  # refitted: other latents
  assert encoder_record(spec, folder, folder)["codec"] != record["codec"]
  assert "codec" not in encoder_record(None, folder, folder)
  with pytest.raises(FileNotFoundError, match="patch_pca:FILE"):
    encoder_record({"kind": "patch_pca", "file": str(tmp_path / "missing.json")}, folder, folder)


def test_codec_flag_parses_to_the_config_spec():
  assert parse_codec("pixel_shuffle") == CODEC
  assert parse_codec("pixel_shuffle:8") == {"kind": "pixel_shuffle", "factor": 8, "scale": 2.0}
  assert parse_codec("pixel_shuffle:4:1.5")["scale"] == 1.5
  assert parse_codec("vae:ckpt/svd_xt") == {"kind": "vae", "folder": "ckpt/svd_xt"}
  for bad in ("vae", "patch_pca", "pixel_shuffle:x", "jpeg:3"):
    with pytest.raises(ValueError, match="--codec"):
      parse_codec(bad)


def test_records_from_before_the_alignment_are_refused(tmp_path):
  """Format 2 records hold l_v / e_v of unaligned crops: a run must not mix them in."""

  (tmp_path / PRECOMPUTE_FILE).write_text(json.dumps({"format": FORMAT, "format_version": 2}))
  with pytest.raises(ValueError, match="v2; before v3 its l_v / e_v were computed on unaligned"):
    check_precomputed(tmp_path, CODEC, tmp_path, tmp_path, AUDIO_FEATURES)
