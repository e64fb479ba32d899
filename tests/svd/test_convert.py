"""`etalk convert svd` on diffusers folders the tests write: layouts, variants, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from safetensors.numpy import save_file

from etalk_jax import svd
from etalk_jax.cli import main
from etalk_jax.svd.params import WEIGHTS_STEM
from tests.helpers.svd_reference import UNET_TWO_LEVELS, VAE_TINY, make_unet, make_vae


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
  """A folder laid out like stable-video-diffusion-img2vid-xt: unet/ and vae/."""
  root = tmp_path_factory.mktemp("svd")
  unet, vae = make_unet(UNET_TWO_LEVELS), make_vae(VAE_TINY)
  unet.save_pretrained(root / "unet")
  vae.save_pretrained(root / "vae")
  (root / "model_index.json").write_text(
      json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
  return root, unet, vae


def assert_same_weights(ours_tensors: dict, reference: torch.nn.Module):
  expected = reference.state_dict()
  assert set(ours_tensors) == set(expected)
  for key, tensor in expected.items():
    np.testing.assert_array_equal(ours_tensors[key], tensor.float().numpy(), err_msg=key)


def test_pipeline_folder_both_ways(pipeline_folder, tmp_path, capsys):
  root, unet, vae = pipeline_folder
  assert main(["convert", "svd", "--src", str(root), "--dst", str(tmp_path / "ours")]) == 0
  printed = capsys.readouterr().out
  assert "unet:" in printed and "vae:" in printed and "parameters" in printed
  assert_same_weights(svd.to_diffusers(svd.load_unet(tmp_path / "ours" / "unet")), unet)
  assert_same_weights(svd.to_diffusers(svd.load_vae(tmp_path / "ours" / "vae")), vae)

  assert main(["convert", "svd", "--src", str(tmp_path / "ours"), "--dst",
               str(tmp_path / "back"), "--to", "diffusers"]) == 0
  reloaded_unet = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "back" / "unet")
  reloaded_vae = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "back" / "vae")
  assert_same_weights({k: v.numpy() for k, v in reloaded_unet.state_dict().items()}, unet)
  assert_same_weights({k: v.numpy() for k, v in reloaded_vae.state_dict().items()}, vae)


def test_single_component_sharded_fp16_variant(pipeline_folder, tmp_path):
  _, unet, _ = pipeline_folder
  half = make_unet(UNET_TWO_LEVELS).half()
  half.save_pretrained(tmp_path / "unet", variant="fp16", max_shard_size="100KB")
  assert len(list((tmp_path / "unet").glob("*.safetensors"))) > 1  # really sharded
  assert main(["convert", "svd", "--src", str(tmp_path / "unet"), "--dst",
               str(tmp_path / "ours")]) == 0
  assert_same_weights(svd.to_diffusers(svd.load_unet(tmp_path / "ours")), half)


def test_torch_bin_weights(tmp_path):
  vae = make_vae(VAE_TINY)
  vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
  assert (tmp_path / "vae" / f"{WEIGHTS_STEM}.bin").is_file()
  assert_same_weights(svd.to_diffusers(svd.vae_from_diffusers(tmp_path / "vae")), vae)


def test_legacy_vae_attention_names(tmp_path):
  vae = make_vae(VAE_TINY)
  legacy = {}
  for key, tensor in vae.state_dict().items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      key = key.replace(f".{new}.", f".{old}.")
    legacy[key] = tensor.numpy()
  assert any(".proj_attn." in k for k in legacy)
  folder = tmp_path / "legacy"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(dict(vae.config)))
  save_file(legacy, str(folder / f"{WEIGHTS_STEM}.safetensors"))
  assert_same_weights(svd.to_diffusers(svd.vae_from_diffusers(folder)), vae)


def _broken_copy(pipeline_folder, tmp_path, edit):
  root, unet, _ = pipeline_folder
  tensors = {k: v.numpy() for k, v in unet.state_dict().items()}
  edit(tensors)
  folder = tmp_path / "broken"
  folder.mkdir()
  (folder / "config.json").write_text((root / "unet" / "config.json").read_text())
  save_file(tensors, str(folder / f"{WEIGHTS_STEM}.safetensors"))
  return folder


def _drop(tensors):
  del tensors["conv_in.weight"]


def _extra(tensors):
  tensors["surprise.weight"] = np.zeros(3, np.float32)


def _misshape(tensors):
  tensors["conv_out.bias"] = np.zeros(7, np.float32)


@pytest.mark.parametrize("edit,expected", [
    (_drop, r"1 missing.*conv_in\.weight"),
    (_extra, r"1 unexpected.*surprise\.weight"),
    (_misshape, r"wrong shape.*conv_out\.bias: file has \(7,\), model needs \(4,\)"),
])
def test_mismatched_weights_fail_with_the_keys_and_write_nothing(pipeline_folder, tmp_path,
                                                                 capsys, edit, expected):
  folder = _broken_copy(pipeline_folder, tmp_path, edit)
  dst = tmp_path / "out"
  assert main(["convert", "svd", "--src", str(folder), "--dst", str(dst)]) == 2
  message = capsys.readouterr().err
  assert message.startswith("etalk convert: error:")
  assert re.search(expected, message, re.S), message
  assert not dst.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder


def test_not_a_diffusers_folder(tmp_path, capsys):
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "notes.txt").write_text("hello")
  assert main(["convert", "svd", "--src", str(tmp_path / "src"), "--dst",
               str(tmp_path / "out")]) == 2
  assert "neither an SVD pipeline folder" in capsys.readouterr().err
  assert main(["convert", "svd", "--src", str(tmp_path / "nowhere"), "--dst",
               str(tmp_path / "out")]) == 2
  assert "no such folder" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_existing_destination_is_not_overwritten(pipeline_folder, tmp_path, capsys):
  root, _, _ = pipeline_folder
  dst = tmp_path / "taken"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  assert main(["convert", "svd", "--src", str(root / "vae"), "--dst", str(dst)]) == 2
  assert "already exists" in capsys.readouterr().err
  assert (dst / "keep.txt").read_text() == "mine"
