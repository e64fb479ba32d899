"""benchmarks/device_check.py --dry-run: every row reported, parity within its bounds, none failed.

Slow (about 2.5 minutes on 2 shared cores): each group of rows runs in its own child process,
which compiles its models afresh (a random ETHD initialiser and a rematerialised backward are
slow to compile on XLA:CPU even at tiny sizes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import device_check  # noqa: E402 - benchmarks/ is not a package

PARITY_ROWS = ("parity_unet", "parity_vae", "parity_ethd_init")
ALL_ROWS = PARITY_ROWS + ("attention", "ethd_sampling", "ethd_train_step")


@pytest.mark.slow
def test_dry_run_reports_every_row_within_bounds(tmp_path, capsys):
  out = tmp_path / "device_check.json"
  assert device_check.main(["--dry-run", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  report = json.loads(out.read_text())
  rows = {row["name"]: row for row in report["rows"]}
  assert sorted(rows) == sorted(ALL_ROWS)
  assert report["failed"] == [] and report["dry_run"]
  for name in ALL_ROWS:
    assert rows[name]["status"] == "ok", (name, rows[name]["status"])
    assert name in printed
  assert "total wall time" in printed

  for name in PARITY_ROWS:
    errors = {key: value for key, value in rows[name]["figures"].items()
              if "error" in key}
    assert {key.rsplit("_", 1)[1] for key in errors} == {"fp32", "bf16"}, name
    for key, value in errors.items():
      bound = 1e-4 if key.endswith("fp32") else device_check.BF16_TOLERANCE
      assert value < bound, (name, key, value)

  attention = rows["attention"]["figures"]
  assert attention["cudnn"] == "skipped: no GPU"
  for block in (128, 256, 512):
    assert f"blocked{block}_fwd_bwd_ms" in attention
  # The first implementation that ran (blocked, 128) is the reference: bf16 rounding apart,
  # the others agree with it.
  assert max(value for key, value in attention.items() if key.endswith("_error")) < 1e-2

  for name, figures in (("ethd_sampling", ("compile_s", "sample_s", "tflops_per_call")),
                        ("ethd_train_step", ("compile_s", "step_s", "model_tflops"))):
    assert set(figures) <= set(rows[name]["figures"]), name
