"""Two CPU processes on localhost (jax.distributed + gloo collectives, 2 devices each) train a
tiny model on their own Grain shards of the synthetic dataset; the result must equal one process
training on the same global batches. Subprocesses: the distributed start and XLA_FLAGS must
precede any device use, and this pytest process keeps its single device."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_pipeline.builders import synthetic_talking_heads

HELPERS = Path(__file__).parents[1] / "helpers"
WORKER = HELPERS / "distributed_worker.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(HELPERS.parents[1]),
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def test_two_processes_train_like_one(tmp_path):
  dataset_dir = synthetic_talking_heads.build(str(tmp_path / "data"), "tiny")
  port = _free_port()
  workers = [subprocess.Popen([sys.executable, str(WORKER), "worker", str(i), str(port),
                               dataset_dir, str(tmp_path / "distributed.npz")], env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  reference = subprocess.run([sys.executable, str(WORKER), "reference", dataset_dir,
                              str(tmp_path / "reference.npz")], env=_env(1),
                             capture_output=True, text=True, timeout=600)
  outputs = [w.communicate(timeout=600)[0] for w in workers]
  for i, (w, output) in enumerate(zip(workers, outputs)):
    assert w.returncode == 0, f"process {i}:\n{output[-4000:]}"
  assert reference.returncode == 0, reference.stderr[-4000:]
  print(*outputs, reference.stdout, sep="\n")
  ours = np.load(tmp_path / "distributed.npz")
  theirs = np.load(tmp_path / "reference.npz")
  assert int(ours["devices"]) == 4 and int(ours["sharded"]) == 3  # conv2, linear1, linear2 kernels
  np.testing.assert_allclose(ours["losses"], theirs["losses"], rtol=1e-5)
  params = [k for k in theirs.files if k != "losses"]
  assert len(params) == 10
  moved = max(float(np.max(np.abs(theirs[k] - ours[k]))) for k in params)
  assert moved <= 1e-5, moved
