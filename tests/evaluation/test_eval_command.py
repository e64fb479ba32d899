"""`etalk eval` end to end on short mp4s the test writes (a real face, so MediaPipe finds it), with
tiny random metric networks in a --models folder: identical folders give FID, FVD and E-FID of
zero; different videos do not; a ground-truth speech track delayed by k frames moves every
video's SyncNet offset by k; bad input is one message and exit 2."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from skimage import data as skimage_data

from data_pipeline import SAMPLES_PER_FRAME, media
from data_pipeline.builders import synthetic_talking_heads
from data_pipeline.loader import data_source
from etalk_jax import cli
from etalk_jax.errors import UserError
from etalk_jax.evaluation import command, scores
from etalk_jax.evaluation.face3d import FACE3D_SMALL, Face3DRecon
from etalk_jax.evaluation.face3d_params import save_face3d
from etalk_jax.evaluation.i3d import I3D, I3D_SMALL
from etalk_jax.evaluation.i3d_params import save_i3d
from etalk_jax.evaluation.inception import INCEPTION_SMALL, FIDInception
from etalk_jax.evaluation.inception_params import save_inception
from etalk_jax.evaluation.protocol import Protocol
from etalk_jax.evaluation.syncnet import SYNCNET_SMALL, SyncNet
from etalk_jax.evaluation.syncnet_params import save_syncnet
from etalk_jax.pipeline import save_pipeline
from tests.evaluation.test_syncnet import EnvelopeProbe
from tests.pipeline.test_pipeline import tiny_components

# 1.2 s = 30 frames per video, FVD on the first 12: the protocol's arithmetic at a test's size.
PROTOCOL = Protocol("test", seconds=1.2, fvd_frames=12)
FRAMES = PROTOCOL.frames
NAMES = ("clip_a", "clip_b", "clip_c")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  save_inception(FIDInception(INCEPTION_SMALL, rngs=nnx.Rngs(0)), root / "inception")
  save_i3d(I3D(I3D_SMALL, rngs=nnx.Rngs(1)), root / "i3d")
  save_syncnet(SyncNet(SYNCNET_SMALL, rngs=nnx.Rngs(2)), root / "syncnet")
  save_face3d(Face3DRecon(FACE3D_SMALL, rngs=nnx.Rngs(3)), root / "face3d")
  return root


def _talking_face(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The astronaut's face, drifting a little, its brightness following the loudness of each
  frame's 40 ms of random speech-like noise (what `EnvelopeProbe` reads)."""
  rng = np.random.default_rng(seed)
  face = np.asarray(Image.fromarray(skimage_data.astronaut()[10:300, 100:390]).resize((160, 160)),
                    np.float32)
  loudness = rng.uniform(np.log(0.01), np.log(0.5), FRAMES)
  audio = np.exp(np.repeat(loudness, SAMPLES_PER_FRAME)) * rng.standard_normal(
      SAMPLES_PER_FRAME * FRAMES)
  gain = 0.35 + 0.65 * (loudness - loudness.min()) / np.ptp(loudness)
  frames = np.stack([np.roll(face, (t % 5) - 2, axis=1) * g for t, g in enumerate(gain)])
  return np.round(frames).astype(np.uint8), np.clip(audio, -1, 0.999).astype(np.float32)


def _delayed(audio: np.ndarray, frames: int) -> np.ndarray:
  quiet = np.full(SAMPLES_PER_FRAME * frames, 0.001, np.float32)
  return np.concatenate([quiet, audio[:len(audio) - len(quiet)]])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  """generated/ and reference/ with the same three videos; darker/ with dimmer frames;
  late/ with the reference's frames and its speech 3 frames late."""
  root = tmp_path_factory.mktemp("videos")
  for name, seed in zip(NAMES, (0, 1, 2)):
    frames, audio = _talking_face(seed)
    int16 = lambda x: np.round(x * 32767).astype(np.int16)  # noqa: E731
    for folder, pictures, speech in (("generated", frames, audio), ("reference", frames, audio),
                                     ("darker", (frames * 0.6).astype(np.uint8), audio),
                                     ("late", frames, _delayed(audio, 3))):
      (root / folder).mkdir(exist_ok=True)
      media.write_video_file(root / folder / f"{name}.mp4", pictures, int16(speech), fps=25,
                             sample_rate=16000)
  return root


def test_identical_folders_score_zero_and_different_ones_do_not(models, videos, tmp_path):
  same = command.evaluate_folders(videos / "generated", videos / "generated", PROTOCOL, models,
                                  out=tmp_path / "same.json", progress=False)
  assert json.loads((tmp_path / "same.json").read_text()) == same
  assert same["videos"] == 3 and set(same["metrics"]) == {"fid", "fvd", "sync", "efid"}
  for metric in ("fid", "fvd", "efid"):
    assert abs(same["metrics"][metric]["value"]) < 1e-6, metric
  assert same["metrics"]["fid"]["samples"] == {"generated": 3 * FRAMES, "reference": 3 * FRAMES}
  assert same["metrics"]["fvd"]["samples"] == {"generated": 3, "reference": 3}
  assert same["metrics"]["efid"]["samples"]["generated"] == 3 * FRAMES  # a face in every frame
  sync = same["metrics"]["sync"]
  assert sync["generated/sync_d"] == sync["reference/sync_d"]
  assert sync["generated/sync_d"]["videos"] == 3 and sync["videos_without_face"] == 0

  different = command.evaluate_folders(videos / "darker", videos / "reference", PROTOCOL, models,
                                       progress=False)
  for metric in ("fid", "fvd", "efid"):
    # Random tiny networks give small features, so compare with the identical sets' value.
    value, floor = different["metrics"][metric]["value"], abs(same["metrics"][metric]["value"])
    assert value > 1e3 * max(floor, 1e-12), (metric, value, floor)
  table = command.report_table(different)
  assert "FVD12" in table and "Sync-C" in table and "E-FID" in table


class _SyncProbe(EnvelopeProbe):
  """EnvelopeProbe (brightness vs loudness agree when in sync) where SyncNet's weights would be."""

  def __init__(self):
    self.config = dataclasses.replace(SYNCNET_SMALL)


def test_delayed_speech_moves_the_offset_by_the_delay(videos, models, monkeypatch):
  monkeypatch.setattr(scores, "load_syncnet", lambda folder, compute: _SyncProbe())
  in_sync = command.evaluate_folders(videos / "generated", videos / "reference", PROTOCOL,
                                     models, metrics="sync", progress=False)
  late = command.evaluate_folders(videos / "generated", videos / "late", PROTOCOL, models,
                                  metrics="sync", progress=False)
  assert set(in_sync["metrics"]) == {"sync"}
  for aligned, delayed in zip(in_sync["per_video"], late["per_video"]):
    assert aligned["sync"]["generated"]["offset"] == 0
    assert aligned["sync"]["generated"]["sync_c"] > 0.3
    # The ground truth's speech drives both sides: 3 frames late, both offsets move by 3.
    assert delayed["sync"]["generated"]["offset"] == -3
    assert delayed["sync"]["reference"]["offset"] == -3


def test_bad_input_is_one_message(models, videos, tmp_path, capsys):
  base = ["eval", "--protocol", "hdtf", "--models", str(models), "--no-progress"]
  (tmp_path / "one").mkdir()
  media.write_video_file(tmp_path / "one" / "other.mp4", np.zeros((8, 32, 32, 3), np.uint8),
                         fps=25)
  cases = [
      (["--generated", str(tmp_path / "one"), "--reference", str(videos / "reference")],
       "no partner"),
      (["--generated", str(videos / "generated"), "--reference", str(tmp_path / "absent")],
       "does not exist"),
      (["--generated", str(videos / "generated")], "give --generated DIR and --reference DIR"),
      (["--checkpoint", str(tmp_path)], "go together"),
      (["--generated", str(videos / "generated"), "--reference", str(videos / "reference"),
        "--metrics", "fid,lpips"], "choose from"),
  ]
  for arguments, message in cases:
    assert cli.main(base + arguments) == 2, arguments
    assert message in capsys.readouterr().err, arguments
  # The same command succeeds on good input: the table on stdout, the report at --out.
  assert cli.main(base + ["--generated", str(videos / "generated"), "--reference",
                          str(videos / "generated"), "--metrics", "fid",
                          "--out", str(tmp_path / "fid.json")]) == 0
  assert "FID" in capsys.readouterr().out
  assert abs(json.loads((tmp_path / "fid.json").read_text())["metrics"]["fid"]["value"]) < 1e-6
  empty_models = tmp_path / "models"
  (empty_models / "inception").mkdir(parents=True)
  assert cli.main(["eval", "--protocol", "mead", "--models", str(empty_models), "--generated",
                   str(videos / "generated"), "--reference", str(videos / "reference"),
                   "--out", str(tmp_path / "report.json")]) == 2
  error = capsys.readouterr().err
  assert "etalk convert i3d" in error and "etalk convert face3d" in error
  assert "convert inception" not in error
  assert not (tmp_path / "report.json").exists()


def test_checkpoint_generates_the_split_then_measures_it(models, tmp_path):
  """`etalk eval --checkpoint --data`: the test split's clips generated by a (tiny, random)
  pipeline at the protocol's length, their ground truth cut alike, both measured; a second run
  keeps the videos it finds."""
  checkpoint = save_pipeline(tmp_path / "pipeline", **tiny_components())
  dataset = synthetic_talking_heads.build(str(tmp_path / "data"), "tiny")
  clips = len(data_source(dataset, "test"))
  generated, reference = command.generate_split(checkpoint, dataset, "test", PROTOCOL,
                                                tmp_path / "eval", progress=False)
  names = sorted(path.name for path in generated.iterdir())
  assert len(names) == clips >= 1 and names == sorted(p.name for p in reference.iterdir())
  for name in names:
    for folder in (generated, reference):
      assert media.probe(folder / name).has_audio, (folder, name)
      # The 48-frame clips cut to the protocol's 30.
      assert len(list(media.iter_video_frames(folder / name))) == FRAMES, (folder, name)
  written = {name: (generated / name).stat().st_mtime_ns for name in names}
  command.generate_split(checkpoint, dataset, "test", PROTOCOL, tmp_path / "eval",
                         progress=False)
  assert {name: (generated / name).stat().st_mtime_ns for name in names} == written
  # The tiny set holds out one clip: FID over its frames (FVD would need two videos a side).
  report = command.evaluate_folders(generated, reference, PROTOCOL, models, metrics="fid",
                                    progress=False)
  assert report["videos"] == clips and report["metrics"]["fid"]["value"] > 0
  assert report["metrics"]["fid"]["samples"] == {"generated": clips * FRAMES,
                                                 "reference": clips * FRAMES}
  with pytest.raises(UserError, match="no 'validation' clips|validation"):
    command.generate_split(checkpoint, dataset, "validation", PROTOCOL, tmp_path / "other",
                           progress=False)
