"""The demo's embedded checkpoint: the pipeline checkpoint `etalk demo --train` trained, shipped in
the package (`EMBEDDED`, etalk_jax/demo/checkpoint/) so that `etalk demo` samples and reports in
minutes; `etalk demo --train` reproduces it from scratch and writes the same form into its
workdir (`PACKED`), which is what gets copied here.

The form: a pipeline checkpoint (`etalk_jax.pipeline.checkpoint`) with each component's Orbax
state replaced by one safetensors file, its floating arrays in float16 (half the size; its report
against the fp32 one's: docs/notes/2026-12-06-demo-embedded-checkpoint.md), and a record of where
it came from:

  provenance.json                {"format": "etalk_demo_checkpoint", "version": 1,
                                  "command", "commit", "dirty" (uncommitted changes then),
                                  "config" (configs/tiny.py:full as JSON), "seeds",
                                  "training_seconds", "phases_seconds", "machine", "report"
                                  (the figures the fp32 checkpoint gave), "weights_dtype",
                                  "digests": {file: sha256} of every other file}
  pipeline.json, codebook.json   as `save_pipeline` wrote them
  <component>/config.json        as written
  <component>/weights.safetensors  the state's arrays keyed by their path in it ("a/b/value");
                                 metadata "dtypes": each array's dtype in the state

`unpack` checks every digest, then writes a plain pipeline checkpoint that
`EmotiveTalkPipeline.load` and `etalk app` read.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from etalk_jax.errors import UserError
from etalk_jax.model_io import CONFIG_FILE, STATE_DIR, read_state_tree, write_state_tree
from etalk_jax.pipeline.checkpoint import read_pipeline_record
from etalk_jax.records import read_record
from etalk_jax.weights import atomic_folder, write_safetensors

FORMAT = "etalk_demo_checkpoint"
VERSION = 1
EMBEDDED = Path(__file__).with_name("checkpoint")
PACKED = "checkpoint_packed"  # where `etalk demo --train` writes this form in its workdir
PROVENANCE_FILE = "provenance.json"
WEIGHTS_FILE = "weights.safetensors"
WEIGHTS_DTYPE = np.float16
REQUIRED = ("command", "commit", "config", "seeds", "training_seconds", "report", "digests")
RETRAIN = "run `etalk demo --train` (about 21 minutes on 2 cores) to train one from scratch"


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(folder: Path) -> list[str]:
  """Every file under `folder` but the provenance record, as sorted relative paths."""
  return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                if path.is_file() and path.name != PROVENANCE_FILE)


def _state_components(checkpoint: Path) -> list[str]:
  """The component folders of a pipeline checkpoint that hold an Orbax state."""
  record = read_pipeline_record(checkpoint)
  return sorted(name for name in record["components"].values()
                if (checkpoint / name / STATE_DIR).is_dir())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for key, value in tree.items():
    if "/" in str(key):
      raise ValueError(f"state key {prefix}{key} contains '/', the packed form's separator")
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = np.asarray(value)
  return flat


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def _packed(array: np.ndarray) -> np.ndarray:
  """Floating arrays in WEIGHTS_DTYPE where every value fits it; anything else as it is."""
  if (np.issubdtype(array.dtype, np.floating) and array.dtype != WEIGHTS_DTYPE
      and np.all(np.abs(array) <= np.finfo(WEIGHTS_DTYPE).max)):
    return array.astype(WEIGHTS_DTYPE)
  return array


def pack(checkpoint: str | Path, dst: str | Path, provenance: dict[str, Any]) -> Path:
  """The pipeline checkpoint at `checkpoint` in the shipped form at `dst` (atomically, replacing
  one there), with `provenance` (every REQUIRED field but the digests, which this adds)."""
  checkpoint, dst = Path(checkpoint), Path(dst)
  components = _state_components(checkpoint)
  with atomic_folder(dst, overwrite=True) as tmp:
    for path in checkpoint.rglob("*"):
      relative = path.relative_to(checkpoint)
      if path.is_file() and relative.parts[0] not in components:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp / relative)
    for name in components:
      (tmp / name).mkdir()
      shutil.copyfile(checkpoint / name / CONFIG_FILE, tmp / name / CONFIG_FILE)
      flat = _flatten(read_state_tree(checkpoint / name / STATE_DIR))
      write_safetensors(tmp / name / WEIGHTS_FILE,
                        ((key, _packed(value)) for key, value in sorted(flat.items())),
                        metadata={"dtypes": json.dumps({key: str(value.dtype)
                                                        for key, value in flat.items()})})
    record = {"format": FORMAT, "version": VERSION, **provenance,
              "weights_dtype": np.dtype(WEIGHTS_DTYPE).name,
              "digests": {name: _sha256(tmp / name) for name in _files(tmp)}}
    (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
  return dst


def read_provenance(folder: str | Path = EMBEDDED) -> dict[str, Any]:
  """The provenance record of a packed checkpoint, with every file's digest checked: one
  UserError names each file that is missing, extra or changed."""
  folder = Path(folder)
  record = read_record(folder / PROVENANCE_FILE, format=FORMAT, version=VERSION,
                       what="a packed demo checkpoint's provenance",
                       fix=f"Restore the folder from the repository, or {RETRAIN}.",
                       required=REQUIRED)
  present = _files(folder)
  problems = [f"{name} is missing" for name in record["digests"] if name not in present]
  problems += [f"{name} is not in its digests" for name in present
               if name not in record["digests"]]
  problems += [f"{name} differs from its digest" for name in present
               if name in record["digests"] and _sha256(folder / name) != record["digests"][name]]
  if problems:
    raise UserError(f"{folder}: the packed demo checkpoint is damaged ({'; '.join(problems)}). "
                    f"Restore the folder from the repository (git checkout -- {folder}), or "
                    f"{RETRAIN}.")
  return record


def unpack(src: str | Path, checkpoint: str | Path) -> Path:
  """The packed checkpoint at `src` (digests checked) as a plain pipeline checkpoint at
  `checkpoint` (atomically, replacing one there), each array back in its state's dtype."""
  src = Path(src)
  read_provenance(src)
  with atomic_folder(Path(checkpoint), overwrite=True) as tmp:
    for name in _files(src):
      path = src / name
      if path.name == WEIGHTS_FILE:
        with safe_open(str(path), framework="np") as handle:
          dtypes = json.loads(handle.metadata()["dtypes"])
          flat = {key: handle.get_tensor(key).astype(dtypes[key]) for key in handle.keys()}
        write_state_tree(_unflatten(flat), tmp / path.parent.relative_to(src) / STATE_DIR)
      else:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp / name)
  return Path(checkpoint)


def source_commit() -> tuple[str | None, bool]:
  """(the commit of the source tree this package runs from, whether it has uncommitted
  changes); (None, False) outside a git checkout (an installed wheel)."""
  root = Path(__file__).resolve().parents[2]
  try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                             "etalk_jax", "configs", "data_pipeline"], capture_output=True,
                            text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None, False
  return commit, bool(status.strip())


def machine() -> dict[str, Any]:
  """What trained it: the training time means this machine."""
  return {"platform": platform.platform(), "processor": platform.processor() or None,
          "cpus": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend()}
