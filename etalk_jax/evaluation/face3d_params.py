"""Deep3DFaceRecon `epoch_20.pth` <-> NNX weights, our saved format, and `etalk convert face3d`.

Upstream layout (read from sicxu/Deep3DFaceRecon_pytorch): `BaseModel.save_networks`
(models/base_model.py) writes `epoch_<n>.pth` as one dict: each of `model_names` (for
`FaceReconModel` only `"net_recon"`, models/facerecon_model.py) -> that network's `state_dict()`
(unwrapped from DataParallel first), beside `opt_00` (the Adam optimizer's state dict) and
`sched_00` (the LR scheduler's); `load_networks` reads `state_dict["net_recon"]`. The network is
`ReconNetWrapper` (models/networks.py): `backbone.*` (torchvision's ResNet names: conv1, bn1,
layer1..4.<block>.conv1..3 / bn1..3 / downsample.0 (conv) / downsample.1 (BatchNorm); no fc with
use_last_fc=False) and `final_layers.0..6` (the 1x1 coefficient convs, with bias). BatchNorm's
`num_batches_tracked` only counts training steps and is ignored.

The file is read with `torch.load(weights_only=True)` only: optimizer and scheduler states are
plain tensors, numbers, lists and dicts, which that loader accepts; a pickle that would run code
is refused.

Our format: `config.json` (Face3DConfig fields + an `etalk_format` record) and `state/` (Orbax).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from etalk_jax import model_io
from etalk_jax.evaluation.face3d import TARGET_SIZE, Face3DConfig, Face3DRecon
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.weights import (
  ConversionError,
  ConversionTable,
  DictSource,
  TensorSource,
  export_torch_state,
  load_from_source,
  open_source,
)

IGNORE = (r".*\.num_batches_tracked",)
# The entry of upstream's checkpoint dict that holds the regressor's state dict.
NETWORK_ENTRY = "net_recon"


def _stage_name(match: re.Match) -> str:
  # Our stages count from 0, torchvision's layers from 1.
  return f".layer{int(match.group(1)) + 1}.{match.group(2)}"


# (regex, replacement) from our dotted module paths to `ReconNetWrapper`'s, applied in order.
RENAMES: list[tuple[str, Any]] = [
    (r"^backbone\.stem_conv$", "backbone.conv1"),
    (r"^backbone\.stem_norm$", "backbone.bn1"),
    (r"\.stages\.(\d+)\.(\d+)(?=\.|$)", _stage_name),
    (r"\.norm([123])$", r".bn\1"),
    (r"\.shortcut_conv$", ".downsample.0"),
    (r"\.shortcut_norm$", ".downsample.1"),
    (r"^heads\.(\d+)$", r"final_layers.\1"),
]


FORMAT = model_io.ConvertedFormat(
    name="face3d", label="a converted Deep3DFaceRecon regressor",
    command="etalk convert face3d --src epoch_20.pth --dst DIR",
    upstream=("Deep3DFaceRecon's epoch_20.pth (checkpoints/<name>/epoch_20.pth of its "
                "release)"))


def conversion_table(model: Face3DRecon) -> ConversionTable:
  """Our `Face3DRecon` leaves <-> `ReconNetWrapper.state_dict()` names."""
  return ConversionTable.build(model, renames=RENAMES, ignore=IGNORE)


def abstract_model(config: Face3DConfig, compute: Compute = FP32) -> Face3DRecon:
  """The regressor's structure with shapes only (no weights allocated)."""
  return model_io.abstract(lambda rngs: Face3DRecon(config, compute=compute, rngs=rngs))



# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def network_tensors(source: TensorSource) -> TensorSource:
  """The regressor's state dict out of upstream's checkpoint dict (its "net_recon" entry, beside
  the optimizer and scheduler states); a bare state dict passes through."""
  tensors = getattr(source, "tensors", None)
  if not isinstance(tensors, Mapping) or NETWORK_ENTRY not in tensors:
    return source
  network = tensors[NETWORK_ENTRY]
  if not isinstance(network, Mapping):
    raise ConversionError(f"{source.description}: its {NETWORK_ENTRY!r} entry is a "
                          f"{type(network).__name__}, not a state dict; give Deep3DFaceRecon's "
                          "epoch_20.pth.")
  return DictSource(network, description=f"{source.description} [{NETWORK_ENTRY!r}]")


def config_from_checkpoint(source: TensorSource, image_size: int | None = None) -> Face3DConfig:
  """The Face3DConfig whose shapes the checkpoint has (the released file gives the defaults).

  The input size is not in the weights (the network pools globally): upstream's 224 unless
  `image_size` is given.
  """
  keys = set(source.keys())
  needed = ["backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "final_layers.0.weight"]
  absent = [k for k in needed if k not in keys]
  if absent:
    raise ConversionError(f"{source.description} is not a Deep3DFaceRecon checkpoint (no "
                          f"{', '.join(absent)}); give its epoch_20.pth (checkpoints/<name>/).")
  stage_blocks, stage_widths = [], []
  while f"backbone.layer{len(stage_blocks) + 1}.0.conv1.weight" in keys:
    stage = len(stage_blocks) + 1
    blocks = 0
    while f"backbone.layer{stage}.{blocks}.conv1.weight" in keys:
      blocks += 1
    stage_blocks.append(blocks)
    stage_widths.append(source.shape(f"backbone.layer{stage}.0.conv1.weight")[0])
  heads = 0
  while f"final_layers.{heads}.weight" in keys:
    heads += 1
  try:
    return Face3DConfig(
        image_size=TARGET_SIZE if image_size is None else image_size,
        stem_channels=source.shape("backbone.conv1.weight")[0],
        stage_blocks=tuple(stage_blocks), stage_widths=tuple(stage_widths),
        coefficient_dims=tuple(source.shape(f"final_layers.{i}.weight")[0]
                               for i in range(heads)))
  except ValueError as error:
    raise ConversionError(f"{source.description} has shapes no Deep3DFaceRecon regressor has: "
                          f"{error}") from error


def face3d_from_torch(src: Any, config: Face3DConfig | None = None, *, compute: Compute = FP32,
                      dtype: Any = None) -> Face3DRecon:
  """A `ReconNetWrapper` (module, state dict, or upstream's checkpoint dict / `epoch_20.pth`
  with its "net_recon" entry) -> our `Face3DRecon`.

  config: the sizes to build; by default read from the checkpoint's shapes. Strict: one
  ConversionError lists every missing, unexpected and mis-shaped key.
  """
  source = network_tensors(open_source(src))
  return load_from_source(source, config, config_from_checkpoint,
                          lambda config: abstract_model(config, compute), conversion_table,
                          dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def to_torch(model: Face3DRecon, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our model -> a `ReconNetWrapper` state dict (numpy) that `load_state_dict(strict=True)`
  takes; `num_batches_tracked` is written as 0 for every BatchNorm."""
  return export_torch_state(model, conversion_table(model), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------


def save_face3d(model: Face3DRecon, dst: str | Path, *, overwrite: bool = False) -> dict:
  """Our format (config.json + Orbax state/); returns {tensors, parameters, bytes}
  (`model_io.weights_summary`)."""
  return FORMAT.save(model, dst, overwrite=overwrite)


def load_face3d(folder: str | Path, compute: Compute = FP32) -> Face3DRecon:
  """Our format (written by `etalk convert face3d`) -> `Face3DRecon`."""
  return FORMAT.load(folder, Face3DConfig, lambda config: abstract_model(config, compute))


def convert_face3d_command(src: str, dst: str, overwrite: bool = False) -> dict:
  """`etalk convert face3d --src epoch_20.pth --dst DIR` [--overwrite];
  returns {tensors, parameters, bytes, seconds, dst}."""
  return FORMAT.convert_file(src, dst, face3d_from_torch, overwrite=overwrite)
