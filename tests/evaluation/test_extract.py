"""BatchedForward (one compile for any number of rows) and SyncNet's scorer split their batches
over the local devices (8 simulated CPU devices in a subprocess: XLA_FLAGS must be set before
jax is imported), equal to one device's results."""

import json
import os
import subprocess
import sys
from pathlib import Path

HELPERS = Path(__file__).parents[1] / "helpers"


def test_batches_split_over_8_devices_equal_one_device_and_compile_once():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(HELPERS.parents[1]))
  completed = subprocess.run([sys.executable, str(HELPERS / "batched_forward_worker.py")],
                             env=env, capture_output=True, text=True, timeout=600, cwd=HELPERS)
  assert completed.returncode == 0, completed.stderr[-4000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8 and result["batch_size"] == 8
  # 11 rows: two calls of 8 (the second padded) through one compiled program.
  assert result["compiles"] == 1 and result["shape"] == [11, 64]
  assert result["max_abs_difference"] <= 1e-5 * max(1.0, result["max_abs_value"])
  # SyncNet's scorer: batches of 3 windows rounded up to 8, one per device; 25 windows.
  assert result["sync_batch_size"] == 8 and result["sync_windows"] == 25
  assert result["sync_difference"] <= 1e-5 * max(1.0, result["sync_value"])
