"""Whole SVD UNet and VAE against diffusers: parity, full-size counts, round trips, Orbax."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
from flax import nnx

from etalk_jax import svd
from etalk_jax.layers.compute import Compute
from etalk_jax.model_io import parameter_count
from etalk_jax.svd.config import UNetConfig, VAEConfig
from etalk_jax.svd.params import abstract_model
from tests.helpers.svd_reference import (
  UNET_THREE_LEVELS,
  UNET_TWO_LEVELS,
  VAE_THREE_LEVELS,
  VAE_TINY,
  make_unet,
  make_vae,
  relative_error,
  run_torch_unet,
  unet_inputs,
)

# Measured errors are 1e-6 to 4e-6 (fp32); 1e-4 would have hidden a wrong GroupNorm epsilon.
MODEL_TOLERANCE = 1e-5

unet_forward = nnx.jit(lambda unet, inputs: unet(**inputs))
vae_encode_mean = nnx.jit(lambda vae, images: vae.encode(images).mean)
vae_decode = nnx.jit(lambda vae, latents, num_frames: vae.decode(latents, num_frames),
                     static_argnames="num_frames")


@pytest.fixture(scope="module", params=["three_levels", "two_levels"])
def unet_case(request):
  fields = {"three_levels": UNET_THREE_LEVELS, "two_levels": UNET_TWO_LEVELS}[request.param]
  reference = make_unet(fields)
  inputs = unet_inputs(fields)
  return reference, svd.unet_from_diffusers(reference), inputs, run_torch_unet(reference, inputs)


@pytest.fixture(scope="module", params=["tiny", "three_levels"])
def vae_case(request):
  fields = {"tiny": VAE_TINY, "three_levels": VAE_THREE_LEVELS}[request.param]
  reference = make_vae(fields)
  return reference, svd.vae_from_diffusers(reference)


def load_config_file(name: str):
  path = Path(__file__).parents[2] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_full_size_parameter_counts_equal_diffusers():
  config = load_config_file("svd_xt")
  unet_config, vae_config = UNetConfig.from_dict(config.unet), VAEConfig.from_dict(config.vae)
  assert unet_config == UNetConfig() and vae_config == VAEConfig()  # the defaults are SVD-XT's
  assert parameter_count(abstract_model("unet", unet_config)) == 1_524_623_082
  assert parameter_count(abstract_model("vae", vae_config)) == 97_742_847


def test_unet_matches_diffusers(unet_case):
  _, ours, inputs, expected = unet_case
  assert expected.shape == inputs["sample"].shape[:-1] + (4,)
  assert relative_error(unet_forward(ours, inputs), expected) < MODEL_TOLERANCE


def test_vae_encode_and_decode_match_diffusers(vae_case):
  reference, ours = vae_case
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected_mean = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2)
                                     ).latent_dist.mean.permute(0, 2, 3, 1).numpy()
  assert relative_error(vae_encode_mean(ours, images), expected_mean) < MODEL_TOLERANCE

  batch, frames = 2, 3
  latents = rng.standard_normal((batch * frames, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    expected = reference.decode(torch.from_numpy(latents).permute(0, 3, 1, 2),
                                num_frames=frames).sample.permute(0, 2, 3, 1).numpy()
  decoded = vae_decode(ours, latents, num_frames=frames)
  upscale = 2 ** (len(ours.config.block_out_channels) - 1)
  assert decoded.shape == (batch * frames, 4 * upscale, 4 * upscale, 3)
  assert relative_error(decoded, expected) < MODEL_TOLERANCE


def test_gaussian_sample_and_mode(vae_case):
  _, ours = vae_case
  images = np.zeros((2, 16, 16, 3), np.float32)
  posterior = ours.encode(images)
  assert np.array_equal(posterior.mode(), posterior.mean)
  draws = posterior.sample(jax.random.key(0))
  assert draws.shape == posterior.mean.shape and not np.allclose(draws, posterior.mean)
  np.testing.assert_allclose(posterior.std, np.exp(0.5 * np.asarray(posterior.logvar)),
                             rtol=1e-6)


def test_chunked_decoding_equals_diffusers_decode_chunk_size():
  reference = make_vae(VAE_TINY)
  ours = svd.vae_from_diffusers(reference)
  latents = np.random.default_rng(2).standard_normal((5, 4, 4, 4)).astype(np.float32)
  chunk = 2
  with torch.no_grad():  # what StableVideoDiffusionPipeline.decode_latents does
    torch_latents = torch.from_numpy(latents).permute(0, 3, 1, 2)
    expected = torch.cat([reference.decode(torch_latents[i:i + chunk],
                                           num_frames=len(torch_latents[i:i + chunk])).sample
                          for i in range(0, 5, chunk)]).permute(0, 2, 3, 1).numpy()
  decoded = svd.decode_in_chunks(ours, latents, chunk)
  assert relative_error(decoded, expected) < MODEL_TOLERANCE


def test_round_trip_and_exported_folder_loads_in_diffusers(unet_case, tmp_path):
  reference, ours, inputs, expected = unet_case
  exported = svd.to_diffusers(ours)
  original = reference.state_dict()
  assert set(exported) == set(original)
  for key, tensor in original.items():
    np.testing.assert_array_equal(exported[key], tensor.numpy(), err_msg=key)

  svd.export_diffusers(ours, tmp_path / "unet")
  reloaded = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet").eval()
  np.testing.assert_array_equal(run_torch_unet(reloaded, inputs), expected)


def test_vae_round_trip(vae_case, tmp_path):
  reference, ours = vae_case
  exported = svd.to_diffusers(ours)
  for key, tensor in reference.state_dict().items():
    np.testing.assert_array_equal(exported[key], tensor.numpy(), err_msg=key)
  svd.export_diffusers(ours, tmp_path / "vae")
  reloaded = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "vae")
  for key, tensor in reloaded.state_dict().items():
    np.testing.assert_array_equal(exported[key], tensor.numpy(), err_msg=key)


def test_orbax_save_and_load(unet_case, tmp_path):
  _, ours, _, _ = unet_case
  svd.save_svd_model(ours, tmp_path / "ours")
  restored = svd.load_unet(tmp_path / "ours")
  assert restored.config == ours.config
  saved, loaded = nnx.state(ours), nnx.state(restored)
  assert jax.tree.structure(saved) == jax.tree.structure(loaded)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="not a AutoencoderKLTemporalDecoder"):
    svd.load_vae(tmp_path / "ours")


def test_saved_state_that_does_not_match_its_config_is_refused(unet_case, tmp_path):
  _, ours, _, _ = unet_case
  svd.save_svd_model(ours, tmp_path / "ours")
  config_file = tmp_path / "ours" / "config.json"
  fields = json.loads(config_file.read_text())
  fields["cross_attention_dim"] = 24  # as if someone edited the config after converting
  config_file.write_text(json.dumps(fields))
  with pytest.raises(ValueError,
                     match=r"(?s)does not match its config.json.*attn2\.to_k\.kernel: saved"):
    svd.load_unet(tmp_path / "ours")


def test_bf16_compute_with_fp32_weights_tracks_fp32():
  """The GPU/TPU setting (Compute.gpu() minus cuDNN): bf16 activations over fp32 master weights.

  bf16 keeps 8 bits of mantissa (relative step 2**-8 = 4e-3); through ~40 layers the output stays
  within a few percent of fp32, while a dtype bug (a cast missed or a norm in bf16) gives O(1).
  """

  reference = make_unet(UNET_TWO_LEVELS)
  inputs = unet_inputs(UNET_TWO_LEVELS)
  ours = svd.unet_from_diffusers(reference, compute=Compute(dtype=jnp.bfloat16))
  assert ours.conv_in.kernel[...].dtype == jnp.float32
  got = unet_forward(ours, inputs)
  assert got.dtype == jnp.bfloat16
  assert relative_error(np.asarray(got, np.float32), run_torch_unet(reference, inputs)) < 5e-2
