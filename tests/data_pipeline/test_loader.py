"""Grain loader on the tiny synthetic dataset: windows, exact resume through Orbax, disjoint
shards."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_pipeline import EMOTION_LABELS, SAMPLES_PER_FRAME, faces, loader
from data_pipeline.builders import synthetic_talking_heads
from data_pipeline.media import NORMALIZE_EPS

WINDOW = 24


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  return synthetic_talking_heads.build(str(tmp_path_factory.mktemp("synthetic")), "tiny")


def _config(**overrides):
  settings = dict(window=WINDOW, batch_size=2, seed=5, num_workers=0, shard_index=0, shard_count=1)
  settings.update(overrides)
  return loader.LoaderConfig(**settings)


def test_window_contents(dataset_dir):
  batch = next(iter(loader.make_dataset(dataset_dir, "train", _config())))
  assert batch["frames"].shape == (2, WINDOW, 64, 64, 3) and batch["frames"].dtype == np.uint8
  assert batch["audio"].shape == (2, (WINDOW + 4) * SAMPLES_PER_FRAME)
  assert batch["reference"].shape == (2, 64, 64, 3)
  assert batch["mouth_open"].shape == (2, WINDOW) and batch["pose"].shape == (2, WINDOW, 6)
  source = loader.data_source(dataset_dir, "train")
  by_id = {source[i]["clip_id"].decode(): source[i] for i in range(len(source))}
  for row in range(2):
    record = by_id[str(batch["clip_id"][row])]
    start, reference = int(batch["start"][row]), int(batch["reference_index"][row])
    # The window is the record's frames/tracks/audio at `start`, with 2 frames of audio context.
    np.testing.assert_array_equal(batch["mouth_open"][row],
                                  record["mouth_open"][start:start + WINDOW])
    audio = np.zeros((48 + 4) * SAMPLES_PER_FRAME, np.float32)
    audio[2 * SAMPLES_PER_FRAME:-2 * SAMPLES_PER_FRAME] = record["audio"] / 32768.0
    np.testing.assert_array_equal(
        batch["audio"][row],
        audio[start * SAMPLES_PER_FRAME:(start + WINDOW + 4) * SAMPLES_PER_FRAME])
    assert not start <= reference < start + WINDOW
    face, lips = faces.face_and_lip_masks(
        record["landmarks"][reference].astype(np.float32) * 64, 64)
    np.testing.assert_array_equal(batch["face_mask"][row], face)
    np.testing.assert_array_equal(batch["lip_mask"][row], lips)
    # The reference's own landmarks (PD-FGC aligns it on them), the window's frames' their own.
    np.testing.assert_array_equal(batch["reference_landmarks"][row],
                                  record["landmarks"][reference].astype(np.float32))
    np.testing.assert_array_equal(batch["landmarks"][row],
                                  record["landmarks"][start:start + WINDOW].astype(np.float32))


def test_first_frame_references_and_utterance_stats(dataset_dir):
  keyframe = next(iter(loader.make_dataset(dataset_dir, "train", _config())))
  first = next(iter(loader.make_dataset(dataset_dir, "train", _config(reference="first"))))
  source = loader.data_source(dataset_dir, "train")
  by_id = {source[i]["clip_id"].decode(): source[i] for i in range(len(source))}
  np.testing.assert_array_equal(first["start"], keyframe["start"])  # the same windows
  np.testing.assert_array_equal(first["frames"], keyframe["frames"])
  assert np.all(first["reference_index"] == 0)
  for row in range(2):
    record = by_id[str(first["clip_id"][row])]
    face, lips = faces.face_and_lip_masks(record["landmarks"][0].astype(np.float32) * 64, 64)
    np.testing.assert_array_equal(first["lip_mask"][row], lips)
    # The whole clip's (mean, std): what inference normalises the utterance with.
    samples = record["audio"] / 32768.0
    np.testing.assert_allclose(first["utterance_stats"][row],
                               [samples.mean(), np.sqrt(samples.var() + NORMALIZE_EPS)], rtol=1e-5)
  with pytest.raises(ValueError, match="reference must be"):
    next(iter(loader.make_dataset(dataset_dir, "train", _config(reference="last"))))


def test_same_seed_same_batches_other_seed_other_batches(dataset_dir):
  take = lambda config: [next(it)  # noqa: E731
                         for it in [iter(loader.make_dataset(dataset_dir, "train", config))]
                         for _ in range(3)]
  first, again, other = take(_config()), take(_config()), take(_config(seed=6))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["frames"], b["frames"])
  assert any(not np.array_equal(a["start"], c["start"]) or list(a["clip_id"]) != list(c["clip_id"])
             for a, c in zip(first, other))


def test_epochs_are_reshuffled(dataset_dir):
  config = _config(batch_size=1, with_frames=False, with_reference=False, with_masks=False)
  iterator = iter(loader.make_dataset(dataset_dir, "train", config))
  count = len(loader.data_source(dataset_dir, "train"))
  epochs = [[str(next(iterator)["clip_id"][0]) for _ in range(count)] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
  assert len(set(epochs[0])) == count


def test_resume_through_orbax_yields_the_same_batches(dataset_dir, tmp_path):
  # With cross-clip references drawn half the time: their draws restore with the iterator too.
  config = _config(cross_clip_reference=0.5)
  iterator = iter(loader.make_dataset(dataset_dir, "train", config))
  for _ in range(3):
    next(iterator)
  loader.save_iterator(tmp_path / "ckpt", 3, iterator)
  expected = [next(iterator) for _ in range(4)]  # crosses the epoch boundary (7 clips, batch 2)
  restored = loader.restore_iterator(tmp_path / "ckpt",
                                     iter(loader.make_dataset(dataset_dir, "train", config)))
  for want in expected:
    got = next(restored)
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


@pytest.mark.slow
def test_resume_with_worker_processes(dataset_dir, tmp_path):
  config = _config(num_workers=2)
  iterator = iter(loader.make_dataset(dataset_dir, "train", config))
  for _ in range(2):
    next(iterator)
  loader.save_iterator(tmp_path / "ckpt", 2, iterator)
  expected = [next(iterator) for _ in range(3)]
  restored = loader.restore_iterator(tmp_path / "ckpt",
                                     iter(loader.make_dataset(dataset_dir, "train", config)))
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(want["frames"], got["frames"])
    assert list(want["clip_id"]) == list(got["clip_id"])


_SHARD_SCRIPT = textwrap.dedent("""
  import json, sys
  from data_pipeline import loader
  if __name__ == "__main__":
    index, dataset_dir = int(sys.argv[1]), sys.argv[2]
    config = loader.LoaderConfig(window=24, batch_size=1, num_epochs=1, with_frames=False,
                                 with_reference=False, with_masks=False, num_workers=0,
                                 shard_index=index, shard_count=2)
    print(json.dumps([str(b["clip_id"][0])
                      for b in loader.make_dataset(dataset_dir, "train", config)]))
""")


def test_two_processes_read_disjoint_records(dataset_dir):
  processes = [subprocess.Popen([sys.executable, "-c", _SHARD_SCRIPT, str(index), dataset_dir],
                                stdout=subprocess.PIPE, text=True) for index in range(2)]
  seen = [json.loads(process.communicate(timeout=120)[0].strip().splitlines()[-1])
          for process in processes]
  assert all(process.returncode == 0 for process in processes)
  assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
  source = loader.data_source(dataset_dir, "train")
  assert sorted(seen[0] + seen[1]) == sorted(source[i]["clip_id"].decode()
                                             for i in range(len(source)))


def test_clear_error_for_a_folder_that_is_not_a_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
    loader.make_dataset(tmp_path, "train", _config())


def _records_by_id(dataset_dir):
  source = loader.data_source(dataset_dir, "train")
  return {source[i]["clip_id"].decode(): source[i] for i in range(len(source))}


def test_cross_clip_references_come_from_another_clip_of_the_identity(dataset_dir):
  """Probability 1: every reference is a frame of another clip of the same speaker in another
  emotion (the tiny set has four per speaker), its pixels, masks and landmarks that clip's; 0:
  never; the windows themselves do not change with the probability, and a seed repeats its
  draws."""
  by_id = _records_by_id(dataset_dir)
  take = lambda config: [next(it)  # noqa: E731
                         for it in [iter(loader.make_dataset(dataset_dir, "train", config))]
                         for _ in range(3)]
  always, never = take(_config(cross_clip_reference=1.0)), take(_config())
  again = take(_config(cross_clip_reference=1.0))
  for cross, same, repeat in zip(always, never, again):
    np.testing.assert_array_equal(cross["start"], same["start"])
    np.testing.assert_array_equal(cross["clip_id"], same["clip_id"])
    np.testing.assert_array_equal(cross["reference_clip_id"], repeat["reference_clip_id"])
    np.testing.assert_array_equal(cross["reference"], repeat["reference"])
    assert not same["cross_clip"].any()
    np.testing.assert_array_equal(same["reference_clip_id"], same["clip_id"])
    assert cross["cross_clip"].all()
    for row in range(2):
      window, other = by_id[str(cross["clip_id"][row])], by_id[str(cross["reference_clip_id"][row])]
      assert other["speaker"] == window["speaker"] and other["clip_id"] != window["clip_id"]
      assert other["emotion"] != window["emotion"] == cross["emotion"][row]
      assert cross["reference_emotion"][row] == other["emotion"]
      reference = int(cross["reference_index"][row])
      face, lips = faces.face_and_lip_masks(
          other["landmarks"][reference].astype(np.float32) * 64, 64)
      np.testing.assert_array_equal(cross["face_mask"][row], face)
      np.testing.assert_array_equal(cross["lip_mask"][row], lips)
      np.testing.assert_array_equal(cross["reference_landmarks"][row],
                                    other["landmarks"][reference].astype(np.float32))
  with pytest.raises(ValueError, match="cross_clip_reference is a probability"):
    _config(cross_clip_reference=1.5)


def test_cross_clip_draws_fall_back_to_the_own_clip_of_a_single_clip_identity():
  index = loader.ClipIndex(["a_neutral", "a_sad", "a_sad2", "b_only", "c_happy", "c_happy2"],
                           ["a", "a", "a", "b", "c", "c"], [0, 5, 5, 0, 1, 1])
  rng = np.random.default_rng(0)
  assert index.other_clip(rng, "b_only") is None  # one clip: the caller keeps it
  assert {index.other_clip(rng, "a_neutral") for _ in range(20)} == {1, 2}  # other emotions
  assert {index.other_clip(rng, "a_sad") for _ in range(20)} == {0}  # the only other emotion
  assert {index.other_clip(rng, "c_happy") for _ in range(20)} == {5}  # no other emotion: a take
  draws = lambda seed: [index.other_clip(np.random.default_rng(seed), "a_neutral")  # noqa: E731
                        for _ in range(8)]
  assert draws(3) == draws(3)


def test_cross_clip_references_from_one_emotion_where_the_identity_has_it(dataset_dir):
  """cross_clip_emotion "neutral": a window of any other emotion takes its reference from its
  identity's neutral clip (the inference case: a neutral portrait); a neutral window, whose
  identity has no other neutral clip, from another emotion."""
  index = loader.ClipIndex(["a_neutral", "a_sad", "a_happy", "b_sad", "b_happy"],
                           ["a", "a", "a", "b", "b"], [0, 5, 1, 5, 1])
  rng = np.random.default_rng(0)
  assert {index.other_clip(rng, "a_sad", 0) for _ in range(20)} == {0}
  assert {index.other_clip(rng, "a_neutral", 0) for _ in range(20)} == {1, 2}
  assert {index.other_clip(rng, "b_sad", 0) for _ in range(20)} == {4}  # no neutral clip
  neutral = EMOTION_LABELS.index("neutral")
  checked = 0
  by_id = _records_by_id(dataset_dir)
  batches = iter(loader.make_dataset(dataset_dir, "train", _config(
      cross_clip_reference=1.0, cross_clip_emotion="neutral")))
  for _ in range(3):
    batch = next(batches)
    for row in range(2):
      window = by_id[str(batch["clip_id"][row])]
      expected = {int(r["emotion"]) for r in by_id.values()
                  if r["speaker"] == window["speaker"] and r["clip_id"] != window["clip_id"]}
      if int(window["emotion"]) != neutral and neutral in expected:
        assert batch["reference_emotion"][row] == neutral
        checked += 1
  assert checked  # the tiny set's speakers have a neutral clip beside the others
  with pytest.raises(ValueError, match="not an emotion label"):
    _config(cross_clip_emotion="calm")


def test_frame_masks_follow_each_frames_own_landmarks(dataset_dir):
  batch = next(iter(loader.make_dataset(dataset_dir, "train", _config(frame_masks=True))))
  assert batch["frame_face_mask"].shape == batch["frame_lip_mask"].shape == (2, WINDOW, 64, 64)
  for row in range(2):
    for frame in (0, WINDOW - 1):
      face, lips = faces.face_and_lip_masks(batch["landmarks"][row, frame] * 64, 64)
      np.testing.assert_array_equal(batch["frame_face_mask"][row, frame], face)
      np.testing.assert_array_equal(batch["frame_lip_mask"][row, frame], lips)
