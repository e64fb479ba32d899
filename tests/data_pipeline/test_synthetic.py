"""Synthetic talking faces: determinism, exact ground truth, and the builder's records."""

import sys

import numpy as np
import pytest

from data_pipeline import EMOTIONS, SAMPLES_PER_FRAME, faces, loader, media, prepare, synthetic
from data_pipeline.builders import synthetic_talking_heads


def test_clip_is_deterministic_and_ground_truth_matches_what_was_drawn():
  identity = synthetic.make_identity(3, seed=7)
  first = synthetic.make_clip(identity, "happy", 2, num_frames=30, resolution=64, seed=7)
  second = synthetic.make_clip(identity, "happy", 2, num_frames=30, resolution=64, seed=7)
  for name in ("frames", "audio", "landmarks", "mouth_open", "eye_open", "pose"):
    np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
  assert first.frames.shape == (30, 64, 64, 3) and first.audio.shape == (30 * SAMPLES_PER_FRAME,)
  # The mouth measured on the drawn landmarks follows the stored opening exactly (a monotone map).
  measured = faces.mouth_opening(first.landmarks)
  assert np.corrcoef(measured, first.mouth_open)[0, 1] > 0.98
  # Pixels: an open mouth shows the dark cavity inside the inner-lip contour.
  widest = int(np.argmax(first.mouth_open))
  assert first.mouth_open[widest] > 0.3


def test_mouth_opens_only_while_there_is_sound():
  clip = synthetic.make_clip(synthetic.make_identity(0), "neutral", 1, num_frames=100,
                             resolution=64)
  loudness = np.sqrt((clip.audio.astype(np.float64).reshape(100, SAMPLES_PER_FRAME) ** 2)
                     .mean(axis=1))
  silent, open_mouth = loudness < 1.0, clip.mouth_open > 0.2
  assert silent.any() and open_mouth.any()
  assert not (silent & open_mouth).any()
  assert np.corrcoef(loudness, clip.mouth_open)[0, 1] > 0.6


def test_emotions_change_face_and_voice():
  identity = synthetic.make_identity(1)
  clips = {emotion: synthetic.make_clip(identity, emotion, 3, num_frames=50, resolution=64)
           for emotion in EMOTIONS}
  brow_height = {e: (c.landmarks[:, list(faces.RIGHT_BROW), 1].mean()
                     - c.landmarks[:, 159, 1].mean())
                 for e, c in clips.items()}
  # y grows downwards.
  assert brow_height["surprised"] < brow_height["neutral"] < brow_height["angry"]
  corner = {e: c.landmarks[:, list(faces.MOUTH_CORNERS), 1].mean() - c.landmarks[:, 13, 1].mean()
            for e, c in clips.items()}
  assert corner["happy"] < corner["neutral"] < corner["sad"]
  energy = {e: np.abs(c.audio.astype(np.float64)).mean() for e, c in clips.items()}
  assert energy["angry"] > energy["neutral"] > energy["sad"]
  assert len({c.frames.tobytes() for c in clips.values()}) == len(EMOTIONS)


def test_identities_differ():
  a, b = synthetic.make_identity(0), synthetic.make_identity(1)
  assert a != b and synthetic.make_identity(0) == a


def test_builder_writes_records_without_tensorflow(tmp_path):
  dataset_dir = synthetic_talking_heads.build(str(tmp_path), "tiny")
  train, test = loader.data_source(dataset_dir, "train"), loader.data_source(dataset_dir, "test")
  assert len(train) + len(test) == 8 and len(test) == 1
  record = train[0]
  assert record["landmarks"].shape == (48, 478, 2) and record["landmarks"].dtype == np.float16
  assert record["audio"].shape == (48 * SAMPLES_PER_FRAME,)
  assert record["mouth_open"].shape == (48,) and record["pose"].shape == (48, 6)
  frames = media.decode_frames(record["video"])
  assert frames.shape == (48, 64, 64, 3)
  assert "tensorflow" not in sys.modules


@pytest.mark.slow
def test_mead_layout_round_trip(tmp_path):
  spec = synthetic.SyntheticSpec(identities=1, emotions=("fearful",), levels=(2,), num_frames=30,
                                 resolution=64)
  paths = synthetic.write_mead_layout(tmp_path, spec, progress=False)
  assert (paths[0].relative_to(tmp_path).as_posix()
          == "synthetic_000/video/front/fear/level_2/001.mp4")
  item, = prepare.list_videos(tmp_path, "mead")
  assert ((item.speaker, item.emotion, item.level) == ("synthetic_000", "fearful", 2)
          and item.audio_path)
  audio, _ = media.read_audio(item.audio_path)
  assert abs(len(audio) - 30 * SAMPLES_PER_FRAME) < 2048


def test_head_motion_scale_scales_the_movement_only():
  identity = synthetic.make_identity(2)
  full = synthetic.make_clip(identity, "angry", 3, num_frames=40, resolution=64)
  calm = synthetic.make_clip(identity, "angry", 3, num_frames=40, resolution=64,
                             head_motion_scale=0.3)
  np.testing.assert_array_equal(full.audio, calm.audio)
  np.testing.assert_array_equal(full.mouth_open, calm.mouth_open)
  movement = lambda clip: clip.pose - clip.pose.mean(axis=0)  # the held head pitch is not movement
  np.testing.assert_allclose(movement(calm), 0.3 * movement(full), atol=1e-5)
  spec = synthetic.SyntheticSpec(identities=1, emotions=("angry",), levels=(3,), num_frames=40,
                                 head_motion=0.3)
  np.testing.assert_array_equal(spec.make_clip(identity, "angry", 3, 0).frames, calm.frames)


def test_face_scale_frames_the_face_tighter():
  identity = synthetic.make_identity(3)
  crop = synthetic.make_clip(identity, "happy", 2, num_frames=20, resolution=64)
  close = synthetic.make_clip(identity, "happy", 2, num_frames=20, resolution=64, face_scale=1.5)
  np.testing.assert_array_equal(crop.mouth_open, close.mouth_open)
  def centred(clip):
    return clip.landmarks - clip.landmarks.mean(axis=1, keepdims=True)
  # Landmarks move away from the face centre by the scale; frames show it.
  np.testing.assert_allclose(centred(close), 1.5 * centred(crop), atol=1e-5)
  assert 0.0 <= close.landmarks.min() and close.landmarks.max() <= 1.0
  def skin(clip):  # the fraction of the first frame's pixels drawn in the skin's colour
    return np.mean(np.all(clip.frames[0] == np.array(identity.skin, np.uint8), axis=-1))
  assert 1.8 < skin(close) / skin(crop) < 2.7
  spec = synthetic.SyntheticSpec(identities=1, emotions=("happy",), levels=(2,), num_frames=20,
                                 face_scale=1.5)
  np.testing.assert_array_equal(spec.make_clip(identity, "happy", 2, 0).frames, close.frames)
