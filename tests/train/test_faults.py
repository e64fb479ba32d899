"""Training under faults (issue 21, item 1): each fault hits a tiny run of the real loop in a
subprocess (tests/helpers/train_fault_worker.py), then the outcome is checked against one
uninterrupted run, bit for bit where the run goes on.

  SIGKILL at seeded random points (during steps, during an async save, during the final export)
                   -> the resume starts from the last complete step; the finished run's
                      checkpoint and export equal the uninterrupted run's
  a full disk      (RLIMIT_FSIZE, SIGXFSZ ignored: writes past the limit fail with EFBIG, as
                   with ENOSPC; no root or tmpfs needed) -> one error naming the folder, the
                   previous step intact, nothing partial picked up by the resume
  a corrupted / missing file in the latest step -> one error naming the file and the fix (move
                   the step away); following it resumes from the previous step exactly
  a resume whose config changes shapes -> refused, naming the arrays and the config fields
  NaN in the loss  -> "stop": the step and its batch reported, nothing saved after it;
                   "skip": the update skipped exactly, the run finishes

tests/train/test_checkpoint.py covers the checkpointer itself (exact resume, keep-N, SIGTERM, a
SIGKILL held mid-save) on its own loop; these go through `etalk_jax.train.loop.train`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.builders import synthetic_talking_heads
from etalk_jax.train.checkpoint import TrainCheckpointer
from tests.helpers import train_fault_worker as worker

WORKER = Path(worker.__file__)
REPO = WORKER.parents[2]
PHASES = ("step", "save", "export")
DEFAULT_SEEDS = (0, 1, 2)  # one per phase; all 20: the slow test
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")  # read_step


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  return synthetic_talking_heads.build(str(tmp_path_factory.mktemp("synthetic")), "tiny")


@pytest.fixture(scope="module")
def reference(dataset_dir, tmp_path_factory):
  """The uninterrupted run, in this process, keeping every step's checkpoint."""
  workdir = tmp_path_factory.mktemp("reference")
  worker.run(dataset_dir, workdir, keep=worker.STEPS)
  steps = {step: worker.read_step(workdir / "checkpoints" / str(step))
           for step in range(worker.SAVE_EVERY, worker.STEPS + 1, worker.SAVE_EVERY)}
  return {"steps": steps, "export": worker.export_arrays(workdir)}


def _run_worker(dataset_dir, workdir, *args, steps=worker.STEPS, timeout=180):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, str(WORKER), dataset_dir, str(workdir), str(steps),
                         *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=timeout)


def _error_line(result) -> str:
  """The worker's one-line error."""
  lines = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, result.stdout[-3000:] + result.stderr[-3000:]
  return lines[0]


def _complete_steps(workdir) -> list[int]:
  folder = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir(
      ) else []


def _assert_equal(got: dict, want: dict, what: str):
  assert got.keys() == want.keys(), what
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")


def _assert_finishes_like_reference(dataset_dir, workdir, reference, start):
  """Resumes `workdir` (in this process) to the end: it must start at `start` and end with the
  uninterrupted run's last checkpoint and export."""
  summary = worker.run(dataset_dir, workdir)
  assert summary["start_step"] == start
  _assert_equal(worker.read_step(Path(workdir) / "checkpoints" / str(worker.STEPS)),
                reference["steps"][worker.STEPS], "final checkpoint")
  _assert_equal(worker.export_arrays(workdir), reference["export"], "export")
  # Nothing partial stays behind: no temporary checkpoint or export folders.
  folders = [*Path(workdir).iterdir(), *(Path(workdir) / "checkpoints").iterdir()]
  leftovers = [p.name for p in folders if "tmp" in p.name or "partial" in p.name]
  assert not leftovers


def _kill_plan(seed: int) -> tuple[str, int, float]:
  """(phase, step, delay) drawn from the seed; the phase cycles so that every few seeds cover
  all three."""
  rng = np.random.default_rng(seed)
  phase = PHASES[seed % len(PHASES)]
  if phase == "step":  # from a step's batch on: that step or one of the next few
    return phase, int(rng.integers(1, worker.STEPS + 1)), float(rng.uniform(0.0, 0.3))
  if phase == "save":  # inside the held background write of one of the saves
    step = int(rng.choice(np.arange(worker.SAVE_EVERY, worker.STEPS + 1, worker.SAVE_EVERY)))
    return phase, step, float(rng.uniform(0.0, worker.SAVE_HOLD))
  return phase, 0, float(rng.uniform(0.0, worker.EXPORT_HOLD))


def _sigkill_trial(seed, dataset_dir, reference, workdir):
  phase, step, delay = _kill_plan(seed)
  result = _run_worker(dataset_dir, workdir, "--kill", phase, step, f"{delay:.4f}")
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  saves = [int(line.split()[1]) for line in result.stdout.splitlines()
           if line.startswith("save ")]
  complete = _complete_steps(workdir)
  latest = complete[-1] if complete else 0
  # Every step folder under its final name is complete: equal to the uninterrupted run's.
  for done in complete:
    _assert_equal(worker.read_step(Path(workdir) / "checkpoints" / str(done)),
                  reference["steps"][done], f"seed {seed}: step {done} after the kill")
  # A kill costs at most the save in flight (a save starts once the previous one is complete;
  # "save N" is printed once it started): with the held write, always that one.
  if phase == "save":
    assert step not in complete and latest == step - worker.SAVE_EVERY, (saves, complete)
  elif phase == "export":
    assert latest == worker.STEPS
    assert not (Path(workdir) / "export").exists()  # killed inside it: nothing under its name
  else:
    assert latest in saves[-2:] or (latest == 0 and len(saves) <= 1), (saves, complete)
  _assert_finishes_like_reference(dataset_dir, workdir, reference, latest)
  return phase


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_sigkill_resumes_from_the_last_complete_step_and_finishes_bit_for_bit(
    seed, dataset_dir, reference, tmp_path):
  _sigkill_trial(seed, dataset_dir, reference, tmp_path)


@pytest.mark.slow  # 20 subprocesses, ~10-15 s each on the shared 2-core machine
def test_sigkill_20_seeded_trials(dataset_dir, reference, tmp_path):
  phases = [_sigkill_trial(seed, dataset_dir, reference, tmp_path / str(seed))
            for seed in range(20)]
  assert {phase: phases.count(phase) for phase in PHASES} == {"step": 7, "save": 7, "export": 6}


def test_full_disk_during_a_save_is_one_error_and_loses_nothing(dataset_dir, reference, tmp_path):
  # From step 3 on no file may pass 32 KiB: step 4's model file (~250 KB) fails in the
  # background; the loop learns it when step 6's save waits for step 4's.
  result = _run_worker(dataset_dir, tmp_path, "--fill-disk-at", 3, "--fsize", 32 * 1024)
  assert result.returncode == 2, result.stderr[-3000:]
  message = _error_line(result)
  assert "disk full" in message and str(tmp_path / "checkpoints") in message, message
  assert "step 4" in message and "previous checkpoint (step 2) is intact" in message, message
  # No traceback at all: not ours, nor Orbax's threads' (checkpoint.quiet_reported_failures).
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, \
      result.stderr[-3000:]
  assert _complete_steps(tmp_path) == [2]
  _assert_equal(worker.read_step(tmp_path / "checkpoints" / "2"), reference["steps"][2],
                "step 2 after the full disk")
  assert not (tmp_path / "export").exists()
  # The same command on a disk with room: resumes from step 2 (step 4's partial folder is never
  # read; saving step 4 again replaces it) and ends as the uninterrupted run.
  _assert_finishes_like_reference(dataset_dir, tmp_path, reference, 2)


def _damage(step_dir: Path, how: str) -> Path:
  """Flips a byte in the middle of the model's largest array file, or removes the optimizer's
  largest one; returns the file."""
  item = "model" if how == "corrupted" else "optimizer"
  path = max((p for p in (step_dir / item / "d").iterdir()), key=lambda p: p.stat().st_size)
  if how == "corrupted":
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
  else:
    path.unlink()
  return path


@pytest.mark.parametrize("how", ["corrupted", "missing"])
def test_a_damaged_checkpoint_file_is_named_with_the_fix(how, dataset_dir, reference, tmp_path):
  """The choice (etalk_jax/train/checkpoint.py): a clear error naming the file, not a silent
  fall-back; its fix, moving the step folder away, then resumes from the previous step."""
  worker.run(dataset_dir, tmp_path, 4)
  damaged = _damage(tmp_path / "checkpoints" / "4", how)
  result = _run_worker(dataset_dir, tmp_path)
  assert result.returncode == 2, result.stderr[-3000:]
  message = _error_line(result)
  assert message.startswith(f"error: {damaged}: checkpoint step 4 is damaged"), message
  assert f"move the folder {tmp_path / 'checkpoints' / '4'}" in message
  assert "resume from step 2" in message
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert _complete_steps(tmp_path) == [2, 4]  # nothing was written
  shutil.move(tmp_path / "checkpoints" / "4", tmp_path / "damaged-step-4")
  _assert_finishes_like_reference(dataset_dir, tmp_path, reference, 2)


def test_a_resume_that_changes_shapes_is_refused_with_the_fields(dataset_dir, reference,
                                                                 tmp_path):
  worker.run(dataset_dir, tmp_path, 4)
  saved_config = (tmp_path / "config.json").read_text()
  result = _run_worker(dataset_dir, tmp_path, "--width", 16)
  assert result.returncode == 2, result.stderr[-3000:]
  message = _error_line(result)
  assert "cannot resume" in message and "model.width: 8 -> 16" in message, message
  assert "model/hidden/kernel: saved (7680, 8), this run (7680, 16)" in message, message
  assert "train.steps: 4 -> 8" in message  # every differing field is listed
  assert (tmp_path / "config.json").read_text() == saved_config
  assert _complete_steps(tmp_path) == [2, 4]
  _assert_finishes_like_reference(dataset_dir, tmp_path, reference, 4)  # the old width goes on


def test_nan_loss_stops_before_a_poisoned_checkpoint_naming_step_and_batch(dataset_dir,
                                                                          tmp_path):
  result = _run_worker(dataset_dir, tmp_path, "--nan-at", 3)
  assert result.returncode == 2, result.stderr[-3000:]
  message = _error_line(result)
  batch_3 = next(line for line in result.stdout.splitlines() if line.startswith("batch 3 "))
  ids = batch_3.split(" ", 2)[2]  # "batch: clip_id [...], start [...]"
  assert message.startswith("error: step 3: the loss is nan") and ids in message, message
  assert "the last checkpoint is step 2" in message and "config.train.nonfinite=skip" in message
  # Step 4's save never started: nothing after step 2 was written, no export.
  assert "save 4" not in result.stdout
  assert _complete_steps(tmp_path) == [2] and not (tmp_path / "export").exists()


def test_nan_loss_with_skip_leaves_the_state_as_it_was(dataset_dir, reference, tmp_path):
  result = _run_worker(dataset_dir, tmp_path, "--nan-at", 3, "--nonfinite", "skip", steps=3)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "done 0 skipped [3]" in result.stdout
  assert "step 3: loss nan" in result.stderr and "update skipped" in result.stderr
  # Step 3's update was skipped whole: parameters, EMA, 8-bit moments and the optimizer's step
  # count are step 2's (only the data position moved on).
  after = worker.read_step(tmp_path / "checkpoints" / "3")
  before = reference["steps"][2]
  _assert_equal({k: v for k, v in after.items() if k != "data"},
                {k: v for k, v in before.items() if k != "data"}, "skipped step 3")
  skipped = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"step": 3, "skipped_nonfinite": 1.0} in skipped
  # The run goes on from there and finishes with finite weights, one update short.
  worker.run(dataset_dir, tmp_path, nonfinite="skip")
  final = worker.read_step(tmp_path / "checkpoints" / str(worker.STEPS))
  assert all(np.isfinite(v).all() for k, v in final.items()
             if k != "data" and v.dtype.kind == "f")
  assert int(final["optimizer/['step']"]) == worker.STEPS - 1
  with TrainCheckpointer(tmp_path / "checkpoints") as checkpointer:
    assert checkpointer.latest_step() == worker.STEPS
