"""Windowed sampling split over 8 simulated CPU devices equals one device. XLA_FLAGS must be set
before jax is imported, so the sampling runs in a subprocess (tests/helpers/sharded_sampling.py)
and this pytest process keeps its 1 device."""

import json
import os
import subprocess
import sys
from pathlib import Path

HELPERS = Path(__file__).parents[1] / "helpers"


def test_windows_split_over_8_devices_equal_one_device_and_compile_once_per_bucket():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(HELPERS.parents[1]))
  completed = subprocess.run([sys.executable, str(HELPERS / "sharded_sampling.py")], env=env,
                             capture_output=True, text=True, timeout=600, cwd=HELPERS)
  assert completed.returncode == 0, completed.stderr[-4000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  print(result)
  assert result["devices"] == 8
  # 1 video of 1: the group of 8 windows (windows_for_devices) is split 1 per device; with
  # guidance the doubled batch of 16 is split 2 per device.
  assert result["plain"]["denoiser_batch"] == [[[8, 3, 8, 8, 4], [1, 3, 8, 8, 4]]]
  assert result["guided"]["denoiser_batch"] == [[[16, 3, 8, 8, 4], [2, 3, 8, 8, 4]]]
  for name in ("plain", "guided"):
    run = result[name]
    assert result[f"{name}_finite"]
    # Each device runs the UNet on its own windows, so only the summation order inside a
    # device's matmuls and convolutions (blocked for its local batch) may differ from one
    # device's: fp32 rounding, ~1e-6 relative per op, far below 1e-5 of the latents' scale.
    assert run["max_abs_difference"] <= 1e-5 * max(1.0, run["max_abs_value"])
    # The second length of the bucket reuses the sharded program.
    assert run["new_compiles"] == [1, 0]
