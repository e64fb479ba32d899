"""The demo's embedded checkpoint (etalk_jax/demo/checkpoint/, `etalk_jax.demo.shipped`): its
provenance matches the training config it claims, every file is the one recorded, it loads as a
pipeline, and unpacking loses nothing (packing it again gives the same files). `etalk demo`
itself, sampling it end to end, is the slow test below."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from etalk_jax import cli
from etalk_jax.demo import shipped, wiring
from etalk_jax.errors import UserError
from etalk_jax.ethd.model import load_ethd
from etalk_jax.pipeline import EmotiveTalkPipeline


@pytest.fixture(scope="module")
def provenance():
  return shipped.read_provenance(shipped.EMBEDDED)  # every file's digest checked


def test_the_embedded_checkpoint_records_the_training_config_it_was_trained_with(provenance):
  config = wiring.demo_config(quick=False)
  assert provenance["command"] == "etalk demo --train"
  assert provenance["config"] == json.loads(config.to_json())
  assert provenance["seeds"] == wiring.demo_seeds(config)
  assert len(provenance["commit"]) == 40 and not provenance["dirty"]
  assert provenance["weights_dtype"] == "float16"
  assert provenance["training_seconds"] > 0
  # The report the fp32 checkpoint gave, as `write_report` writes it: 4 held-out videos.
  assert len(provenance["report"]["videos"]) == 2 * len(config.emotions)
  assert wiring.embedded_provenance(config) == provenance


def test_the_embedded_checkpoint_loads_and_unpacks_losslessly(provenance, tmp_path):
  checkpoint = shipped.unpack(shipped.EMBEDDED, tmp_path / "checkpoint")
  pipe = EmotiveTalkPipeline.load(checkpoint)
  assert pipe.resolution == wiring.demo_config(quick=False).data.resolution
  # ETHD's parameters are the packed float16 values, as float32.
  packed = load_file(str(shipped.EMBEDDED / "ethd" / shipped.WEIGHTS_FILE))
  ethd = load_ethd(checkpoint / "ethd")
  loaded = {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(ethd)))}
  assert len(loaded) == len(packed)
  for key, value in packed.items():
    assert loaded[key.removesuffix("/value")].dtype == np.float32, key
    np.testing.assert_array_equal(np.asarray(loaded[key.removesuffix("/value")]),
                                  value.astype(np.float32), err_msg=key)
  # Packing the unpacked checkpoint again gives the same files, byte for byte.
  again = shipped.pack(checkpoint, tmp_path / "again", {
      name: value for name, value in provenance.items()
      if name not in ("format", "version", "weights_dtype", "digests")})
  assert shipped.read_provenance(again)["digests"] == provenance["digests"]


def test_a_changed_or_missing_embedded_file_is_named_with_the_fix(tmp_path):
  folder = tmp_path / "checkpoint"
  shutil.copytree(shipped.EMBEDDED, folder)
  weights = folder / "ethd" / shipped.WEIGHTS_FILE
  data = bytearray(weights.read_bytes())
  data[-3] ^= 0x01
  weights.write_bytes(bytes(data))
  (folder / "codebook.json").unlink()
  with pytest.raises(UserError) as error:
    shipped.read_provenance(folder)
  message = str(error.value)
  assert "codebook.json is missing" in message
  assert f"ethd/{shipped.WEIGHTS_FILE} differs from its digest" in message
  assert "etalk demo --train" in message


def test_a_changed_demo_config_refuses_the_embedded_checkpoint():
  config = wiring.demo_config(quick=False)
  config.steps.ethd = 7
  with pytest.raises(UserError, match=r"trained with another configs/tiny.py \(it differs in "
                                      r"steps\); run `etalk demo --train`"):
    wiring.embedded_provenance(config)


# ~2 min on 2 cores: the dataset, the readers and 8 videos sampled.
@pytest.mark.slow
def test_etalk_demo_samples_the_embedded_checkpoint_and_reports(provenance, tmp_path, capsys):
  workdir = tmp_path / "demo"
  assert cli.main(["demo", "--workdir", str(workdir), "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "samples the embedded checkpoint" in out
  assert "the embedded checkpoint's training run reported" in out
  assert not (workdir / "runs").exists()  # nothing trained
  report = json.loads((workdir / "report.json").read_text())
  assert report["checkpoint"] == {"embedded": str(shipped.EMBEDDED),
                                  "commit": provenance["commit"],
                                  "training_seconds": provenance["training_seconds"]}
  assert [(v["speaker"], v["emotion"]) for v in report["videos"]] == [
      (v["speaker"], v["emotion"]) for v in provenance["report"]["videos"]]
  # The ground truth is scored by the same readers on the same clips as in the training run.
  for ours, recorded in zip(report["videos"], provenance["report"]["videos"]):
    assert ours["ground truth"] == pytest.approx(recorded["ground truth"], abs=1e-6)
  assert EmotiveTalkPipeline.load(workdir / "checkpoint").resolution == 64
