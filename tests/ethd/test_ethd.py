"""ETHD on SVD's UNet: invariance to SVD at initialisation, EDI, windows, masks, full size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from etalk_jax import model_io, parallel
from etalk_jax.ethd import (
  ETHD,
  ETHDConfig,
  TemporalBlockWithExpression,
  ethd_from_svd,
  frame_windows,
  load_ethd,
  save_ethd,
)
from etalk_jax.ethd.edi import area_downsample
from etalk_jax.model_io import parameter_count
from etalk_jax.svd import UNetConfig, unet_from_diffusers
from etalk_jax.train.config import load_config
from etalk_jax.train.stages import common
from tests.helpers.svd_reference import (
  UNET_TWO_LEVELS,
  make_unet,
  relative_error,
  svd_context_as_tokens,
  unet_inputs,
)

TINY = dict(lip_dim=8, expression_dim=6)
svd_forward = nnx.jit(lambda unet, inputs: unet(**inputs))
ethd_forward = nnx.jit(lambda ethd, sample, t, lip, added, conditions: ethd.forward(
    sample, t, lip, added, conditions=conditions, frame_context=True))
ethd_call = nnx.jit(lambda ethd, *args: ethd(*args))


@pytest.fixture(scope="module")
def svd_and_ethd():
  unet = unet_from_diffusers(make_unet(UNET_TWO_LEVELS))
  inputs = unet_inputs(UNET_TWO_LEVELS, context_len=1)
  ethd = ethd_from_svd(unet, ETHDConfig(unet=unet.config, **TINY))
  return unet, ethd, inputs, np.asarray(svd_forward(unet, inputs))


def test_ethd_from_svd_computes_what_svd_computes(svd_and_ethd):
  unet, ethd, inputs, expected = svd_and_ethd
  lip, conditions = svd_context_as_tokens(inputs)
  # EDI starts at zero, so even a reference unlike the driving expression changes nothing.
  conditions["reference_tokens"] = np.random.default_rng(0).standard_normal(
      conditions["reference_tokens"].shape).astype(np.float32)
  got = ethd_forward(ethd, inputs["sample"], inputs["timestep"], lip, inputs["added_time_ids"],
                     conditions)
  assert relative_error(got, expected) < 1e-5


def test_ethd_at_init_is_svd_with_its_unconditional_context(svd_and_ethd):
  """Through `ETHD.__call__` with the real token projections, random l_a, e_dri and e_ref and a
  face mask that is neither 0 nor 1 at the attention levels: at init ETHD is the SVD UNet fed
  a zero image embedding (SVD's unconditional context)."""
  unet, ethd, inputs, _ = svd_and_ethd
  batch, frames, size = inputs["sample"].shape[:3]
  rng = np.random.default_rng(11)
  face_mask = np.zeros((batch, 2 * size, 2 * size), np.float32)
  face_mask[:, 3:13, 2:11] = 1.0  # a face that cuts through latents at every level
  face_mask[1] *= rng.uniform(0.2, 1.0, face_mask.shape[1:]).astype(np.float32)
  args = (inputs["sample"], inputs["timestep"],
          rng.standard_normal((batch, frames, TINY["lip_dim"])).astype(np.float32),
          rng.standard_normal((batch, frames, TINY["expression_dim"])).astype(np.float32),
          rng.standard_normal((batch, TINY["expression_dim"])).astype(np.float32), face_mask)
  got = ethd_call(ethd, *args)
  unconditional = dict(inputs, encoder_hidden_states=np.zeros_like(
      inputs["encoder_hidden_states"][:, :1]))
  unconditional["added_time_ids"] = np.broadcast_to(
      np.asarray(ethd.ethd_config.added_time_ids, np.float32), (batch, 3)).copy()
  expected = np.asarray(svd_forward(unet, unconditional))
  assert relative_error(got, expected) < 1e-5
  # The face mask matters once the tokens are no longer zero: the test above is not vacuous.
  moved = nnx.merge(*nnx.split(ethd))
  kernel = moved.expression_proj.linear_2.kernel
  kernel.set_value(rng.standard_normal(kernel.get_value().shape).astype(np.float32))
  assert relative_error(ethd_call(moved, *args), expected) > 1e-3


def _perturb_edi(ethd, parts=("edi",)):
  """Moves the new layers named in `parts` off their (partly zero) initial values, as training
  would; the token projections' output layers start at zero."""
  rng = np.random.default_rng(1)
  for path, variable in nnx.to_flat_state(nnx.state(ethd)):
    if any(part in path for part in parts):
      value = variable.get_value()
      variable.set_value(value + 0.05 * rng.standard_normal(value.shape).astype(np.float32))


TRAINED_PARTS = ("edi", "lip_proj", "expression_proj")


def test_edi_cancels_when_driving_expression_equals_reference(svd_and_ethd):
  unet, _, inputs, expected = svd_and_ethd
  ethd = ethd_from_svd(unet, ETHDConfig(unet=unet.config, **TINY))
  _perturb_edi(ethd)
  lip, conditions = svd_context_as_tokens(inputs)  # reference token = the driving tokens
  got = ethd_forward(ethd, inputs["sample"], inputs["timestep"], lip, inputs["added_time_ids"],
                     conditions)
  assert relative_error(got, expected) < 1e-5
  conditions["reference_tokens"] = conditions["reference_tokens"] + 1.0
  moved = ethd_forward(ethd, inputs["sample"], inputs["timestep"], lip,
                       inputs["added_time_ids"], conditions)
  assert relative_error(moved, expected) > 1e-3


def test_outside_the_face_mask_expression_has_no_say(svd_and_ethd):
  unet, _, inputs, _ = svd_and_ethd
  ethd = ethd_from_svd(unet, ETHDConfig(unet=unet.config, **TINY))
  _perturb_edi(ethd, TRAINED_PARTS)
  batch, frames = inputs["sample"].shape[:2]
  size = inputs["sample"].shape[2]
  rng = np.random.default_rng(2)
  outputs = []
  for _ in range(2):
    out = ethd_call(ethd, inputs["sample"], inputs["timestep"],
               rng.standard_normal((batch, frames, TINY["lip_dim"])).astype(np.float32) * 0,
               rng.standard_normal((batch, frames, TINY["expression_dim"])).astype(np.float32),
               rng.standard_normal((batch, TINY["expression_dim"])).astype(np.float32),
               np.zeros((batch, 2 * size, 2 * size), np.float32))  # a mask at twice the size
    outputs.append(np.asarray(out))
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-6)


def test_each_frame_reads_only_its_own_expression_window():
  rngs = nnx.Rngs(0)
  block = TemporalBlockWithExpression(32, 32, 2, 16, 12, rngs=rngs)
  batch, frames, tokens, window = 1, 6, 4, 5
  x = np.random.default_rng(3).standard_normal((batch * frames, tokens, 32)).astype(np.float32)
  context = np.random.default_rng(4).standard_normal((batch * frames, window, 12)
                                                     ).astype(np.float32)
  mask = np.ones((batch * frames, 1, 1, window), bool)
  face = np.ones((batch * frames, tokens, 1), np.float32)
  base = np.asarray(block(x, frames, context, context_mask=mask, face_mask=face))
  changed = context.copy()
  changed[2] += 1.0  # frame 2's window only
  out = np.asarray(block(x, frames, changed, context_mask=mask, face_mask=face))
  differs = np.abs(out - base).reshape(batch, frames, tokens, -1).max(axis=(0, 2, 3)) > 1e-6
  assert differs.tolist() == [False, False, True, False, False, False]


def test_frame_windows_and_band_mask():
  values = jnp.arange(4, dtype=jnp.float32).reshape(1, 4, 1)
  windows, inside = frame_windows(values, 5)
  assert windows[0, :, :, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3],
                                          [1, 2, 3, 3, 3]]
  assert inside.tolist() == [[False, False, True, True, True], [False, True, True, True, True],
                             [True, True, True, True, False], [True, True, True, False, False]]


def test_area_downsampling_of_masks():
  mask = np.zeros((1, 8, 8), np.float32)
  mask[0, :4, :4] = 1
  assert area_downsample(mask, 2, 2)[0].tolist() == [[1, 0], [0, 0]]
  assert area_downsample(mask, 8, 8).shape == (1, 8, 8)
  with pytest.raises(ValueError, match="does not divide"):
    area_downsample(mask, 3, 3)


def _edi_parameters_from_diffusers_shapes(unet: UNetConfig) -> int:
  """EDI's parameters derived from the layout of diffusers' UNetSpatioTemporalConditionModel,
  not from our modules: one cross-attention shaped like each spatial block's attn2 (to_q C x C,
  to_k and to_v cross_attention_dim x C without bias, to_out C x C with bias), in every spatial
  transformer: layers_per_block of them per cross-attention down level, one in the mid block,
  layers_per_block + 1 per cross-attention up level (diffusers' up blocks have one more layer)."""
  def attn2(width: int) -> int:
    return 2 * width * width + 2 * unet.cross_attention_dim * width + width

  widths = list(unet.block_out_channels)
  total = attn2(widths[-1])  # UNetMidBlockSpatioTemporal: one transformer
  for width, kind in zip(widths, unet.down_block_types):
    total += unet.layers_per_block * attn2(width) * kind.startswith("CrossAttn")
  for width, kind in zip(reversed(widths), unet.up_block_types):
    total += (unet.layers_per_block + 1) * attn2(width) * kind.startswith("CrossAttn")
  return total


def test_full_size_parameter_count_is_the_papers():
  ethd = model_io.abstract(lambda rngs: ETHD(ETHDConfig(), rngs=rngs))
  count = parameter_count(ethd)
  # SVD-XT's UNet as diffusers counts it (stabilityai/stable-video-diffusion-img2vid-xt).
  svd, edi = 1_524_623_082, _edi_parameters_from_diffusers_shapes(ETHDConfig().unet)
  assert edi == 50_352_320  # the figure docs/ARCHITECTURE.md §3.5 quotes
  projections = (512 * 1024 + 1024 + 1024 * 1024 + 1024) + (30 * 1024 + 1024 + 1024 * 1024 + 1024)
  assert count == svd + edi + projections
  print(f"ETHD full size: {count:,} parameters (paper: 1.58 G)")
  assert abs(count - 1.58e9) / 1.58e9 < 0.01


def call_args(inputs, seed: int) -> tuple:
  """ETHD's positional inputs: SVD's sample and timestep, random l_a, e and e_ref, a full face
  mask."""
  batch, frames, size = inputs["sample"].shape[:3]
  rng = np.random.default_rng(seed)
  return (inputs["sample"], inputs["timestep"],
          rng.standard_normal((batch, frames, TINY["lip_dim"])).astype(np.float32),
          rng.standard_normal((batch, frames, TINY["expression_dim"])).astype(np.float32),
          rng.standard_normal((batch, TINY["expression_dim"])).astype(np.float32),
          np.ones((batch, size, size), np.float32))


def test_call_shapes_and_save_load(svd_and_ethd, tmp_path):
  _, ethd, inputs, _ = svd_and_ethd
  batch, frames, size = inputs["sample"].shape[:3]
  out = ethd_call(ethd, *call_args(inputs, seed=5))
  assert out.shape == (batch, frames, size, size, 4) and out.dtype == jnp.float32
  save_ethd(ethd, tmp_path / "ethd")
  restored = load_ethd(tmp_path / "ethd")
  assert restored.ethd_config == ethd.ethd_config
  for a, b in zip(jax.tree.leaves(nnx.state(ethd)), jax.tree.leaves(nnx.state(restored))):
    np.testing.assert_array_equal(a, b)


def test_config_checks():
  with pytest.raises(ValueError, match="one cross_attention_dim"):
    ETHDConfig(unet=UNetConfig(cross_attention_dim=(1024, 1024, 1024, 1024)))
  with pytest.raises(ValueError, match="differs"):
    ethd_from_svd(unet_from_diffusers(make_unet(UNET_TWO_LEVELS)), ETHDConfig())
  with pytest.raises(ValueError, match="latent_target must be"):
    ETHDConfig(latent_target="relative")


def test_reference_relative_target_round_trips():
  config = ETHDConfig(latent_target="reference_relative", target_scale=4.0)
  assert ETHDConfig.from_dict(config.to_dict()) == config
  older = {name: value for name, value in config.to_dict().items()
           if name not in ("latent_target", "target_scale")}  # saved before the field existed
  assert ETHDConfig.from_dict(older).latent_target == "absolute"
  rng = np.random.default_rng(0)
  latents, reference = rng.normal(size=(2, 3, 4, 4, 4)), rng.normal(size=(2, 1, 4, 4, 4))
  target = config.to_target(latents, reference)
  np.testing.assert_allclose(target[:, :1], 4.0 * (latents[:, :1] - reference))
  np.testing.assert_allclose(config.from_target(target, reference), latents, atol=1e-12)
  assert ETHDConfig().to_target(latents, reference) is latents


def test_lip_statistics_standardise_the_lip_stream(svd_and_ethd, tmp_path):
  _, ethd, inputs, _ = svd_and_ethd
  ethd = nnx.merge(*nnx.split(ethd))
  _perturb_edi(ethd, TRAINED_PARTS)  # a lip projection that reads its input (zero at init)
  args = call_args(inputs, seed=7)
  rng = np.random.default_rng(1)
  mean = rng.normal(size=TINY["lip_dim"])
  std = rng.uniform(0.01, 0.1, size=TINY["lip_dim"])
  config = dataclasses.replace(ethd.ethd_config, lip_mean=tuple(mean), lip_std=tuple(std))
  standardised = nnx.merge(*nnx.split(ethd))
  standardised.ethd_config = config
  # A lip stream with those statistics reads as the plain model reads its standardised form.
  raw_lip = (args[2] * std + mean).astype(np.float32)
  np.testing.assert_allclose(ethd_call(standardised, *args[:2], raw_lip, *args[3:]),
                             ethd_call(ethd, *args), atol=2e-5)
  assert not np.allclose(ethd_call(ethd, *args[:2], raw_lip, *args[3:]),
                         ethd_call(ethd, *args), atol=1e-3)
  save_ethd(standardised, tmp_path / "ethd")
  assert load_ethd(tmp_path / "ethd").ethd_config == config
  older = {k: v for k, v in config.to_dict().items() if k not in ("lip_mean", "lip_std")}
  assert ETHDConfig.from_dict(older).lip_mean == ()
  with pytest.raises(ValueError, match="lip_dim = 8 values"):
    dataclasses.replace(config, lip_std=tuple(std[:3]))
  with pytest.raises(ValueError, match="positive"):
    dataclasses.replace(config, lip_std=(0.0,) * TINY["lip_dim"])


def test_stage_lip_statistics_replace_an_inits_and_otherwise_stay(svd_and_ethd, tmp_path):

  _, ethd, _, _ = svd_and_ethd
  saved = nnx.merge(*nnx.split(ethd))
  saved.ethd_config = dataclasses.replace(ethd.ethd_config, lip_mean=(1.0,) * 8,
                                          lip_std=(2.0,) * 8)
  save_ethd(saved, tmp_path / "renderer")
  config = load_config(f"{Path(__file__).parents[2] / 'configs' / 'ethd_512.py'}:tiny")
  config.ethd.unet = {k: v for k, v in ethd.ethd_config.unet.to_dict().items() if k[0] != "_"}
  config.ethd.init = f"ethd:{tmp_path / 'renderer'}"
  mesh = parallel.make_mesh({"data": -1})
  measured = common.lip_statistics(np.arange(48.0).reshape(2, 3, 8))
  np.testing.assert_allclose(measured[0], np.arange(20.0, 28.0))
  model = common.build_ethd(config, mesh, 8, 6, measured)
  assert (model.ethd_config.lip_mean, model.ethd_config.lip_std) == measured
  assert common.build_ethd(config, mesh, 8, 6).ethd_config == saved.ethd_config
  config.ethd.target_scale = 2.5  # this stage's latent scale, not the init's
  assert common.build_ethd(config, mesh, 8, 6).ethd_config == dataclasses.replace(
      saved.ethd_config, target_scale=2.5)
  with pytest.raises(ValueError, match="differs from config.ethd"):
    common.build_ethd(config, mesh, 8, 7, measured)


# ~1 min (three gradient programs of the tiny ETHD): in CI's slow subset (Makefile).
@pytest.mark.slow
def test_rematerialisation_changes_no_gradient(svd_and_ethd):
  """Per-block and per-layer remat (and the activation constraints, which need a mesh and are
  no-ops without one) recompute the same gradients as keeping every activation."""
  from etalk_jax.layers.compute import Compute  # noqa: PLC0415
  _, ethd, inputs, _ = svd_and_ethd
  args = call_args(inputs, seed=6)
  _, state = nnx.split(ethd)

  def gradients(remat: str):
    # The same weights under another policy: only the structure is built (an eager random init
    # of the tiny ETHD, thrown away, took ~8 s).
    model_graphdef, _ = nnx.split(model_io.abstract(
        lambda rngs: ETHD(ethd.ethd_config, compute=Compute(remat=remat), rngs=rngs)))
    loss = lambda params: jnp.sum(jnp.square(nnx.merge(model_graphdef, params)(*args)))  # noqa: E731
    return jax.jit(jax.grad(loss))(state)

  flat = lambda grads: np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])  # noqa: E731
  keep_all = flat(gradients("none"))
  for remat in ("blocks", "layers"):
    # Recomputed activations fuse differently, so fp32 rounding differs; judged over the whole
    # gradient (some entries, e.g. biases right before a GroupNorm, are rounding noise around 0):
    # about 2e-6 here, ~15 fp32 epsilons.
    difference = np.linalg.norm(flat(gradients(remat)) - keep_all) / np.linalg.norm(keep_all)
    assert difference < 1e-5, (remat, difference)  # a wrong recomputation is O(1)
