"""The wheel ships every config and the demo's embedded checkpoint, and the demo finds them from a
non-editable install: the wheel is built from a copy of the source tree, installed into a folder
of its own, and imported from there in a folder that holds no source tree. Slow (~30 s: a wheel
build and the demo's imports)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the installed copy runs: the demo's config loading, by the shipped names it uses.
LOAD_EVERY_DEMO_CONFIG = """
import json
import configs, etalk_jax
from etalk_jax.demo import stages, wiring
from etalk_jax.train.config import load_config
loaded = {stage: wiring.tiny_stage_config(stage).stage for stage in stages.TRAINED_STAGES}
loaded["tiny"] = sorted(wiring.demo_config(quick=True).steps)
loaded["vaid:tiny by name"] = load_config("vaid:tiny").stage
# The embedded checkpoint ships whole: every file its provenance lists, with its digest.
loaded["embedded"] = wiring.embedded_provenance(wiring.demo_config(quick=False))["command"]
print(json.dumps({"files": [configs.__file__, etalk_jax.__file__], "loaded": loaded}))
"""


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_the_installed_demo_loads_them(tmp_path):
  source = tmp_path / "source"
  for name in ("etalk_jax", "data_pipeline", "configs"):
    shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), str(source)], check=True)
  (wheel,) = wheels.glob("*.whl")
  shipped = set(zipfile.ZipFile(wheel).namelist())
  for config in sorted((REPO / "configs").glob("*.py")):
    assert f"configs/{config.name}" in shipped, config.name

  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                  str(site), str(wheel)], check=True)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # The installed copy comes first on the path (the dependencies come from this interpreter's
  # site-packages); the working folder holds no configs/ to fall back on.
  environment = {**os.environ, "PYTHONPATH": str(site)}
  run = subprocess.run([sys.executable, "-c", LOAD_EVERY_DEMO_CONFIG], cwd=elsewhere,
                       env=environment, capture_output=True, text=True, check=True)
  report = json.loads(run.stdout.strip().splitlines()[-1])
  for file in report["files"]:
    assert Path(file).is_relative_to(site), file
  assert report["loaded"] == {"encoders": "encoders", "projector": "projector", "dicte": "dicte",
                              "ethd": "ethd", "ser": "ser",
                              "tiny": ["dicte", "encoders", "ethd", "pdfgc", "projector", "ser"],
                              "vaid:tiny by name": "projector",
                              "embedded": "etalk demo --train"}
