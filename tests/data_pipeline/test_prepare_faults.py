"""`etalk prepare` under faults and unusual inputs (issue 21, item 2).

- Every video skipped: one message naming prepare_report.json and the commonest reasons, exit 2,
  the report written, no dataset. One clip in all: train only (TFDS cannot write an empty test
  split); MEAD's short clips all left out of train: one message saying so.
- MediaPipe missing (`sys.modules["mediapipe"] = None`): one message naming the `faces` extra
  before any work (nothing under --dst), instead of every video "skipped" for it.
- SIGKILLed in the middle of a video's face pass, of its crop encoding, and of TFDS writing the
  shards (tests/helpers/prepare_kill_worker.py), each time started again: the finished videos are
  not redone, and the records equal an uninterrupted run's.
- Unusual inputs (tests/helpers/prepare_inputs.py writes them with PyAV): variable frame rate, a
  display matrix (phone footage stored sideways), odd 4:2:0 sizes (VP9 in WebM, Opus), 8 kHz audio,
  44.1 kHz stereo with the speech in one channel, 2 s without audio packets: each prepared, the
  crops equal to cropping the picture as it is meant to be shown, the audio's clicks at their
  frames. A silent track is skipped with its reason.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import faces, media, prepare
from data_pipeline.builders import real
from etalk_jax.cli import main
from etalk_jax.errors import MissingDependency, UserError
from tests.helpers import prepare_inputs as inputs, prepare_kill_worker as worker

HAS_MEDIAPIPE = importlib.util.find_spec("mediapipe") is not None  # the `faces` extra
requires_faces = pytest.mark.skipif(not HAS_MEDIAPIPE,
                                    reason="face detection needs the `faces` extra")
REPO = Path(__file__).resolve().parents[2]
RESOLUTION = worker.RESOLUTION


def _prepare(src: Path, dst: Path) -> dict:
  return real.prepare_command(str(src), "folder", str(dst), RESOLUTION, **worker.OPTIONS)


def _cli(src: Path, dst: Path) -> list[str]:
  return ["prepare", "--src", str(src), "--layout", "folder", "--dst", str(dst), "--resolution",
          str(RESOLUTION), "--clip-frames", str(worker.OPTIONS["clip_frames"]),
          "--min-clip-frames", str(worker.OPTIONS["min_clip_frames"]), "--no-progress"]


def _good_video(path: Path, frames: int = 30) -> Path:
  return inputs.write_video(path, inputs.astronaut_frames(frames),
                            audio=inputs.click_track(frames / 25))


def _results(dst: Path) -> dict[str, dict]:
  """Each source's per-video result (result.json in the work folder)."""
  work = dst / prepare.WORK_DIR_NAME / f"talking_heads-res{RESOLUTION}"
  return {result["source"]: result
          for result in (json.loads(p.read_text()) for p in work.glob("*/result.json"))}


# ---------------------------------------------------------------------------- everything skipped

def test_everything_skipped_is_one_message_with_the_report(tmp_path, capsys, monkeypatch):
  src, dst = tmp_path / "src", tmp_path / "dst"
  (src / "a").mkdir(parents=True)
  (src / "a" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  (src / "a" / "empty.mp4").write_bytes(b"")
  frames = inputs.astronaut_frames(30)
  inputs.write_video(src / "b" / "no_audio.mp4", frames)
  inputs.write_video(src / "b" / "silent.mp4", frames, audio=np.zeros(30 * 640, np.float32))
  # Neither of these needs MediaPipe (all skipped before faces are looked for), but the run checks
  # that it is installed first: stand in for it where it is not.
  monkeypatch.setattr(faces, "require_mediapipe", lambda: None)

  assert main(_cli(src, dst)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith("etalk prepare: error: nothing prepared: all 4 videos in")
  assert "(unreadable: 2, no_audio: 1, silent_audio: 1)" in err
  assert f"e.g. {src / 'a' / 'empty.mp4'}: empty file (0 bytes)" in err
  assert err.endswith(f"every file's reason is in {dst / real.REPORT_NAME}")
  report = json.loads((dst / real.REPORT_NAME).read_text())
  assert report["videos"] == 4 and report["videos_skipped"] == 4 and report["clips"] == {}
  assert report["dataset_dir"] is None
  reasons = {item["source"]: item["reason"] for item in report["skipped_files"]}
  assert "the audio track is silent" in reasons["b/silent.mp4"]
  assert "no audio stream" in reasons["b/no_audio.mp4"]
  assert not (dst / "talking_heads" / f"res{RESOLUTION}" / "1.0.0").exists()

  # From Python: the same message as a UserError carrying the report.
  with pytest.raises(prepare.NothingPrepared, match="every file's reason is in") as raised:
    _prepare(src, dst)
  assert isinstance(raised.value, UserError) and raised.value.report["videos_skipped"] == 4


@requires_faces
def test_one_clip_in_all_writes_train_only_and_mead_says_why_nothing_was_kept(tmp_path, capsys):
  # One clip: 10% of one is none, so no test split (TFDS cannot write an empty one).
  src = tmp_path / "src"
  _good_video(src / "a" / "take.mp4")
  report = _prepare(src, tmp_path / "dst")
  assert report["clips"] == {"train": 1}
  assert list(_records(report["dataset_dir"])) == ["train"]
  # MEAD keeps clips under 120 frames out of train: that one clip leaves nothing to write.
  mead = tmp_path / "mead"
  _good_video(mead / "M003" / "video" / "front" / "happy" / "level_1" / "001.mp4")
  arguments = _cli(mead, tmp_path / "mead_dst")
  arguments[arguments.index("folder")] = "mead"
  capsys.readouterr()  # TFDS's progress bars from the run above
  assert main(arguments) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith(f"etalk prepare: error: nothing prepared: no clip of {mead} was kept: "
                        "1 usable video(s) gave 1 clip(s), all of them shorter than 120 frames")
  report = json.loads((tmp_path / "mead_dst" / real.REPORT_NAME).read_text())
  assert report["clips_dropped_short_from_train"] == 1 and report["videos_ok"] == 1


# ---------------------------------------------------------------------------- missing dependency

def test_missing_mediapipe_is_one_message_before_any_work(tmp_path, capsys, monkeypatch):
  src, dst = tmp_path / "src", tmp_path / "dst"
  _good_video(src / "a" / "take.mp4")
  monkeypatch.setitem(sys.modules, "mediapipe", None)  # `import mediapipe` raises ImportError

  assert main(_cli(src, dst)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert "face detection needs MediaPipe" in err and "pip install 'etalk-jax[faces]'" in err
  assert not dst.exists()  # no work folder, no report, no cached "skipped" result

  # The builder alone (no command around it) stops the same way, and caches nothing.
  builder = real.builder_for("folder", src, dst, prepare.PrepareOptions(resolution=RESOLUTION),
                             progress=False)
  with pytest.raises(MissingDependency, match=r"etalk-jax\[faces\]"):
    builder.download_and_prepare()
  assert not (dst / prepare.WORK_DIR_NAME).exists() or not list(
      (dst / prepare.WORK_DIR_NAME).rglob("result.json"))


# ------------------------------------------------------------------------------ kill and restart

def _run_worker(src: Path, dst: Path, kill: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "tests.helpers.prepare_kill_worker", str(src),
                         str(dst), kill], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": str(REPO)})


def _records(dataset_dir: str) -> dict[str, dict[str, dict]]:
  """split -> clip_id -> the record's fields, as the loader reads them."""
  builder = tfds.builder_from_directory(dataset_dir)
  out = {}
  for split, source in builder.as_data_source().items():
    out[split] = {}
    for index in range(len(source)):
      record = source[index]
      out[split][record["clip_id"].decode()] = record
  return out


def _assert_same_records(ours: dict, theirs: dict) -> None:
  assert ours.keys() == theirs.keys()
  for split in ours:
    assert ours[split].keys() == theirs[split].keys(), split
    for clip_id, record in ours[split].items():
      other = theirs[split][clip_id]
      assert record.keys() == other.keys()
      for field, value in record.items():
        if isinstance(value, np.ndarray):
          np.testing.assert_array_equal(value, other[field], err_msg=f"{clip_id} {field}")
        else:
          assert value == other[field], (clip_id, field)


@requires_faces
def test_killed_runs_resume_from_the_cache_and_write_the_same_records(tmp_path,
                                                                     monkeypatch):
  src = tmp_path / "src"
  for name in ("a/one.mp4", "a/two.mp4", "b/three.mp4"):
    _good_video(src / name)
  uninterrupted = _prepare(src, tmp_path / "reference")
  assert uninterrupted["clips"] == {"train": 2, "test": 1}

  dst = tmp_path / "dst"
  work = dst / prepare.WORK_DIR_NAME / f"talking_heads-res{RESOLUTION}"
  # 1. Killed in the middle of the second video's face pass (30 frames a video).
  killed = _run_worker(src, dst, "frame:45")
  assert killed.returncode == -9, killed.stderr[-2000:]
  finished = {p: p.stat().st_mtime_ns for p in work.glob("*/result.json")}
  assert len(finished) == 1 and len(list(work.glob(".*.tmp-*"))) == 1  # one done, one half-done
  # 2. Restarted, killed in the middle of the third video's crop encoding (the restart encodes
  # the second and third: 30 frames each).
  killed = _run_worker(src, dst, "encode:45")
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert len(list(work.glob("*/result.json"))) == 2
  assert len(list(work.glob(".*.tmp-*"))) == 1  # the first run's half-done folder was removed
  assert {p: p.stat().st_mtime_ns for p in finished} == finished  # the finished one not redone
  finished = {p: p.stat().st_mtime_ns for p in work.glob("*/result.json")}
  # 3. Restarted, killed while TFDS writes the shards (every video done by then).
  killed = _run_worker(src, dst, "example:2")
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert len(list(work.glob("*/result.json"))) == 3 and not list(work.glob(".*.tmp-*"))
  assert {p: p.stat().st_mtime_ns for p in finished} == finished
  assert not (dst / "talking_heads" / f"res{RESOLUTION}" / "1.0.0").exists()
  finished = {p: p.stat().st_mtime_ns for p in work.glob("*/result.json")}
  # 4. Restarted: runs to the end.
  done = _run_worker(src, dst, "none")
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads((dst / real.REPORT_NAME).read_text())
  assert report["clips"] == uninterrupted["clips"]
  assert {p: p.stat().st_mtime_ns for p in finished} == finished

  records = _records(report["dataset_dir"])
  assert sum(len(split) for split in records.values()) == 3
  _assert_same_records(records, _records(uninterrupted["dataset_dir"]))
  # A finished dataset is reported as such, MediaPipe or not.
  monkeypatch.setitem(sys.modules, "mediapipe", None)
  assert _prepare(src, dst)["already_prepared"]


# ------------------------------------------------------------------------------- unusual inputs

# Display transforms as PyAV writes them: (counter-clockwise degrees, hflip, vflip).
DISPLAY_TRANSFORMS = [(90, False, False), (-90, False, False), (180, False, False),
                      (90, True, False), (0, False, True)]


@pytest.mark.parametrize("rotation, hflip, vflip", DISPLAY_TRANSFORMS)
def test_frames_come_out_as_the_display_matrix_shows_them(tmp_path, rotation, hflip, vflip):
  # Asymmetric (a gradient and a block in one corner), so every wrong turn or mirror shows.
  picture = np.zeros((4, 48, 32, 3), np.uint8)
  picture[..., 0] = np.linspace(0, 255, 32)[None, None, :]
  picture[:, :12, :8, 1] = 255
  path = inputs.write_video(tmp_path / "turned.mp4", picture, rotation=rotation, hflip=hflip,
                            vflip=vflip)
  frames = np.stack(list(media.iter_video_frames(path)))
  assert frames.shape == picture.shape
  assert np.abs(frames.astype(int) - picture).mean() < 6


def test_variable_rate_frames_are_the_nearest_in_time(tmp_path):
  # Each source frame a flat grey level = its index, at jittered times (about 30 fps).
  stamps = np.cumsum(np.r_[0, np.random.default_rng(0).integers(20, 45, 39)])
  picture = np.repeat(np.arange(40, dtype=np.uint8)[:, None, None, None] * 6, 16, 1)
  picture = np.ascontiguousarray(np.broadcast_to(picture, (40, 16, 16, 3)))
  path = inputs.write_video(tmp_path / "vfr.mp4", picture, timestamps_ms=stamps)
  frames = np.stack(list(media.iter_video_frames(path)))
  source = np.round(frames[:, 8, 8].astype(float).mean(axis=1) / 6).astype(int)
  slots = np.arange(len(frames)) * 40  # ms
  expected = np.abs(slots[:, None] - stamps[None, :]).argmin(axis=1)
  # Ties (a slot exactly between two frames) may go either way.
  assert len(frames) == int(stamps[-1] / 40 + 0.5) + 1
  tie = np.isclose(np.abs(slots - stamps[source]), np.abs(slots - stamps[expected]))
  assert np.all((source == expected) | ((np.abs(source - expected) == 1) & tie))


def test_audio_gap_becomes_silence(tmp_path):
  seconds, gap = 3.0, (0.4, 2.4)
  path = inputs.write_video(tmp_path / "gap.mp4", inputs.astronaut_frames(4, 32),
                            audio=inputs.click_track(seconds, silent=gap), audio_gap=gap)
  audio, start = media.read_audio(path)
  assert start == 0.0 and abs(len(audio) - seconds * 16000) < 1024
  _assert_clicks(audio[:int(seconds * 16000)], 0, int(seconds * 25), silent=gap)


def _assert_clicks(audio: np.ndarray, first_frame: int, frames: int, silent=None,
                   min_peak: int = 6000) -> None:
  """Each click frame of [first_frame, first_frame + frames) has its click within 5 ms of where
  the click track put it, and the audio is quiet in `silent` (seconds)."""
  assert audio.shape == (frames * 640,)
  magnitude = np.abs(audio.astype(np.int32))
  centre = int(inputs.CLICK_SECONDS * 16000 / 2)
  for frame in inputs.click_frames((first_frame + frames) / 25):
    if frame < first_frame or (silent and silent[0] <= frame / 25 < silent[1]):
      continue
    at = (frame - first_frame) * 640
    lo = max(at - 320, 0)
    region = magnitude[lo:at + 320]
    assert region.max() > min_peak, (frame, region.max())
    peak = lo + int(np.argmax(region))
    assert abs(peak - (at + centre)) < 80, (frame, peak - at)
  if silent:
    lo = max(int(silent[0] * 16000) - first_frame * 640 + 800, 0)
    hi = int(silent[1] * 16000) - first_frame * 640 - 800
    if hi > lo:
      assert magnitude[lo:hi].max() < 200


# The unusual inputs, each (file, how it is written, the picture as it is meant to be shown at
# the output's 25 fps).
GAP = (0.4, 2.4)  # seconds of gap.mp4 without audio packets
VFR_STAMPS = np.cumsum(np.r_[0, np.random.default_rng(3).integers(25, 42, 35)])  # ~30 fps


def _unusual_inputs(src: Path) -> dict[str, np.ndarray]:
  shown = {}
  frames = inputs.astronaut_frames(30)
  # Variable rate: each source frame drawn at its own time.
  inputs.write_video(src / "vfr.mp4", inputs.astronaut_at(VFR_STAMPS / 1000), fps=30,
                     timestamps_ms=VFR_STAMPS, audio=inputs.click_track(1.3))
  slots = np.arange(int(VFR_STAMPS[-1] / 40 + 0.5) + 1) * 40
  shown["vfr.mp4"] = inputs.astronaut_at(
      VFR_STAMPS[np.abs(slots[:, None] - VFR_STAMPS[None]).argmin(axis=1)] / 1000)
  # A phone's portrait video: stored sideways, shown turned 90 degrees clockwise.
  shown["rotated.mp4"] = inputs.astronaut_frames(30, height=160, width=120)
  inputs.write_video(src / "rotated.mp4", shown["rotated.mp4"], rotation=-90,
                     audio=inputs.click_track(1.2))
  # Odd sizes in 4:2:0 (which x264 cannot write; VP9 can), Opus at 48 kHz.
  shown["odd.webm"] = inputs.astronaut_frames(30, height=241, width=321)
  inputs.write_video(src / "odd.webm", shown["odd.webm"], codec="libvpx-vp9",
                     audio=inputs.click_track(1.2, 48000), audio_rate=48000, audio_codec="libopus")
  shown["8khz.mp4"] = frames
  inputs.write_video(src / "8khz.mp4", frames, audio=inputs.click_track(1.2, 8000),
                     audio_rate=8000)
  # 44.1 kHz stereo, the speech in the left channel only (a lapel microphone on one side).
  shown["stereo.mp4"] = frames
  left = inputs.click_track(1.2, 44100)
  inputs.write_video(src / "stereo.mp4", frames, audio=np.stack([left, np.zeros_like(left)]),
                     audio_rate=44100)
  # 2 s without any audio packet (a recorder that sends nothing while it is quiet).
  shown["gap.mp4"] = inputs.astronaut_frames(75)
  inputs.write_video(src / "gap.mp4", shown["gap.mp4"],
                     audio=inputs.click_track(3.0, silent=GAP), audio_gap=GAP)
  # Silence all along (digital zeros): skipped, nothing to learn lip sync from.
  inputs.write_video(src / "silent.mp4", frames, audio=np.zeros(30 * 640, np.float32))
  return shown


@pytest.fixture(scope="module")
def unusual(tmp_path_factory):
  if not HAS_MEDIAPIPE:  # as requires_faces: a module fixture cannot carry the mark
    pytest.skip("face detection needs the `faces` extra")
  src, dst = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dst")
  shown = _unusual_inputs(src)
  report = _prepare(src, dst)
  return shown, report, _results(dst), dst


@pytest.mark.parametrize("name", ["vfr.mp4", "rotated.mp4", "odd.webm", "8khz.mp4", "stereo.mp4",
                                  "gap.mp4"])
def test_unusual_input_is_prepared(unusual, name):
  shown, _, results, dst = unusual
  result = results[name]
  assert result["status"] == "ok", result
  folder = dst / prepare.WORK_DIR_NAME / f"talking_heads-res{RESOLUTION}" / result["directory"]
  assert sum(clip["num_frames"] for clip in result["clips"]) == len(shown[name])
  height, width = shown[name].shape[1:3]
  for clip in result["clips"]:
    crops = media.decode_frames((folder / f"{clip['file']}.mp4").read_bytes())
    arrays = np.load(folder / f"{clip['file']}.npz")
    start, count = clip["start_frame"], clip["num_frames"]
    assert crops.shape == (count, RESOLUTION, RESOLUTION, 3)
    # The crop of the picture as it is meant to be shown, at the right times.
    box = arrays["crop_box"]
    expected = np.stack([faces.crop_frame(frame, box, RESOLUTION)
                         for frame in shown[name][start:start + count]])
    difference = np.abs(crops.astype(int) - expected).mean()
    assert difference < 8, difference
    # Upright: forehead above chin, in the frame as shown.
    points = arrays["landmarks"].astype(np.float64) * (box[2] - box[0]) + box[:2]
    assert (points[:, faces.CHIN, 1] - points[:, faces.FOREHEAD_TOP, 1]).min() > 0.15 * height
    assert points[..., 0].max() < width and points[..., 1].max() < height
    _assert_clicks(arrays["audio"], start, count, silent=GAP if name == "gap.mp4" else None,
                   min_peak=4000 if name == "stereo.mp4" else 6000)


def test_silent_track_is_skipped_with_its_reason(unusual):
  _, report, results, _ = unusual
  assert results["silent.mp4"]["category"] == "silent_audio"
  assert report["skipped_by_reason"] == {"silent_audio": 1}
  assert report["videos_ok"] == 6
  assert report["skipped_files"] == [{
    "source": "silent.mp4", "category": "silent_audio",
    "reason": "silent.mp4: the audio track is silent (loudest sample 0 of 32767); the pipeline "
              "learns lip sync from speech"}]
