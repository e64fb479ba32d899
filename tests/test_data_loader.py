"""Grain loader on the tiny synthetic dataset: windows, exact resume through Orbax, disjoint shards."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_pipeline import SAMPLES_PER_FRAME, faces, loader
from data_pipeline.media import NORMALIZE_EPS

WINDOW = 24


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  from data_pipeline.builders import synthetic_talking_heads
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
    np.testing.assert_array_equal(batch["mouth_open"][row], record["mouth_open"][start:start + WINDOW])
    audio = np.zeros((48 + 4) * SAMPLES_PER_FRAME, np.float32)
    audio[2 * SAMPLES_PER_FRAME:-2 * SAMPLES_PER_FRAME] = record["audio"] / 32768.0
    np.testing.assert_array_equal(batch["audio"][row],
                                  audio[start * SAMPLES_PER_FRAME:(start + WINDOW + 4) * SAMPLES_PER_FRAME])
    assert not start <= reference < start + WINDOW
    face, lips = faces.face_and_lip_masks(record["landmarks"][reference].astype(np.float32) * 64, 64)
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
  take = lambda config: [next(it) for it in [iter(loader.make_dataset(dataset_dir, "train", config))] for _ in range(3)]  # noqa: E731
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
  iterator = iter(loader.make_dataset(dataset_dir, "train", _config()))
  for _ in range(3):
    next(iterator)
  loader.save_iterator(tmp_path / "ckpt", 3, iterator)
  expected = [next(iterator) for _ in range(4)]  # crosses the epoch boundary (7 clips, batch 2)
  restored = loader.restore_iterator(tmp_path / "ckpt", iter(loader.make_dataset(dataset_dir, "train", _config())))
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
  restored = loader.restore_iterator(tmp_path / "ckpt", iter(loader.make_dataset(dataset_dir, "train", config)))
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(want["frames"], got["frames"])
    assert list(want["clip_id"]) == list(got["clip_id"])


_SHARD_SCRIPT = textwrap.dedent("""
  import json, sys
  from data_pipeline import loader
  if __name__ == "__main__":
    index, dataset_dir = int(sys.argv[1]), sys.argv[2]
    config = loader.LoaderConfig(window=24, batch_size=1, num_epochs=1, with_frames=False, with_reference=False,
                                 with_masks=False, num_workers=0, shard_index=index, shard_count=2)
    print(json.dumps([str(b["clip_id"][0]) for b in loader.make_dataset(dataset_dir, "train", config)]))
""")


def test_two_processes_read_disjoint_records(dataset_dir):
  processes = [subprocess.Popen([sys.executable, "-c", _SHARD_SCRIPT, str(index), dataset_dir],
                                stdout=subprocess.PIPE, text=True) for index in range(2)]
  seen = [json.loads(process.communicate(timeout=120)[0].strip().splitlines()[-1]) for process in processes]
  assert all(process.returncode == 0 for process in processes)
  assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
  source = loader.data_source(dataset_dir, "train")
  assert sorted(seen[0] + seen[1]) == sorted(source[i]["clip_id"].decode() for i in range(len(source)))


def test_clear_error_for_a_folder_that_is_not_a_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
    loader.make_dataset(tmp_path, "train", _config())
