"""ETHD: the emotional talking-head backbone, SVD's UNet with lip, EDI and expression conditioning.

docs/ARCHITECTURE.md §3.5. Inputs per clip of `frames` frames:
  sample            `(batch, frames, h, w, 8)`: the scaled noisy latent ⊕ the reference latent
                    (unscaled, as SVD concatenates its image latent)
  timestep          c_noise (scalar or `(batch,)`)
  lip_latents       `(batch, frames, lip_dim)`: l_a (V-AID's projector) or l_v
  expression        `(batch, frames, expression_dim)`: the driving expression e_dri
  reference_expression `(batch, expression_dim)`: e_ref = ExpEncoder(portrait)
  face_mask         `(batch, H, W)` in [0, 1], face minus mouth, at the latent size or a multiple
Each frame's lip tokens are the projected l_a of its ±2-frame window (edge frames repeated); the
driving expression tokens are the projected e_dri of the same window, with frames past the clip
masked out (a banded mask), and the reference token is the projected e_ref. SVD's added time ids
stay, fixed by the config.

At initialisation from SVD (`ethd_from_svd`) the token projections' output layers are zero, so
every token is a zero vector: each cross-attention over them returns what it returns for SVD's
unconditional (all-zero) image embedding, EDI's Δ is 0, and outside the face mask the temporal
blocks add that same zero-context term. ETHD then equals the SVD UNet run with a zero image
embedding, for any lip and expression latents and any face mask (tests/ethd/test_ethd.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from etalk_jax import model_io
from etalk_jax.errors import UserError
from etalk_jax.ethd.edi import ETHDTransformer
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.layers.logical_axes import register_family
from etalk_jax.layers.resnet import SPATIO_TEMPORAL_AXES
from etalk_jax.svd.config import UNetConfig
from etalk_jax.svd.params import unet_from_diffusers
from etalk_jax.svd.unet import UNetSpatioTemporal


@dataclasses.dataclass(frozen=True)
class ETHDConfig:
  unet: UNetConfig = UNetConfig()
  lip_dim: int = 512           # l_a / l_v: PD-FGC's mouth feature
  expression_dim: int = 30     # e: PD-FGC's expression embedding
  window: int = 5              # ±2 frames of lip and expression tokens per frame
  # SVD's added time ids: fps - 1 = 24 as SVD's pipeline counts it, motion bucket, noise aug.
  added_time_ids: tuple[float, ...] = (24.0, 127.0, 0.02)
  # What the diffusion denoises: the codec's latents ("absolute", SVD's and the paper's), or their
  # difference to the reference latent times `target_scale` ("reference_relative"), which a small
  # model trained from scratch learns far faster: the identity is given, only motion is modelled.
  latent_target: str = "absolute"
  target_scale: float = 1.0
  # Per-dimension mean and std of the lip stream ETHD is trained on (empty: none). The lip
  # latents are standardised with them before the token MLP: a lip encoder's l_v (and the l_a
  # trained to match it) can vary over time by ~1% of its magnitude, which a token MLP at its
  # initial scale passes on as a near-constant context. Data statistics, not weights: the stage
  # that trains ETHD measures them on its own lip stream (`config.ethd.lip_statistics_batches`).
  lip_mean: tuple[float, ...] = ()
  lip_std: tuple[float, ...] = ()

  def __post_init__(self):
    if self.latent_target not in ("absolute", "reference_relative"):
      raise UserError(f"latent_target must be 'absolute' or 'reference_relative', got "
                      f"{self.latent_target!r}")
    if not isinstance(self.unet.cross_attention_dim, int):
      raise UserError("ETHD needs one cross_attention_dim for all levels (the token width)")
    if self.window % 2 == 0:
      raise UserError(f"window must be odd (centred on the frame), got {self.window}")
    if len(self.lip_mean) != len(self.lip_std) or (self.lip_mean and
                                                   len(self.lip_mean) != self.lip_dim):
      raise UserError(f"lip_mean and lip_std must both be empty or both hold lip_dim = "
                      f"{self.lip_dim} values, got {len(self.lip_mean)} and {len(self.lip_std)}")
    if any(not std > 0 for std in self.lip_std):
      raise UserError("lip_std must be positive in every dimension")

  @property
  def token_dim(self) -> int:
    return self.unet.cross_attention_dim

  @property
  def noise_aug_strength(self) -> float:
    """The pixel noise the reference frame is augmented with before the VAE encodes it: the
    third added time id, so what the UNet is told and what it is given cannot disagree."""
    if len(self.added_time_ids) < 3:
      raise UserError(f"added_time_ids {self.added_time_ids} hold no noise augmentation "
                      "strength (SVD's third id)")
    return float(self.added_time_ids[2])

  def to_dict(self) -> dict[str, Any]:
    return {"unet": self.unet.to_dict(), "lip_dim": self.lip_dim,
            "expression_dim": self.expression_dim, "window": self.window,
            "added_time_ids": list(self.added_time_ids), "latent_target": self.latent_target,
            "target_scale": self.target_scale, "lip_mean": list(self.lip_mean),
            "lip_std": list(self.lip_std)}

  def standardize_lip(self, lip_latents):
    """l_a / l_v `(..., lip_dim)` -> what the lip token MLP reads (unchanged without
    statistics)."""
    if not self.lip_mean:
      return lip_latents
    mean = jnp.asarray(self.lip_mean, lip_latents.dtype)
    return (lip_latents - mean) / jnp.asarray(self.lip_std, lip_latents.dtype)

  def to_target(self, latents, reference_latents):
    """Codec latents -> the diffusion target; `reference_latents` broadcasts against `latents`."""
    if self.latent_target == "absolute":
      return latents
    return (latents - reference_latents) * self.target_scale

  def from_target(self, target, reference_latents):
    """The inverse of `to_target`: sampled targets -> codec latents."""
    if self.latent_target == "absolute":
      return target
    return target / self.target_scale + reference_latents

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "ETHDConfig":
    fields = dict(fields)
    fields["unet"] = UNetConfig.from_dict(fields["unet"])
    for name in ("added_time_ids", "lip_mean", "lip_std"):
      if name in fields:
        fields[name] = tuple(float(value) for value in fields[name])
    return cls(**fields)


class TokenProjection(nnx.Module):
  """Linear -> SiLU -> Linear, from a latent to the cross-attention width."""

  def __init__(self, in_dim: int, out_dim: int, *, compute: Compute = FP32, rngs: nnx.Rngs):
    kw = compute.dense_kwargs()
    self.linear_1 = nnx.Linear(in_dim, out_dim, rngs=rngs, **kw)
    self.linear_2 = nnx.Linear(out_dim, out_dim, rngs=rngs, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(nnx.silu(self.linear_1(x)))


def frame_windows(values: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
  """`(batch, frames, d)` -> each frame's ±window//2 neighbours `(batch, frames, window, d)`
  (indices clipped at the clip's ends) and whether each neighbour exists `(frames, window)`."""
  frames = values.shape[1]
  offsets = jnp.arange(window) - window // 2
  index = jnp.arange(frames)[:, None] + offsets[None, :]
  inside = (index >= 0) & (index < frames)
  return values[:, jnp.clip(index, 0, frames - 1)], inside


class ETHD(UNetSpatioTemporal):
  transformer_cls = ETHDTransformer
  # The UNet's table: it covers the token projections (Linear) and EDI (attention) too.
  logical_family = register_family("ethd", SPATIO_TEMPORAL_AXES)

  def __init__(self, config: ETHDConfig, *, compute: Compute = FP32, rngs: nnx.Rngs):
    super().__init__(config.unet, compute=compute, rngs=rngs)
    self.ethd_config = config
    self.lip_proj = TokenProjection(config.lip_dim, config.token_dim, compute=compute,
                                    rngs=rngs)
    self.expression_proj = TokenProjection(config.expression_dim, config.token_dim,
                                           compute=compute, rngs=rngs)

  def tokens(self, lip_latents, expression, reference_expression, face_mask):
    """The per-frame lip tokens and the `conditions` the ETHD transformers read."""
    batch, frames = lip_latents.shape[:2]
    window = self.ethd_config.window
    dtype = self.compute_dtype
    lip = self.ethd_config.standardize_lip(lip_latents.astype(jnp.float32))
    lip_tokens, _ = frame_windows(self.lip_proj(lip.astype(dtype)), window)
    expression_tokens, inside = frame_windows(self.expression_proj(expression.astype(dtype)),
                                              window)
    reference = self.expression_proj(reference_expression.astype(dtype))
    conditions = {
        "expression_tokens": expression_tokens.reshape(batch * frames, window, -1),
        "expression_mask": jnp.broadcast_to(inside[None, :, None, None, :],
                                            (batch, frames, 1, 1, window)
                                            ).reshape(batch * frames, 1, 1, window),
        "reference_tokens": jnp.repeat(reference[:, None, None, :], frames, axis=1
                                       ).reshape(batch * frames, 1, -1),
        "face_mask": face_mask,
    }
    return lip_tokens.reshape(batch * frames, window, -1), conditions

  def __call__(self, sample: jax.Array, timestep: jax.Array, lip_latents: jax.Array,
               expression: jax.Array, reference_expression: jax.Array, face_mask: jax.Array
               ) -> jax.Array:
    lip_tokens, conditions = self.tokens(lip_latents, expression, reference_expression,
                                         face_mask)
    return self.forward_tokens(sample, timestep, lip_tokens, conditions)

  def forward_tokens(self, sample: jax.Array, timestep: jax.Array, lip_tokens: jax.Array,
                     conditions: dict) -> jax.Array:
    """The UNet pass on tokens already made (`tokens`' outputs, or any context of that form:
    the SVD parity test feeds SVD's image embedding), with the config's added time ids."""
    batch = sample.shape[0]
    added_time_ids = jnp.broadcast_to(
        jnp.asarray(self.ethd_config.added_time_ids, jnp.float32),
        (batch, len(self.ethd_config.added_time_ids)))
    return self.forward(sample, timestep, lip_tokens, added_time_ids, conditions=conditions,
                        frame_context=True)


# ----------------------------------------------------------------------------------------------
# From SVD weights, and our format
# ----------------------------------------------------------------------------------------------


def _initial_value(path: tuple, leaf, key: jax.Array) -> jax.Array:
  """A new (non-SVD) leaf's start:
    edi.to_out.*                        zero: Δ = 0 exactly, as EDI's design needs
    lip_proj / expression_proj.linear_2.*  zero: untrained tokens are zero vectors, so every
                                        cross-attention over them gives what SVD gives for its
                                        unconditional (zero) image embedding
    other kernels                       LeCun normal (flax's default)
    other biases                        zero"""
  names = [str(p) for p in path]
  if "edi" in names and "to_out" in names:
    return jnp.zeros(leaf.shape, leaf.dtype)
  if names[0] in ("lip_proj", "expression_proj") and names[1] == "linear_2":
    return jnp.zeros(leaf.shape, leaf.dtype)
  if names[-1] == "kernel":
    return nnx.initializers.lecun_normal()(key, leaf.shape, leaf.dtype)
  if names[-1] == "bias":
    return jnp.zeros(leaf.shape, leaf.dtype)
  raise ValueError(f"no initial value rule for ETHD's new parameter {'.'.join(names)}")


def ethd_from_svd(unet: UNetSpatioTemporal, config: ETHDConfig | None = None, *, seed: int = 0,
                  compute: Compute = FP32) -> ETHD:
  """ETHD whose SVD part IS `unet`'s weights (shared, not copied) and whose new layers (token
  projections, EDI) start as `_initial_value` says. So at this start, for any lip and
  expression latents, reference expression and face mask, `ETHD.__call__` computes what the SVD
  UNet computes with a zero image embedding (SVD's unconditional context); and
  `ETHD.forward` fed SVD's context as its lip and expression tokens under a full face mask
  computes what the SVD UNet computes with that context."""
  config = config or ETHDConfig(unet=unet.config)
  if config.unet != unet.config:
    raise UserError("the ETHD config's UNet differs from the SVD UNet it starts from")
  ethd = model_io.abstract(lambda rngs: ETHD(config, compute=compute, rngs=rngs))
  svd_leaves = dict(nnx.to_flat_state(nnx.state(unet)))
  key = jax.random.key(seed)
  for index, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(ethd))):
    if path in svd_leaves:
      variable.set_value(svd_leaves[path].get_value())
    else:
      variable.set_value(_initial_value(path, variable.get_value(),
                                        jax.random.fold_in(key, index)))
  return ethd


def ethd_from_diffusers(src: Any, config: ETHDConfig | None = None, **options) -> ETHD:
  """An SVD UNet in diffusers form (model, folder, ...) through the SVD converter, then ETHD."""
  compute = options.pop("compute", FP32)
  return ethd_from_svd(unet_from_diffusers(src, compute=compute, **options), config,
                       compute=compute)


def save_ethd(model: ETHD, folder: str | Path, *, overwrite: bool = False) -> Path:
  config = dict(model.ethd_config.to_dict(), _class_name="ETHD")
  return model_io.save_model(model, folder, config, overwrite=overwrite)


def load_ethd(folder: str | Path, compute: Compute = FP32) -> ETHD:
  fields = model_io.read_config(folder)
  if fields.pop("_class_name", None) != "ETHD":
    raise UserError(f"{folder} does not hold an ETHD model")
  config = ETHDConfig.from_dict(fields)
  return model_io.restore_model(folder, lambda: model_io.abstract(
      lambda rngs: ETHD(config, compute=compute, rngs=rngs)))
