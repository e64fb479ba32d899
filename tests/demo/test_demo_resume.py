"""`etalk demo --quick` stopped by SIGTERM during the ETHD stage stops cleanly (exit 130, "run the
same command to resume"), and the same command then finishes with the report an uninterrupted
run gives (every score; timings aside). Three quick demos: ~10 min on 2 cores, so slow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
TIMINGS = ("sampling", "phases_seconds", "total_seconds")


def _demo(workdir: Path, stop_at: str | None = None) -> tuple[int, str]:
  """Runs the quick demo in a process of its own; with `stop_at`, sends it SIGTERM as soon as a
  line of its output contains that text. Returns (exit status, output)."""
  process = subprocess.Popen(
      [sys.executable, "-m", "etalk_jax.cli", "demo", "--quick", "--workdir", str(workdir),
       "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONPATH=str(ROOT)))
  lines = []
  for line in process.stdout:
    lines.append(line)
    if stop_at is not None and stop_at in line:
      process.send_signal(signal.SIGTERM)
      stop_at = None
  return process.wait(timeout=900), "".join(lines)


def _scores(workdir: Path) -> dict:
  report = json.loads((workdir / "report.json").read_text())
  return {key: value for key, value in report.items() if key not in TIMINGS}


@pytest.mark.slow
def test_sigterm_during_ethd_stops_cleanly_and_the_resumed_demo_reports_the_same(tmp_path):
  status, output = _demo(tmp_path / "straight")
  assert status == 0, output[-3000:]

  status, output = _demo(tmp_path / "resumed", stop_at="== train ethd")
  assert status == 130, output[-3000:]
  assert "interrupted (stage ethd stopped at step" in output
  assert "run the same command to resume" in output
  assert "Traceback" not in output and not (tmp_path / "resumed" / "report.json").exists()
  assert list((tmp_path / "resumed" / "runs" / "ethd" / "checkpoints").iterdir())

  status, output = _demo(tmp_path / "resumed")
  assert status == 0, output[-3000:]
  assert _scores(tmp_path / "resumed") == _scores(tmp_path / "straight")
