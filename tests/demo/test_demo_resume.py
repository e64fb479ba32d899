"""`etalk demo --quick` stopped by SIGTERM during the ETHD stage stops cleanly (exit 130, "run the
same command to resume"), and the same command then finishes with the report an uninterrupted
run gives (every score; timings aside). Three quick demos: ~10 min on 2 cores, so slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
TIMINGS = ("sampling", "phases_seconds", "total_seconds")


def _demo(workdir: Path, stop_at: str | None = None) -> tuple[int, str]:
  """Runs the quick demo in a session of its own; with `stop_at`, sends it SIGTERM as soon as its
  output shows that text. Returns (exit status, output). The output goes through a file, polled,
  so that a process the demo leaves behind cannot keep the test waiting; the session is killed
  at the end, and a survivor fails the test."""
  log = workdir.parent / f"{workdir.name}.{'stopped' if stop_at else 'run'}.log"
  with open(log, "w") as sink:
    process = subprocess.Popen(
        [sys.executable, "-m", "etalk_jax.cli", "demo", "--quick", "--workdir", str(workdir),
         "--no-progress"], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
      if stop_at is not None and stop_at in log.read_text():
        process.send_signal(signal.SIGTERM)
        stop_at = None
      time.sleep(0.2)
    status = process.wait(timeout=60)
  survivors = _kill_session(process.pid)
  assert not survivors, f"the demo left processes running: {survivors}"
  return status, log.read_text()


def _kill_session(session: int) -> list[int]:
  """Waits up to 10 s for a process session to empty (multiprocessing's helpers leave when the
  demo does), then kills what is left; returns [session] if anything was."""
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    try:
      os.killpg(session, 0)  # signal 0: is anyone in the session still there?
    except ProcessLookupError:
      return []
    time.sleep(0.2)
  os.killpg(session, signal.SIGKILL)
  return [session]


def _scores(workdir: Path) -> dict:
  report = json.loads((workdir / "report.json").read_text())
  scores = {key: value for key, value in report.items() if key not in TIMINGS}
  scores["checkpoint"].pop("training_seconds")  # a timing too
  return scores


@pytest.mark.slow
def test_sigterm_during_ethd_stops_cleanly_and_the_resumed_demo_reports_the_same(tmp_path):
  status, output = _demo(tmp_path / "straight")
  assert status == 0, output[-3000:]

  # The stage's own compile notice: SIGTERM then reaches its training loop, which saves a step.
  status, output = _demo(tmp_path / "resumed", stop_at="ethd: compiling the training step")
  assert status == 130, output[-3000:]
  assert "interrupted (stage ethd stopped at step" in output
  assert "run the same command to resume" in output
  assert "Traceback" not in output and not (tmp_path / "resumed" / "report.json").exists()
  assert list((tmp_path / "resumed" / "runs" / "ethd" / "checkpoints").iterdir())

  status, output = _demo(tmp_path / "resumed")
  assert status == 0, output[-3000:]
  assert _scores(tmp_path / "resumed") == _scores(tmp_path / "straight")
