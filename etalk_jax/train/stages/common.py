"""What the stages share: the data spec (a Grain iterator over prepared clips), the frozen
encoders named by the config, and building a model straight onto its shardings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from data_pipeline import EMOTIONS, loader
from etalk_jax import parallel
from etalk_jax.audio import AudioFeatures
from etalk_jax.audio.params import load_wav2vec2
from etalk_jax.errors import InputNotFound, UserError
from etalk_jax.ethd import ETHD, ETHDConfig
from etalk_jax.ethd.model import ethd_from_svd, load_ethd
from etalk_jax.layers.compute import Compute
from etalk_jax.svd import UNetConfig
from etalk_jax.svd.codec import VAECodec, reference_noise
from etalk_jax.svd.params import load_unet
from etalk_jax.train import precompute
from etalk_jax.train.config import TRAIN_DEFAULTS, with_defaults
from etalk_jax.train.frozen import (
  feature_config,
  latent_codec_from_spec,
  vision_encoders_from_folder,
)
from etalk_jax.vaid.data import TrainingExamples, VAIDFeaturizer, unit_range_on_host

COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_of(config) -> Compute:
  """config.train.compute_dtype (float32 | bfloat16 over fp32 master weights), .remat and
  .attention -> `Compute`."""
  train = config.train
  dtype = train.compute_dtype
  if dtype not in COMPUTE_DTYPES:
    raise UserError(f"config.train.compute_dtype={dtype!r}: use float32 or bfloat16")
  return Compute(dtype=jax.numpy.dtype(dtype), param_dtype=jax.numpy.float32,
                 attention=train.attention, remat=train.remat)


def loader_iterator(config, *, with_frames: bool = True, with_reference: bool = True,
                    with_masks: bool = True, window: int | None = None, frame_masks: bool = False):
  """A checkpointable Grain iterator over `config.data` (dataset_dir, split, window, batch_size,
  seed, num_workers, reference, cross_clip_reference), this process's slice of the records."""

  data = config.data
  dataset_dir = data.dataset_dir
  if not dataset_dir:
    raise UserError("config.data.dataset_dir is not set; pass --config.data.dataset_dir=DIR (a "
                    "folder written by `etalk prepare` or `etalk synthesize`)")
  if not Path(dataset_dir).exists():
    raise InputNotFound(f"config.data.dataset_dir={dataset_dir} does not exist; run `etalk "
                        "prepare` or `etalk synthesize` first")
  loader_config = _loader_config(config, window, with_frames=with_frames,
                                 with_reference=with_reference, with_masks=with_masks,
                                 frame_masks=frame_masks)
  return iter(loader.make_dataset(dataset_dir, data.split, loader_config))


def held_out_config(config):
  """A copy of `config` that reads the held-out split (config.train.eval_split) instead of
  config.data.split, in this process (no loader workers: a held-out iterator is made afresh at
  every evaluation)."""
  held_out = config.copy_and_resolve_references()
  held_out.data.split = str(with_defaults(config.train, TRAIN_DEFAULTS)["eval_split"])
  held_out.data.num_workers = 0
  return held_out


def _loader_config(config, window: int | None = None, **switches):
  """`LoaderConfig` of `config.data` for this process's slice (`switches`: the with_* fields)."""
  data = config.data
  return loader.LoaderConfig(
      window=int(window or data.window), batch_size=int(data.batch_size),
      seed=int(data.seed), num_workers=int(data.num_workers), reference=str(data.reference),
      cross_clip_reference=float(data.cross_clip_reference),
      cross_clip_emotion=str(data.get("cross_clip_emotion", "")),
      shard_index=jax.process_index(), shard_count=jax.process_count(), **switches)


def precomputed_iterator(config, window: int | None = None, frame_masks: bool = False):
  """A checkpointable Grain iterator over config.data.precomputed (a folder written by `etalk
  precompute`): windows of latents and encoder outputs, `loader.PrecomputedWindowSampler`'s."""
  return iter(loader.make_precomputed_dataset(config.data.precomputed,
                                              config.data.split,
                                              _loader_config(config, window,
                                                             frame_masks=frame_masks)))


def check_precomputed(config, with_codec: bool) -> dict:
  """precompute.json of config.data.precomputed, refused unless its encoders are the ones the
  config names (and its codec config.codec's, when the stage reads latents)."""
  return precompute.check_precomputed(
      config.data.precomputed, dict(config.codec) if with_codec else None,
      config.encoders.get("audio"), config.encoders.get("vision"),
      config.encoders.get("audio_features", {}))


def vaid_data(config, featurizer, window: int | None = None):
  """(batches, batch -> `TrainingExamples`) of the V-AID stages: loader windows that the frozen
  encoders featurise on the host, or with config.data.precomputed (`etalk precompute`) the
  same examples read from its records: each clip's frames and speech were encoded once, not at
  every window drawn from it (the projector stage of `etalk demo`: 375 ms of host encoding per
  8 ms step)."""
  if not config.data.precomputed:
    return (loader_iterator(config, with_masks=False, window=window), featurizer.from_batch)
  check_precomputed(config, with_codec=False)

  def examples(batch) -> TrainingExamples:
    return TrainingExamples(audio_windows=batch["audio_windows"], lip=batch["lip_vision"],
                            expression=batch["expression"],
                            reference=unit_range_on_host(batch["reference"]),
                            reference_expression=batch["reference_expression"])

  return precomputed_iterator(config, window), examples


def build_sharded(build: Callable[[Any], nnx.Module], mesh, config) -> nnx.Module:
  """A freshly initialised model created directly on its shardings (never whole on one device)."""
  rules = tuple(tuple(rule) for rule in config.get("rules", parallel.DEFAULT_RULES))
  return parallel.create_sharded(build, mesh, rules)


def required_folder(config, name: str) -> str:
  folder = config.encoders.get(name)
  if not folder:
    raise UserError(f"config.encoders.{name} is not set; pass --config.encoders.{name}=DIR")
  if not Path(folder).is_dir():
    raise InputNotFound(f"config.encoders.{name}={folder} is not a folder")
  return folder


def audio_encoder(config):
  """The frozen wav2vec2 of config.encoders.audio (a folder written by `etalk convert wav2vec2`)."""
  return load_wav2vec2(required_folder(config, "audio"))


def audio_features(config):
  """`AudioFeatures` over the frozen wav2vec2, with config.encoders.audio_features overrides."""
  return AudioFeatures(audio_encoder(config),
                       feature_config(config.encoders.get("audio_features", {})))


def vision_encoders(config, name: str = "vision"):
  """Lip / expression encoders: a folder written by `save_encoders` (trained adapters), or a bare
  PD-FGC folder (`etalk convert pdfgc`) wrapped with untrained (identity) adapters."""
  return vision_encoders_from_folder(required_folder(config, name),
                                     int(config.train.seed))


def featurizer(config, vision=None):
  """`VAIDFeaturizer` over the frozen speech and vision encoders the config names."""
  return VAIDFeaturizer(audio_features(config), vision or vision_encoders(config))


def dicte_condition(expression, reference_expression, cross_clip, use_clip=None):
  """Di-CTE's emotion condition for a batch of windows `(batch, frames, expression_dim)`: the
  window's mean e_v (an utterance emotion, what a keyword's codebook latent is at inference)
  where `use_clip` (a `(batch,)` draw) says so, and always when the reference comes from another
  clip (`cross_clip`, the loader's): e_ref is then another emotion's expression, and
  conditioning on it would teach Di-CTE to ignore its condition. Elsewhere e_ref (the "uncond."
  case: the portrait's own emotion). Works on numpy and jax arrays."""
  xp = jax.numpy if isinstance(expression, jax.Array) else np
  from_clip = xp.asarray(cross_clip, bool).reshape(-1)
  if use_clip is not None:
    from_clip = from_clip | use_clip
  return xp.where(from_clip[:, None], expression.mean(axis=1), reference_expression)


def draw_dicte_condition(batch, key: jax.Array, from_clip: float) -> tuple[jax.Array, jax.Array]:
  """(condition, the key left for the loss) of a Di-CTE training batch (`expression`,
  `reference_expression`, `cross_clip`): the window's mean e_v with probability `from_clip`
  per window, else as `dicte_condition` says. The Di-CTE and V-AID stages draw it so."""
  condition_key, loss_key = jax.random.split(key)
  use_clip = jax.random.uniform(condition_key, batch["expression"].shape[:1]) < from_clip
  return dicte_condition(batch["expression"], batch["reference_expression"], batch["cross_clip"],
                         use_clip), loss_key


def emotion_indices(labels) -> np.ndarray:
  """The loader's emotion labels (indices into data_pipeline.EMOTION_LABELS, whose first eight
  are the keywords of EMOTIONS) -> keyword indices, -1 for the rest (contempt, unknown)."""
  labels = np.asarray(labels).reshape(-1).astype(np.int32)
  return np.where(labels < len(EMOTIONS), labels, -1).astype(np.int32)


def latent_codec(config):
  """(codec, jitted encode) for config.codec: {"kind": "pixel_shuffle", "factor": f} or
  {"kind": "vae", "folder": DIR} (a folder written by `etalk convert svd`, its vae/)."""
  return latent_codec_from_spec(dict(config.codec))


def reference_encoder(codec, noise_aug_strength: float):
  """Jitted `(uint8 frames (n, H, W, 3), key) -> reference latents` of `codec`
  (`encode_reference`): for the VAE, SVD's unscaled mode of the frame noise-augmented by
  `noise_aug_strength` with noise drawn from `key` (the step's); the weight-free codecs ignore
  the key."""
  if isinstance(codec, VAECodec):
    graphdef, state = nnx.split(codec.vae)

    @jax.jit
    def encode(state, frames, key):
      return VAECodec(nnx.merge(graphdef, state)).encode_reference(
          frames, reference_noise(key, frames), noise_aug_strength)

    return lambda frames, key: encode(state, frames, key)
  return jax.jit(lambda frames, key: codec.encode_reference(
      frames, reference_noise(key, frames), noise_aug_strength))


def encode_video(encode, frames: np.ndarray) -> np.ndarray:
  """uint8 `(batch, frames, H, W, 3)` -> latents `(batch, frames, h, w, c)`."""
  batch, count = frames.shape[:2]
  latents = np.asarray(encode(frames.reshape((batch * count,) + frames.shape[2:])))
  return latents.reshape((batch, count) + latents.shape[1:])


def ethd_config(config, lip_dim: int, expression_dim: int):
  """`ETHDConfig` from config.ethd with the encoders' latent sizes."""
  fields = {name: tuple(value) if isinstance(value, list) else value
            for name, value in dict(config.ethd.unet).items()}
  return ETHDConfig(unet=UNetConfig(**fields), lip_dim=lip_dim, expression_dim=expression_dim,
                    window=int(config.ethd.window),
                    added_time_ids=tuple(config.ethd.added_time_ids),
                    latent_target=str(config.ethd.latent_target),
                    target_scale=float(config.ethd.target_scale))


def masks_on_grid(masks: np.ndarray, height: int, width: int) -> np.ndarray:
  """Pixel masks `(..., H, W)` -> float32 `(..., height, width)` area averages (H, W multiples of
  the grid), on the host: per-frame masks travel to the device at the latent size, not as
  `frames` full-resolution images."""
  masks = np.asarray(masks, np.float32)
  *lead, full_height, full_width = masks.shape
  if full_height % height or full_width % width:
    raise UserError(f"masks of {full_height}x{full_width} do not divide into the {height}x{width} "
                    "latent grid; use a resolution that is a multiple of it")
  blocks = masks.reshape(*lead, height, full_height // height, width, full_width // width)
  return blocks.mean(axis=(-3, -1))


def lip_statistics(lip_latents: np.ndarray, floor: float = 1e-6
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-dimension (mean, std) of lip latents `(..., lip_dim)`, the std floored so that a dead
  dimension stays finite: `ETHDConfig.lip_mean / lip_std`."""
  flat = np.asarray(lip_latents, np.float64).reshape(-1, np.shape(lip_latents)[-1])
  std = np.maximum(flat.std(axis=0), floor)
  return tuple(float(v) for v in flat.mean(axis=0)), tuple(float(v) for v in std)


def measure_lip_statistics(config, lip_of_batch: Callable[[Any], np.ndarray],
                           iterator: Callable[[Any], Any] = loader_iterator):
  """`lip_statistics` of the stage's own lip stream over the first
  `config.ethd.lip_statistics_batches` batches of a fresh `iterator(config)` (the same batches
  on every run and resume, so a resumed run rebuilds the same ETHD config); None when 0."""
  count = int(config.ethd.lip_statistics_batches)
  if count <= 0:
    return None
  batches = iterator(config)
  return lip_statistics(np.concatenate([np.asarray(lip_of_batch(next(batches)))
                                       for _ in range(count)]))


def require_ethd_init(config) -> None:
  """Refuses a config whose ETHD must start from weights (config.ethd.require_init, set by the
  full configs: SVD-XT's UNet) but names none, before any data or model is touched: a random
  1.58 G ETHD trains for the whole budget without learning to render a face."""
  ethd = config.get("ethd") or {}
  if ethd.get("require_init", False) and not ethd.get("init", ""):
    raise UserError(
        "config.ethd.init is not set, and this config trains ETHD from SVD-XT's UNet: pass "
        "--config.ethd.init=svd:DIR (a folder of `etalk convert svd`) or "
        "--config.ethd.init=ethd:DIR (an ETHD export, e.g. the encoder stage's export/renderer); "
        "--config.ethd.require_init=False starts from random weights on purpose")


def build_ethd(config, mesh, lip_dim: int, expression_dim: int, lip_stats=None):
  """ETHD as config.ethd.init says: "" (random, created sharded), "svd:DIR" (a converted SVD
  UNet: `etalk convert svd`), or "ethd:DIR" (an ETHD folder, e.g. another stage's export).
  `lip_stats` (mean, std) from `measure_lip_statistics` become the ETHD's lip statistics, also
  of an ETHD it starts from (they describe this stage's lip stream, not weights); without them
  such an ETHD keeps its own. An ETHD it starts from takes config.ethd's target_scale too (the
  scale of this stage's latents, not a weight); everything else must match."""
  compute = compute_of(config)
  wanted = ethd_config(config, lip_dim, expression_dim)
  if lip_stats is not None:
    wanted = dataclasses.replace(wanted, lip_mean=lip_stats[0], lip_std=lip_stats[1])
  init = config.ethd.init
  if not init:
    return build_sharded(lambda rngs: ETHD(wanted, compute=compute, rngs=rngs), mesh, config)
  kind, _, folder = init.partition(":")
  if kind == "ethd":
    model = load_ethd(folder, compute=compute)
    if lip_stats is None:  # keep the statistics it was trained with
      wanted = dataclasses.replace(wanted, lip_mean=model.ethd_config.lip_mean,
                                   lip_std=model.ethd_config.lip_std)
    if dataclasses.replace(model.ethd_config, lip_mean=wanted.lip_mean, lip_std=wanted.lip_std,
                           target_scale=wanted.target_scale) != wanted:
      raise UserError(f"config.ethd.init={init}: that ETHD's config differs from config.ethd "
                      "(UNet sizes, lip / expression dims); make them match")
    model.ethd_config = wanted
    return model
  if kind == "svd":
    unet_folder = Path(folder) / "unet" if (Path(folder) / "unet").is_dir() else Path(folder)
    return ethd_from_svd(load_unet(unet_folder, compute=compute), wanted, compute=compute)
  raise UserError(f"config.ethd.init={init!r}: use '', 'svd:DIR' or 'ethd:DIR'")
