"""The fields every training config shares, and loading a config file with command-line
overrides (`--config=configs/vaid.py:tiny --config.optim.lr=2e-4`, ml_collections' own parser).
A config that ships with the package can be named instead of its path: `--config=vaid:tiny`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

import configs
from etalk_jax.errors import UserError
from etalk_jax.parallel import DEFAULT_RULES

SHIPPED_CONFIGS = Path(configs.__file__).parent  # configs/*.py, installed with the package


# The defaults of the fields every stage shares, written once: `base_config` puts them in every
# config, and code reading a section of a config built by hand takes them from here
# (`with_defaults`). None marks a field without a default (base_config's arguments set it).
# data: dataset_dir, a folder written by `etalk prepare` / `etalk synthesize` (required).
# reference: the frame ETHD and Di-CTE are conditioned on, "keyframe" (a random one of the clip)
# or "first" (the clip's first frame; data_pipeline.loader.LoaderConfig.reference).
# cross_clip_reference: probability that the reference comes from another clip of the same
# identity, in another emotion where there is one (LoaderConfig.cross_clip_reference; §3.11);
# cross_clip_emotion: the emotion they come from when the identity has it ("": any other).
# precomputed: a folder of `etalk precompute` over dataset_dir's clips; the projector, Di-CTE
# and ETHD stages then read the frozen encoders' outputs from it instead of running them.
DATA_DEFAULTS = dict(dataset_dir="", split="train", window=None, batch_size=None, seed=0,
                     num_workers=0, reference="keyframe", cross_clip_reference=0.0,
                     cross_clip_emotion="", precomputed="")
OPTIM_DEFAULTS = dict(
    name="adam", lr=None, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
    schedule="constant", warmup_steps=0, final_lr_fraction=0.0,  # or "cosine"
    clip_norm=1.0,  # global-norm gradient clipping; 0 switches it off
    ema_decay=0.0,  # > 0: keep and export an EMA of the trained parameters
    grad_accum=1)  # micro-batches per step (data.batch_size must divide by it)
TRAIN_DEFAULTS = dict(
    steps=None, seed=0, log_every=10, checkpoint_every=500, keep=3,
    compute_dtype="float32",  # bfloat16: bf16 compute over fp32 master weights
    remat="none",  # none | blocks | blocks_save_dots | layers (layers/compute.py REMAT_POLICIES)
    attention="auto",  # auto (the backend's best) | xla | cudnn | splash
    peak_tflops=0.0,  # per device, for MFU where the device kind is unknown
    # held-out loss: every eval_every steps (0: never) the mean loss over eval_batches batches
    # of the eval_split split (the same batches and keys each time), as held_out/* metrics
    eval_every=0, eval_batches=4, eval_split="test",
    # a step whose loss or gradient norm is NaN / inf: "stop" the run (a UserError naming the
    # step and its batch, raised before the next checkpoint so none holds the poisoned state) or
    # "skip" its update (parameters and optimizer state stay as they were; logged with its batch)
    nonfinite="stop")
MESH_DEFAULTS = dict(data=-1, fsdp=1)


def with_defaults(section: Mapping[str, Any] | None, defaults: Mapping[str, Any]
                  ) -> dict[str, Any]:
  """A config section (`config.train`, a plain dict, or None) over its defaults."""
  return {**defaults, **dict(section or {})}


def base_config(stage: str, *, steps: int, lr: float, batch_size: int, window: int
                ) -> ml_collections.ConfigDict:
  """stage, data, optim, train, mesh and rules with the paper's defaults where it gives them."""
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.data = dict(DATA_DEFAULTS, window=window, batch_size=batch_size)
  config.optim = dict(OPTIM_DEFAULTS, lr=lr)
  config.train = dict(TRAIN_DEFAULTS, steps=steps)
  config.mesh = dict(MESH_DEFAULTS)
  config.rules = tuple(DEFAULT_RULES)
  return config


def use_large_model_settings(config: ml_collections.ConfigDict) -> None:
  """The paper's ETHD-scale settings: 8-bit Adam, bf16 compute over fp32 master weights, every
  res block and transformer block of the UNet rematerialised (what lets a 120-frame 512² clip fit
  80 GB: benchmarks/train_memory.py), parameters sharded FSDP over every device."""
  config.optim.name = "adam8bit"
  config.train.compute_dtype = "bfloat16"
  config.train.remat = "layers"
  config.mesh = dict(data=1, fsdp=-1)


def config_file(path: str) -> str:
  """`path` as ml_collections reads it: a file `file.py[:variant]` as given, or a shipped
  config's name `name[:variant]` (configs/name.py, wherever the package is installed)."""
  file, colon, variant = path.partition(":")
  if file.endswith(".py") or "/" in file:
    return path
  return f"{SHIPPED_CONFIGS / file}.py{colon}{variant}"


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`path` (`file.py`, `file.py:variant`, or a shipped config's `name[:variant]`) with
  `--config.key=value` overrides applied and type-checked by ml_collections."""
  for override in overrides:
    if not override.startswith("--config."):
      raise UserError(f"unknown argument {override!r}; overrides look like --config.key=value")
  argv = ["etalk", f"--config={config_file(path)}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=None, flag_values=flag_values,
                                  lock_config=False, sys_argv=argv)
  try:
    flag_values(argv)
  except (flags.Error, FileNotFoundError, AttributeError, KeyError, TypeError) as error:
    raise UserError(f"--config {path}: {error}") from error
  return flag_values.config
