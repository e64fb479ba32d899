"""SyncNet v2 `syncnet_v2.model` <-> NNX weights, our saved format, and `etalk convert syncnet`.

Upstream layout (read from `joonson/syncnet_python`: `S` in SyncNetModel.py,
`SyncNetInstance.loadParameters`): the file is a plain `S.state_dict()`; loadParameters copies each
of its tensors into `self.__S__.state_dict()[name]`, so the keys carry no prefix:
`netcnnaud.{0,4,8,11,14,18}` (Conv2d) and `.{1,5,9,12,15,19}` (BatchNorm2d), `netfcaud.{0,3}`
(Linear) and `.1` (BatchNorm1d), and the same indices under `netcnnlip` (Conv3d, BatchNorm3d)
and `netfclip`. A `module.` prefix (a DataParallel save) is stripped all the same; BatchNorm's
`num_batches_tracked` (absent from files older than torch 0.4.1) is ignored.

The released file dates from before torch 1.6, so it may be in torch's legacy (non-zip) format;
`weights.TorchFileSource` reads either with `torch.load(weights_only=True)` (a pickle that would
run code is refused), whatever the file's suffix (upstream's is `.model`).

Our format: `config.json` (SyncNetConfig fields + an `etalk_format` record) and `state/` (Orbax).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from etalk_jax import model_io
from etalk_jax.evaluation.syncnet import CROP_SIZE, SyncNet, SyncNetConfig
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.weights import (
  ConversionError,
  ConversionTable,
  TensorSource,
  TorchFileSource,
  export_torch_state,
  load_from_source,
  open_source,
  strip_module_prefix,
)

IGNORE = (r".*\.num_batches_tracked",)

# Index of each conv stage's Conv in netcnnaud / netcnnlip (its BatchNorm follows at +1): the
# Sequentials interleave ReLUs and max-pools, which hold no weights.
CONV_INDICES = (0, 4, 8, 11, 14, 18)
# our tower -> upstream Sequential
_TOWERS = {"audio_convs": "netcnnaud", "lip_convs": "netcnnlip"}
_HEADS = {"audio_fc": "netfcaud", "lip_fc": "netfclip"}
_HEAD_LAYERS = {"fc1": 0, "norm": 1, "fc2": 3}


def _stage_name(match: re.Match) -> str:
  index = CONV_INDICES[int(match.group(2))] + (match.group(3) == "norm")
  return f"{_TOWERS[match.group(1)]}.{index}"


def renames() -> list[tuple[str, Any]]:
  """(regex, replacement) from our dotted module paths to `S`'s."""
  rules: list[tuple[str, Any]] = [
      (r"^(audio_convs|lip_convs)\.stages\.(\d+)\.(conv|norm)$", _stage_name)]
  for ours, theirs in _HEADS.items():
    rules += [(rf"^{ours}\.{layer}$", f"{theirs}.{index}")
              for layer, index in _HEAD_LAYERS.items()]
  return rules


FORMAT = model_io.ConvertedFormat(
    name="syncnet", label="a converted SyncNet",
    command="etalk convert syncnet --src syncnet_v2.model --dst DIR",
    upstream="SyncNet's syncnet_v2.model")


def conversion_table(model: SyncNet) -> ConversionTable:
  """Our `SyncNet` leaves <-> `S.state_dict()` names."""
  return ConversionTable.build(model, renames=renames(), ignore=IGNORE)


def abstract_syncnet(config: SyncNetConfig, compute: Compute = FP32) -> SyncNet:
  """The network's structure with shapes only (no weights allocated)."""
  return model_io.abstract(lambda rngs: SyncNet(config, compute=compute, rngs=rngs))



# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def open_checkpoint(path: Path) -> TensorSource:
  """`syncnet_v2.model` (whatever its suffix) -> its tensors, read with
  torch.load(weights_only=True) (the legacy pre-zip layout included)."""
  if not path.is_file():
    raise ConversionError(f"{path} does not exist; give SyncNet's syncnet_v2.model.")
  if path.suffix == ".safetensors":
    return open_source(path)
  return TorchFileSource(path)


def config_from_checkpoint(source: TensorSource) -> SyncNetConfig:
  """The SyncNetConfig whose shapes the checkpoint has (the released file gives the defaults).

  The file fixes every width and the lip tower's last kernel k, not the frame size: we take
  32 (k + 1), which is upstream's 224 for k = 6 and lies inside the range of sizes (32 wide)
  that give each k.
  """
  keys = set(source.keys())
  needed = ([f"{tower}.{i}.weight" for tower in _TOWERS.values() for i in CONV_INDICES]
            + [f"{head}.{i}.weight" for head in _HEADS.values() for i in (0, 3)])
  absent = [k for k in needed if k not in keys]
  if absent:
    raise ConversionError(f"{source.description} is not a SyncNet checkpoint (no "
                          f"{', '.join(absent[:4])}{', ...' if len(absent) > 4 else ''}); give "
                          "syncnet_v2.model.")
  final_lip = source.shape(f"netcnnlip.{CONV_INDICES[-1]}.weight")
  try:
    return SyncNetConfig(
        image_size=32 * (final_lip[-1] + 1) if len(final_lip) == 5 else CROP_SIZE,
        audio_channels=tuple(source.shape(f"netcnnaud.{i}.weight")[0] for i in CONV_INDICES),
        lip_channels=tuple(source.shape(f"netcnnlip.{i}.weight")[0] for i in CONV_INDICES),
        hidden_dim=source.shape("netfcaud.0.weight")[0],
        embed_dim=source.shape("netfcaud.3.weight")[0])
  except ValueError as error:
    raise ConversionError(f"{source.description} has shapes no SyncNet has: {error}") from error


def syncnet_from_torch(src: Any, config: SyncNetConfig | None = None, *,
                       compute: Compute = FP32, dtype: Any = None) -> SyncNet:
  """An `S` (module, state dict or `syncnet_v2.model`) -> our `SyncNet`.

  config: the sizes to build; by default read from the checkpoint's shapes. Strict (stricter
  than loadParameters, which leaves absent tensors at their random initialisation): one
  ConversionError lists every missing, unexpected and mis-shaped key.
  """
  if isinstance(src, (str, Path)):
    source = open_checkpoint(Path(src))
  else:
    source = open_source(src)
  source = strip_module_prefix(source)
  return load_from_source(source, config, config_from_checkpoint,
                          lambda config: abstract_syncnet(config, compute), conversion_table,
                          dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def to_torch(model: SyncNet, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our network -> an `S` state dict (numpy) that `load_state_dict(strict=True)` takes;
  `num_batches_tracked` is written as 0 for every BatchNorm."""
  return export_torch_state(model, conversion_table(model), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------


def save_syncnet(model: SyncNet, dst: str | Path, *, overwrite: bool = False) -> dict:
  """Our format (config.json + Orbax state/); returns {tensors, parameters, bytes}
  (`model_io.weights_summary`)."""
  return FORMAT.save(model, dst, overwrite=overwrite)


def load_syncnet(folder: str | Path, compute: Compute = FP32) -> SyncNet:
  """Our format (written by `etalk convert syncnet`) -> `SyncNet`."""
  return FORMAT.load(folder, SyncNetConfig, lambda config: abstract_syncnet(config, compute))


def convert_syncnet_command(src: str, dst: str, overwrite: bool = False) -> dict:
  """`etalk convert syncnet --src syncnet_v2.model --dst DIR` [--overwrite];
  returns {tensors, parameters, bytes, seconds, dst}."""
  return FORMAT.convert_file(src, dst, syncnet_from_torch, overwrite=overwrite)
