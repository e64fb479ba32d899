"""Stable Video Diffusion's spatio-temporal UNet (diffusers' UNetSpatioTemporalConditionModel).

Activations are channels-last; frames are folded into the batch for per-frame layers:
`(batch * frames, height, width, channels)`. Module and parameter names follow diffusers, so the
converter in params.py is a short rename table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax.layers.compute import FP32, Compute, call_block, call_layer
from etalk_jax.layers.embeddings import TimestepEmbedding, timestep_features
from etalk_jax.layers.logical_axes import register_family
from etalk_jax.layers.norm import group_norm
from etalk_jax.layers.resnet import (
  SPATIO_TEMPORAL_AXES,
  AlphaBlender,
  Downsample2D,
  SpatioTemporalResBlock,
  Upsample2D,
  conv,
)
from etalk_jax.layers.sharding import constrain_rows
from etalk_jax.layers.transformer import BasicTransformerBlock, TemporalBasicTransformerBlock
from etalk_jax.svd.config import UNetConfig


class TransformerSpatioTemporalModel(nnx.Module):
  """Per-frame transformer blocks interleaved with temporal ones, blended by a learned alpha.

  The temporal path gets a sinusoidal frame-index embedding and cross-attends to the first
  frame's context (`time_context`), as in SVD. Subclasses (ETHD) swap the block classes and read
  their extra inputs from `conditions`.
  """

  spatial_block_cls = BasicTransformerBlock
  temporal_block_cls = TemporalBasicTransformerBlock

  def __init__(self, heads: int, head_dim: int, in_channels: int, num_layers: int,
               cross_attention_dim: int | None, *, compute: Compute = FP32, rngs: nnx.Rngs):
    inner_dim = heads * head_dim
    kw = compute.dense_kwargs()
    self.compute_dtype = compute.dtype
    self.remat = compute.remat
    self.norm = group_norm(in_channels, 1e-6, compute=compute, rngs=rngs)
    self.proj_in = nnx.Linear(in_channels, inner_dim, rngs=rngs, **kw)
    self.transformer_blocks = nnx.List([
        self.spatial_block_cls(inner_dim, heads, head_dim, cross_attention_dim, compute=compute,
                               rngs=rngs) for _ in range(num_layers)])
    self.temporal_transformer_blocks = nnx.List([
        self.temporal_block_cls(inner_dim, inner_dim, heads, head_dim, cross_attention_dim,
                                compute=compute, rngs=rngs) for _ in range(num_layers)])
    self.time_pos_embed = TimestepEmbedding(in_channels, in_channels * 4, out_dim=in_channels,
                                            compute=compute, rngs=rngs)
    self.time_mixer = AlphaBlender(0.5, "learned_with_images", compute=compute)
    self.proj_out = nnx.Linear(inner_dim, in_channels, rngs=rngs, **kw)

  def __call__(self, x: jax.Array, context: jax.Array, image_only_indicator: jax.Array,
               conditions: dict | None = None) -> jax.Array:
    """x: `(batch * frames, h, w, ch)`; context: `(batch * frames, len, ctx_dim)`.

    conditions: extra inputs a subclass's blocks consume (see `block_inputs`); SVD has none.
    """
    batch, frames = image_only_indicator.shape
    batch_frames, height, width, channels = x.shape
    spatial_inputs, temporal_inputs = self.block_inputs(x, context, image_only_indicator,
                                                        conditions)
    residual = x
    h = self.norm(x).reshape(batch_frames, height * width, channels)
    h = self.proj_in(h)
    frame_index = jnp.tile(jnp.arange(frames), batch)
    frame_emb = self.time_pos_embed(
        timestep_features(frame_index, channels).astype(self.compute_dtype))[:, None, :]
    # Layer remat nests here: the backward pass of this whole transformer (itself a layer)
    # holds one spatial or temporal block's internals at a time.
    spatial_call = lambda block, h, context, inputs: block(h, context, **inputs)  # noqa: E731
    temporal_call = lambda block, h, inputs: block(h, frames, **inputs)  # noqa: E731
    for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
      h = constrain_rows(call_layer(self.remat, block, h, context, spatial_inputs,
                                     call=spatial_call))
      temporal = call_layer(self.remat, temporal_block, h + frame_emb, temporal_inputs,
                            call=temporal_call)
      h = self.time_mixer(h.reshape(batch, frames, *h.shape[1:]),
                          temporal.reshape(batch, frames, *temporal.shape[1:]),
                          image_only_indicator).reshape(h.shape)
    h = self.proj_out(h).reshape(batch_frames, height, width, channels)
    return h + residual

  def block_inputs(self, x, context, image_only_indicator, conditions):
    """Keyword inputs of the spatial and the temporal blocks. SVD's temporal blocks attend to
    the first frame's context (`time_context`, `(batch, len, ctx_dim)`), as diffusers does."""
    batch, frames = image_only_indicator.shape
    time_context = context.reshape(batch, frames, *context.shape[1:])[:, 0]
    return {}, {"context": time_context}


def _layer(remat: str, layer: nnx.Module, x: jax.Array, *args) -> jax.Array:
  """One res block or transformer of a UNet block: rematerialised as `remat` says, its output
  kept sharded over (batch, frames) when a mesh is set. (A transformer's spatial and temporal
  blocks are rematerialised again inside it.)"""
  return constrain_rows(call_layer(remat, layer, x, *args))


class DownBlockSpatioTemporal(nnx.Module):
  """Res blocks (each followed by a spatio-temporal transformer if `cross_attention_dim` is
  given: diffusers' CrossAttnDownBlockSpatioTemporal), then an optional stride-2 conv."""

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, *,
               add_downsample: bool, cross_attention_dim: int | None = None, heads: int = 1,
               transformer_layers: int = 1, transformer_cls=TransformerSpatioTemporalModel,
               compute: Compute = FP32, rngs: nnx.Rngs):
    # diffusers' epsilons, as they are: 1e-6 in CrossAttnDownBlockSpatioTemporal, 1e-5 without.
    self.remat = compute.remat
    eps = 1e-6 if cross_attention_dim is not None else 1e-5
    self.resnets = nnx.List([
        SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels,
                               temb_channels, eps=eps, compute=compute, rngs=rngs)
        for i in range(num_layers)])
    self.attentions = (nnx.List([
        transformer_cls(heads, out_channels // heads, out_channels, transformer_layers,
                        cross_attention_dim, compute=compute, rngs=rngs)
        for _ in range(num_layers)]) if cross_attention_dim is not None else None)
    self.downsamplers = (nnx.List([Downsample2D(out_channels, compute=compute, rngs=rngs)])
                         if add_downsample else None)

  def __call__(self, x, temb, context, image_only_indicator, conditions=None):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = _layer(self.remat, resnet, x, temb, image_only_indicator)
      if self.attentions is not None:
        x = _layer(self.remat, self.attentions[i], x, context, image_only_indicator, conditions)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class UpBlockSpatioTemporal(nnx.Module):
  """Res blocks over (x ⊕ skip), each optionally followed by a spatio-temporal transformer
  (diffusers' CrossAttnUpBlockSpatioTemporal), then an optional x2 upsampler."""

  def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int,
               temb_channels: int, num_layers: int, *, add_upsample: bool,
               cross_attention_dim: int | None = None, heads: int = 1,
               transformer_layers: int = 1, transformer_cls=TransformerSpatioTemporalModel,
               compute: Compute = FP32, rngs: nnx.Rngs):
    self.remat = compute.remat
    resnets = []
    for i in range(num_layers):
      skip_channels = in_channels if i == num_layers - 1 else out_channels
      resnet_in = prev_output_channels if i == 0 else out_channels
      # get_up_block passes no resnet_eps to the spatio-temporal up blocks: their 1e-6 holds.
      resnets.append(SpatioTemporalResBlock(resnet_in + skip_channels, out_channels,
                                            temb_channels, eps=1e-6, compute=compute,
                                            rngs=rngs))
    self.resnets = nnx.List(resnets)
    self.attentions = (nnx.List([
        transformer_cls(heads, out_channels // heads, out_channels, transformer_layers,
                        cross_attention_dim, compute=compute, rngs=rngs)
        for _ in range(num_layers)]) if cross_attention_dim is not None else None)
    self.upsamplers = (nnx.List([Upsample2D(out_channels, compute=compute, rngs=rngs)])
                       if add_upsample else None)

  def __call__(self, x, skips, temb, context, image_only_indicator, conditions=None):
    for i, resnet in enumerate(self.resnets):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = _layer(self.remat, resnet, x, temb, image_only_indicator)
      if self.attentions is not None:
        x = _layer(self.remat, self.attentions[i], x, context, image_only_indicator, conditions)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class UNetMidBlockSpatioTemporal(nnx.Module):
  def __init__(self, channels: int, temb_channels: int, *, transformer_layers: int,
               heads: int, cross_attention_dim: int,
               transformer_cls=TransformerSpatioTemporalModel, compute: Compute = FP32,
               rngs: nnx.Rngs):
    self.remat = compute.remat
    self.resnets = nnx.List([
        SpatioTemporalResBlock(channels, channels, temb_channels, eps=1e-5, compute=compute,
                               rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([
        transformer_cls(heads, channels // heads, channels, transformer_layers,
                        cross_attention_dim, compute=compute, rngs=rngs)])

  def __call__(self, x, temb, context, image_only_indicator, conditions=None):
    x = _layer(self.remat, self.resnets[0], x, temb, image_only_indicator)
    x = _layer(self.remat, self.attentions[0], x, context, image_only_indicator, conditions)
    return _layer(self.remat, self.resnets[1], x, temb, image_only_indicator)


class UNetSpatioTemporal(nnx.Module):
  """`unet(sample, timestep, encoder_hidden_states, added_time_ids)`.

  sample: `(batch, frames, height, width, in_channels)`; timestep: scalar or `(batch,)`
  (SVD feeds `c_noise`); encoder_hidden_states: `(batch, len, cross_attention_dim)`;
  added_time_ids: `(batch, n_ids)` (SVD: fps, motion bucket, noise augmentation).
  Returns `(batch, frames, height, width, out_channels)`.
  """

  transformer_cls = TransformerSpatioTemporalModel  # ETHD swaps in its own
  logical_family = register_family("unet", SPATIO_TEMPORAL_AXES)

  def __init__(self, config: UNetConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    self.config = config
    self.compute_dtype = compute.dtype
    self.remat = compute.remat
    channels = config.block_out_channels
    levels = len(channels)
    layers = config.per_level("layers_per_block")
    heads = config.per_level("num_attention_heads")
    cross_dims = config.per_level("cross_attention_dim")
    transformer_layers = config.per_level("transformer_layers_per_block")
    temb_channels = channels[0] * 4
    common = dict(compute=compute, rngs=rngs)
    with_transformer = dict(common, transformer_cls=self.transformer_cls)

    self.conv_in = conv(config.in_channels, channels[0], **common)
    self.time_embedding = TimestepEmbedding(channels[0], temb_channels, **common)
    self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim,
                                           temb_channels, **common)
    down_blocks = []
    out_ch = channels[0]
    for i, block_type in enumerate(config.down_block_types):
      in_ch, out_ch = out_ch, channels[i]
      with_attention = block_type == "CrossAttnDownBlockSpatioTemporal"
      down_blocks.append(DownBlockSpatioTemporal(
          in_ch, out_ch, temb_channels, layers[i], add_downsample=i < levels - 1,
          cross_attention_dim=cross_dims[i] if with_attention else None, heads=heads[i],
          transformer_layers=transformer_layers[i], **with_transformer))
    self.down_blocks = nnx.List(down_blocks)
    self.mid_block = UNetMidBlockSpatioTemporal(
        channels[-1], temb_channels, transformer_layers=transformer_layers[-1], heads=heads[-1],
        cross_attention_dim=cross_dims[-1], **with_transformer)
    up_blocks = []
    rev = lambda seq: tuple(reversed(seq))
    rev_channels, rev_layers, rev_heads = rev(channels), rev(layers), rev(heads)
    rev_cross, rev_transformer = rev(cross_dims), rev(transformer_layers)
    out_ch = rev_channels[0]
    for i, block_type in enumerate(config.up_block_types):
      prev_ch, out_ch = out_ch, rev_channels[i]
      in_ch = rev_channels[min(i + 1, levels - 1)]
      with_attention = block_type == "CrossAttnUpBlockSpatioTemporal"
      up_blocks.append(UpBlockSpatioTemporal(
          in_ch, prev_ch, out_ch, temb_channels, rev_layers[i] + 1,
          add_upsample=i < levels - 1,
          cross_attention_dim=rev_cross[i] if with_attention else None, heads=rev_heads[i],
          transformer_layers=rev_transformer[i], **with_transformer))
    self.up_blocks = nnx.List(up_blocks)
    self.conv_norm_out = group_norm(channels[0], 1e-5, **common)
    self.conv_out = conv(channels[0], config.out_channels, **common)

  def time_embedding_of(self, timestep: jax.Array, added_time_ids: jax.Array, batch: int
                        ) -> jax.Array:
    """(batch, temb) from the diffusion timestep and the added time ids."""
    config = self.config
    timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
    emb = self.time_embedding(
        timestep_features(timestep, config.block_out_channels[0]).astype(self.compute_dtype))
    ids = timestep_features(added_time_ids.reshape(-1), config.addition_time_embed_dim)
    return emb + self.add_embedding(ids.reshape(batch, -1).astype(self.compute_dtype))

  def __call__(self, sample: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
               added_time_ids: jax.Array, image_only_indicator: jax.Array | None = None
               ) -> jax.Array:
    return self.forward(sample, timestep, encoder_hidden_states, added_time_ids,
                        image_only_indicator)

  def forward(self, sample, timestep, encoder_hidden_states, added_time_ids,
              image_only_indicator=None, conditions: dict | None = None,
              frame_context: bool = False) -> jax.Array:
    """The UNet pass. frame_context: `encoder_hidden_states` is already per frame,
    `(batch * frames, len, dim)` (ETHD's lip tokens); conditions: what the transformer class
    consumes beyond SVD's inputs."""
    batch, frames, height, width, _ = sample.shape
    if image_only_indicator is None:
      image_only_indicator = jnp.zeros((batch, frames), self.compute_dtype)
    temb = jnp.repeat(self.time_embedding_of(timestep, added_time_ids, batch), frames, axis=0)
    context = encoder_hidden_states.astype(self.compute_dtype)
    if not frame_context:
      context = jnp.repeat(context, frames, axis=0)
    x = constrain_rows(self.conv_in(
        sample.astype(self.compute_dtype).reshape(batch * frames, height, width, -1)))
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = call_block(self.remat, block, x, temb, context, image_only_indicator,
                                  conditions)
      skips.extend(block_skips)
    x = call_block(self.remat, self.mid_block, x, temb, context, image_only_indicator,
                   conditions)
    for block in self.up_blocks:
      count = len(block.resnets)
      block_skips, skips = skips[-count:], skips[:-count]
      x = call_block(self.remat, block, x, block_skips, temb, context, image_only_indicator,
                     conditions)
    x = self.conv_out(nnx.silu(self.conv_norm_out(x)))
    return x.reshape(batch, frames, height, width, -1)
