"""Data x FSDP on 8 simulated CPU devices. XLA_FLAGS must be set before jax is imported, so the
step runs in a subprocess (tests/helpers/parallel_step.py) and this pytest process keeps its 1
device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPERS = Path(__file__).parents[1] / "helpers"


# ~1 min of compiling in its subprocess: in CI's slow subset (Makefile), not `make test`.
@pytest.mark.slow
def test_one_step_on_data_x_fsdp_mesh_equals_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(HELPERS.parents[1]))
  completed = subprocess.run([sys.executable, str(HELPERS / "parallel_step.py")], env=env,
                             capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-4000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  print(result)
  assert result["devices"] == 8 and result["mesh"] == {"data": 2, "fsdp": 4}
  # Created directly on its shards: every split parameter holds a quarter per device.
  assert result["sharded_fraction"] == [0.25] and result["sharded_count"] > 20
  assert result["created_as_logical"]  # create_sharded used the UNet's logical table
  assert result["opt_state_sharded_count"] == 2 * result["sharded_count"]  # Adam's mu and nu
  assert abs(result["loss_sharded"] - result["loss_single"]) <= 1e-5 * result["loss_single"]
  assert result["update_size"] > 5e-4  # the step did move the parameters
  assert result["param_error"] <= 1e-5
