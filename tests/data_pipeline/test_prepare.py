"""`etalk prepare` end to end on small videos made from the astronaut portrait (MediaPipe finds
her), with a click track for audio alignment, plus broken inputs that must be skipped and
counted."""

import fractions
import json
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("mediapipe",
                    reason="face detection needs the `faces` extra (mediapipe==0.10.14)")
import av  # noqa: E402
import skimage.data as skimage_data  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipeline import SAMPLE_RATE, SAMPLES_PER_FRAME, loader, media, prepare  # noqa: E402
from data_pipeline.builders import real  # noqa: E402
from etalk_jax.cli import main

RESOLUTION = 64
CLICK_EVERY_FRAMES = 8
CLICK_OFFSET_FRAMES = 3


def _astronaut_frames(count: int, size: int = 192, fps: float = 25.0,
                      width: int | None = None) -> np.ndarray:
  """The portrait's head region, panning a few pixels per frame (so every frame differs): size²
  frames, or width x size from a region widened to the same aspect (not stretched)."""
  image = skimage_data.astronaut()
  width = width or size
  half = int(round(150 * width / size))  # half the region's width; its height is 300
  frames = []
  for index in range(count):
    dx = int(12 * np.sin(2 * np.pi * 0.5 * index / fps))
    dy = int(6 * np.cos(2 * np.pi * 0.3 * index / fps))
    crop = image[20 + dy:320 + dy, 240 - half + dx:240 + half + dx]
    frames.append(np.asarray(Image.fromarray(crop).resize((width, size),
                                                          Image.Resampling.BILINEAR)))
  return np.stack(frames)


# The two-face video: a 128² copy of the head at the left, in this many columns.
SMALL_FACE_WIDTH = 144


def _two_astronauts(count: int) -> np.ndarray:
  """Two faces: a large copy of the head (right) and a small one (left) that enters at frame 1,
  like a passer-by. MediaPipe then lists the small face first in every later frame, so a pipeline
  taking the first face it is given would follow the wrong one."""
  frames = np.zeros((count, 192, SMALL_FACE_WIDTH + 192, 3), np.uint8)
  frames[1:, 32:160, :128] = _astronaut_frames(count, size=128)[1:]
  frames[:, :, SMALL_FACE_WIDTH:] = _astronaut_frames(count)
  return frames


def _click_track(seconds: float) -> np.ndarray:
  """Silence with a 40-sample click at the start of every 8th frame (from frame 3): frame i's audio
  is the audio at i / 25 s, so clicks must land at known sample offsets of a window."""
  audio = np.zeros(int(seconds * SAMPLE_RATE), np.int16)
  for frame in range(CLICK_OFFSET_FRAMES, int(seconds * 25), CLICK_EVERY_FRAMES):
    audio[frame * SAMPLES_PER_FRAME:frame * SAMPLES_PER_FRAME + 40] = 24000
  return audio


def _write_variable_rate(path, frames: np.ndarray, audio: np.ndarray) -> None:
  """An mp4 with irregular frame timestamps (about 30 fps, jittered) and an AAC track."""
  timestamps_ms = np.cumsum(np.r_[0, np.random.default_rng(0).integers(25, 42, len(frames) - 1)])
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w", format="mp4") as container:
    video = container.add_stream("libx264", rate=30)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    video.codec_context.time_base = fractions.Fraction(1, 1000)
    sound = container.add_stream("aac", rate=SAMPLE_RATE)
    sound.layout = "mono"
    for frame_array, stamp in zip(frames, timestamps_ms):
      frame = av.VideoFrame.from_ndarray(frame_array, format="rgb24")
      frame.pts, frame.time_base = int(stamp), fractions.Fraction(1, 1000)
      for packet in video.encode(frame):
        container.mux(packet)
    for packet in video.encode():
      container.mux(packet)
    samples = (audio.astype(np.float32) / 32768).reshape(1, -1)
    for begin in range(0, samples.shape[1], 1024):
      chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, begin:begin + 1024]),
                                         format="fltp", layout="mono")
      chunk.sample_rate, chunk.pts = SAMPLE_RATE, begin
      for packet in sound.encode(chunk):
        container.mux(packet)
    for packet in sound.encode(None):
      container.mux(packet)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  dst = tmp_path_factory.mktemp("dst")
  seconds = 2.0
  frames = _astronaut_frames(int(seconds * 25))
  audio = _click_track(seconds)
  media.write_video_file(src / "alice" / "take1.mp4", frames, audio)
  media.write_video_file(src / "alice" / "take2.mp4", frames[::-1].copy(), audio)
  _write_variable_rate(src / "bob" / "vfr.mp4", _astronaut_frames(60, fps=30.0),
                       _click_track(seconds))
  media.write_video_file(src / "carol" / "silent.mp4", frames)  # no audio track
  (src / "dave").mkdir()
  (src / "dave" / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(5000))
  (src / "dave" / "empty.mp4").write_bytes(b"")
  good = (src / "alice" / "take1.mp4").read_bytes()
  (src / "dave" / "truncated.mp4").write_bytes(good[:len(good) // 2])
  # A 12x12 px video.
  media.write_video_file(src / "erin" / "tiny.mp4", frames[:, :48:4, :48:4].copy(), audio)
  media.write_video_file(src / "frank" / "two_faces.mp4", _two_astronauts(len(frames)), audio)
  # Odd, non-square: H.264 4:4:4 (4:2:0 cannot store odd sizes).
  media.write_video_file(src / "grace" / "odd.mp4",
                         _astronaut_frames(len(frames), size=193, width=257), audio)
  report = real.prepare_command(str(src), "folder", str(dst), RESOLUTION, clip_frames=40,
                                min_clip_frames=20, progress=False)
  return src, dst, report


def test_report_counts_every_input(prepared):
  _, dst, report = prepared
  assert report == json.loads((dst / real.REPORT_NAME).read_text())
  assert report["videos"] == 10
  assert report["videos_ok"] == 5, report["skipped_files"]
  assert report["skipped_by_reason"] == {"unreadable": 3, "no_audio": 1, "too_small": 1}
  reasons = {item["source"]: item["reason"] for item in report["skipped_files"]}
  assert "empty file" in reasons["dave/empty.mp4"]
  assert "no audio stream" in reasons["carol/silent.mp4"]
  # 50 frames per good video at 25 fps, cut into clips of at most 40 (two of 25).
  assert sum(report["clips"].values()) == 10
  assert report["clips"]["test"] == 1  # 10% of 10 clips
  assert report["notes"] == ["frank/two_faces.mp4: 2 faces seen; the largest was tracked"]
  assert "tensorflow" not in sys.modules


def _clips_of(dst, source: str) -> list[tuple[np.ndarray, dict]]:
  """(decoded crop frames, the clip's npz arrays) of each clip prepared from one source video."""
  work = dst / prepare.WORK_DIR_NAME / "talking_heads-res64"
  result = next(r for r in map(json.loads, (p.read_text() for p in work.glob("*/result.json")))
                if r["source"] == source)
  assert result["status"] == "ok", result
  folder = work / result["directory"]
  return [(media.decode_frames((folder / f"{clip['file']}.mp4").read_bytes()),
           dict(np.load(folder / f"{clip['file']}.npz"))) for clip in result["clips"]]


def test_several_faces_take_the_largest(prepared):
  _, dst, _ = prepared
  clips = _clips_of(dst, "frank/two_faces.mp4")
  assert len(clips) == 2
  for frames, arrays in clips:
    box = arrays["crop_box"].astype(np.float64)
    # Back to source pixels.
    points = arrays["landmarks"].astype(np.float64) * (box[2] - box[0]) + box[:2]
    # Every landmark on the large (right) face, and a crop sized for it: that face spans ~60 of
    # 192 px (the small copy ~40), enlarged 1.9x.
    assert points[..., 0].min() > SMALL_FACE_WIDTH, points[..., 0].min()
    assert SMALL_FACE_WIDTH < (box[0] + box[2]) / 2 < SMALL_FACE_WIDTH + 192
    assert box[2] - box[0] > 100
    assert frames.shape == (len(arrays["landmarks"]), RESOLUTION, RESOLUTION, 3)


def test_odd_resolution_source(prepared):
  src, dst, _ = prepared
  info = media.probe(src / "grace" / "odd.mp4")
  assert (info.width, info.height) == (257, 193)
  clips = _clips_of(dst, "grace/odd.mp4")
  assert [len(frames) for frames, _ in clips] == [25, 25]
  for frames, arrays in clips:
    # A picture, not padding.
    assert frames.shape[1:] == (RESOLUTION, RESOLUTION, 3) and frames.std() > 10
    assert arrays["audio"].shape == (len(frames) * SAMPLES_PER_FRAME,)
    box = arrays["crop_box"].astype(np.float64)
    points = arrays["landmarks"].astype(np.float64) * (box[2] - box[0]) + box[:2]
    assert 0 < points[..., 0].min() and points[..., 0].max() < 257
    assert 0 < points[..., 1].min() and points[..., 1].max() < 193
    assert 0.05 < arrays["landmarks"].min() and arrays["landmarks"].max() < 0.95


def test_loader_windows_are_aligned_with_audio(prepared):
  _, _, report = prepared
  config = loader.LoaderConfig(window=16, batch_size=1, num_workers=0, seed=1, shard_index=0,
                               shard_count=1, with_pdfgc=True)
  iterator = iter(loader.make_dataset(report["dataset_dir"], "train", config))
  context = config.audio_context_frames
  for _ in range(5):
    batch = next(iterator)
    assert batch["frames"].shape == (1, 16, RESOLUTION, RESOLUTION, 3)
    assert batch["audio"].shape == (1, (16 + 2 * context) * SAMPLES_PER_FRAME)
    assert batch["face_mask"].shape == batch["lip_mask"].shape == (1, RESOLUTION, RESOLUTION)
    assert batch["face_mask"].sum() > batch["lip_mask"].sum() > 0
    assert batch["landmarks"].shape == (1, 16, 478, 2)
    assert batch["pdfgc"].shape == (1, 16, 224, 224, 3) and batch["pdfgc"].std() > 10
    assert 0.0 < batch["landmarks"].min() and batch["landmarks"].max() < 1.0
    start = int(batch["start"][0])
    clip_start = int(batch["clip_start_frame"][0])
    audio = np.abs(batch["audio"][0])
    for frame in range(start - context, start + 16 + context):
      source_frame = clip_start + frame
      if source_frame % CLICK_EVERY_FRAMES == CLICK_OFFSET_FRAMES:
        at = (frame - (start - context)) * SAMPLES_PER_FRAME
        region = audio[max(at - 320, 0):at + 320]
        peak = int(np.argmax(region)) + max(at - 320, 0)
        assert region.max() > 0.3
        assert abs(peak - (at + 20)) < 80, (batch["clip_id"][0], frame, peak - at)


def test_rerun_reuses_the_dataset_and_cached_videos(prepared):
  src, dst, report = prepared
  again = real.prepare_command(str(src), "folder", str(dst), RESOLUTION, clip_frames=40,
                               min_clip_frames=20, progress=False)
  assert again["already_prepared"] and again["clips"] == report["clips"]
  work = dst / prepare.WORK_DIR_NAME / "talking_heads-res64"
  results = {p.parent.name: json.loads(p.read_text()) for p in work.glob("*/result.json")}
  assert len(results) == 10 and not list(work.glob(".*tmp*"))
  # A crash after the per-video work: the dataset folder is gone, the cache is reused (same
  # results).
  shutil.rmtree(dst / "talking_heads")
  rebuilt = real.prepare_command(str(src), "folder", str(dst), RESOLUTION, clip_frames=40,
                                 min_clip_frames=20, progress=False)
  assert rebuilt["clips"] == report["clips"]
  assert {p.parent.name: json.loads(p.read_text()) for p in work.glob("*/result.json")} == results


def test_cli_prepare_and_synthesize(prepared, tmp_path, capsys):
  src, dst, _ = prepared
  assert main(["prepare", "--src", str(src), "--layout", "folder", "--dst", str(dst),
               "--resolution", str(RESOLUTION), "--clip-frames", "40", "--min-clip-frames", "20",
               "--no-progress"]) == 0  # the fixture's dataset: reused, nothing redone
  assert "already prepared" in capsys.readouterr().out
  assert main(["prepare", "--src", str(tmp_path / "absent"), "--layout", "folder", "--dst",
               str(tmp_path / "out"), "--no-progress"]) == 2
  assert "etalk prepare: error:" in capsys.readouterr().err
  assert main(["synthesize", "--dst", str(tmp_path / "synthetic"), "--config", "tiny"]) == 0
  assert "dataset:" in capsys.readouterr().out
