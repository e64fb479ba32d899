"""Per-block parity of the SVD building blocks with diffusers' own modules (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention import (
  BasicTransformerBlock as DiffusersBasicTransformerBlock,
  TemporalBasicTransformerBlock as DiffusersTemporalBasicTransformerBlock,
)
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.downsampling import Downsample2D as DiffusersDownsample2D
from diffusers.models.embeddings import (
  TimestepEmbedding as DiffusersTimestepEmbedding,
  get_timestep_embedding,
)
from diffusers.models.resnet import (
  ResnetBlock2D as DiffusersResnetBlock2D,
  SpatioTemporalResBlock as DiffusersSpatioTemporalResBlock,
  TemporalResnetBlock as DiffusersTemporalResnetBlock,
)
from diffusers.models.transformers.transformer_temporal import (
  TransformerSpatioTemporalModel as DiffusersTransformerSpatioTemporalModel,
)
from diffusers.models.upsampling import Upsample2D as DiffusersUpsample2D
from flax import nnx

from etalk_jax.layers.attention import Attention
from etalk_jax.layers.embeddings import TimestepEmbedding, timestep_features
from etalk_jax.layers.resnet import (
  Downsample2D,
  ResnetBlock2D,
  SpatioTemporalResBlock,
  TemporalResnetBlock,
  Upsample2D,
)
from etalk_jax.layers.transformer import BasicTransformerBlock, TemporalBasicTransformerBlock
from etalk_jax.svd.params import RENAMES
from etalk_jax.svd.unet import TransformerSpatioTemporalModel
from etalk_jax.weights import ConversionTable, DictSource, load_into
from tests.helpers.svd_reference import perturb, relative_error

BLOCK_TOLERANCE = 1e-5
rng = np.random.default_rng(0)


def converted(ours: nnx.Module, theirs: torch.nn.Module) -> nnx.Module:
  perturb(theirs)
  return load_into(ours, DictSource(theirs.state_dict()),
                   ConversionTable.build(ours, renames=RENAMES))


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  return np.moveaxis(x.detach().numpy(), 1, -1)


def randn(*shape) -> np.ndarray:
  return rng.standard_normal(shape, dtype=np.float32)


def test_timestep_features_match_diffusers():
  # SVD's arguments: c_noise in [-2, 2], fps, motion bucket 127, noise augmentation, frame index.
  steps = np.array([-1.7, 0.0, 0.02, 1.5, 6.0, 24.0, 127.0], np.float32)
  # fp32 exp differs by an ulp between libraries; the phase error is then ~ulp(|t|).
  atol = 2 * float(np.spacing(np.float32(np.abs(steps).max())))
  for dim in (8, 9, 320):
    expected = get_timestep_embedding(torch.from_numpy(steps), dim, flip_sin_to_cos=True,
                                      downscale_freq_shift=0).numpy()
    np.testing.assert_allclose(timestep_features(steps, dim), expected, atol=atol, rtol=0)


def test_timestep_embedding():
  theirs = DiffusersTimestepEmbedding(16, 64, out_dim=16)
  ours = converted(TimestepEmbedding(16, 64, out_dim=16, rngs=nnx.Rngs(0)), theirs)
  x = randn(3, 16)
  assert relative_error(ours(x), theirs(torch.from_numpy(x)).detach()) < BLOCK_TOLERANCE


@pytest.mark.parametrize("in_channels,out_channels", [(32, 32), (32, 64)])
def test_resnet_block_2d(in_channels, out_channels):
  theirs = DiffusersResnetBlock2D(in_channels=in_channels, out_channels=out_channels,
                                  temb_channels=24, eps=1e-5)
  ours = converted(ResnetBlock2D(in_channels, out_channels, 24, eps=1e-5, rngs=nnx.Rngs(0)),
                   theirs)
  x, temb = randn(2, 6, 6, in_channels), randn(2, 24)
  expected = nhwc(theirs(nchw(x), torch.from_numpy(temb)))
  assert relative_error(ours(x, temb), expected) < BLOCK_TOLERANCE


def test_temporal_resnet_block_pools_norm_over_frames():
  theirs = DiffusersTemporalResnetBlock(32, 64, temb_channels=24, eps=1e-5)
  ours = converted(TemporalResnetBlock(32, 64, 24, eps=1e-5, rngs=nnx.Rngs(0)), theirs)
  x, temb = randn(2, 5, 4, 4, 32), randn(2, 5, 24)  # (batch, frames, h, w, ch)
  torch_x = torch.from_numpy(x).permute(0, 4, 1, 2, 3)  # (batch, ch, frames, h, w)
  expected = theirs(torch_x, torch.from_numpy(temb)).permute(0, 2, 3, 4, 1).detach().numpy()
  assert relative_error(ours(x, temb), expected) < BLOCK_TOLERANCE


@pytest.mark.parametrize("decoder_style", [False, True])
def test_spatio_temporal_res_block(decoder_style):
  batch, frames = 2, 3
  if decoder_style:  # the VAE decoder's: no timestep, "learned" mix, switched alpha
    kw = dict(eps=1e-6, temporal_eps=1e-5, merge_factor=0.0, merge_strategy="learned",
              switch_spatial_to_temporal_mix=True)
    temb_channels = None
  else:
    kw = dict(eps=1e-5)
    temb_channels = 24
  theirs = DiffusersSpatioTemporalResBlock(32, 64, temb_channels=temb_channels, **kw)
  ours = converted(SpatioTemporalResBlock(32, 64, temb_channels, rngs=nnx.Rngs(0), **kw), theirs)
  x = randn(batch * frames, 4, 4, 32)
  temb = randn(batch * frames, 24) if temb_channels else None
  indicator = np.zeros((batch, frames), np.float32)
  expected = nhwc(theirs(nchw(x), None if temb is None else torch.from_numpy(temb),
                         torch.from_numpy(indicator)))
  assert relative_error(ours(x, temb, indicator), expected) < BLOCK_TOLERANCE


def test_image_only_frames_skip_the_temporal_path():
  theirs = DiffusersSpatioTemporalResBlock(32, 32, temb_channels=8, eps=1e-5)
  ours = converted(SpatioTemporalResBlock(32, 32, 8, eps=1e-5, rngs=nnx.Rngs(0)), theirs)
  x, temb = randn(4, 4, 4, 32), randn(4, 8)
  indicator = np.array([[0, 1], [1, 0]], np.float32)
  expected = nhwc(theirs(nchw(x), torch.from_numpy(temb), torch.from_numpy(indicator)))
  assert relative_error(ours(x, temb, indicator), expected) < BLOCK_TOLERANCE


@pytest.mark.parametrize("cross", [None, 40])
def test_attention(cross):
  theirs = DiffusersAttention(64, cross_attention_dim=cross, heads=4, dim_head=16)
  ours = converted(Attention(64, heads=4, dim_head=16, cross_attention_dim=cross,
                             rngs=nnx.Rngs(0)), theirs)
  x = randn(2, 10, 64)
  context = randn(2, 3, cross) if cross else None
  expected = theirs(torch.from_numpy(x),
                    None if context is None else torch.from_numpy(context)).detach()
  assert relative_error(ours(x, context), expected) < BLOCK_TOLERANCE


def test_vae_style_attention_with_group_norm_and_residual():
  theirs = DiffusersAttention(64, heads=1, dim_head=64, eps=1e-6, norm_num_groups=32, bias=True,
                  residual_connection=True, upcast_softmax=True, _from_deprecated_attn_block=True)
  ours = converted(Attention(64, heads=1, dim_head=64, qkv_bias=True, norm_num_groups=32,
                             norm_eps=1e-6, residual_connection=True, rngs=nnx.Rngs(0)), theirs)
  x = randn(2, 5, 6, 64)
  assert relative_error(ours(x), nhwc(theirs(nchw(x)))) < BLOCK_TOLERANCE


def test_basic_transformer_block():
  theirs = DiffusersBasicTransformerBlock(64, 4, 16, cross_attention_dim=40)
  ours = converted(BasicTransformerBlock(64, 4, 16, 40, rngs=nnx.Rngs(0)), theirs)
  x, context = randn(3, 12, 64), randn(3, 2, 40)
  expected = theirs(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(context))
  assert relative_error(ours(x, context), expected.detach()) < BLOCK_TOLERANCE


def test_temporal_transformer_block():
  batch, frames, tokens = 2, 5, 6
  theirs = DiffusersTemporalBasicTransformerBlock(64, 64, 4, 16, cross_attention_dim=40)
  ours = converted(TemporalBasicTransformerBlock(64, 64, 4, 16, 40, rngs=nnx.Rngs(0)), theirs)
  x, context = randn(batch * frames, tokens, 64), randn(batch, 2, 40)
  # diffusers copies the clip context to every spatial position; we fold positions instead.
  per_position = np.repeat(context, tokens, axis=0)
  expected = theirs(torch.from_numpy(x), frames, torch.from_numpy(per_position)).detach()
  assert relative_error(ours(x, frames, context), expected) < BLOCK_TOLERANCE


@pytest.mark.parametrize("num_layers", [1, 2])
def test_transformer_spatio_temporal_model(num_layers):
  batch, frames = 2, 3
  theirs = DiffusersTransformerSpatioTemporalModel(4, 16, in_channels=64, num_layers=num_layers,
                                                   cross_attention_dim=40)
  ours = converted(TransformerSpatioTemporalModel(4, 16, 64, num_layers, 40, rngs=nnx.Rngs(0)),
                   theirs)
  x = randn(batch * frames, 4, 4, 64)
  context = np.repeat(randn(batch, 2, 40), frames, axis=0)
  indicator = np.zeros((batch, frames), np.float32)
  expected = theirs(nchw(x), encoder_hidden_states=torch.from_numpy(context),
                    image_only_indicator=torch.from_numpy(indicator)).sample
  assert relative_error(ours(x, context, indicator), nhwc(expected)) < BLOCK_TOLERANCE


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(padding):
  theirs = DiffusersDownsample2D(32, use_conv=True, out_channels=32, padding=padding, name="op")
  ours = converted(Downsample2D(32, padding=padding, rngs=nnx.Rngs(0)), theirs)
  x = randn(2, 8, 8, 32)
  assert relative_error(ours(x), nhwc(theirs(nchw(x)))) < BLOCK_TOLERANCE


def test_upsample():
  theirs = DiffusersUpsample2D(32, use_conv=True, out_channels=32)
  ours = converted(Upsample2D(32, rngs=nnx.Rngs(0)), theirs)
  x = randn(2, 4, 4, 32)
  assert relative_error(ours(x), nhwc(theirs(nchw(x)))) < BLOCK_TOLERANCE
