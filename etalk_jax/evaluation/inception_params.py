"""pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` <-> NNX weights, our saved format, and
`etalk convert inception`.

Upstream layout (read from `mseitzer/pytorch-fid` v0.3.0 src/pytorch_fid/inception.py,
`fid_inception_v3()`, and torchvision's models/inception.py): the file is a plain
`Inception3(num_classes=1008, aux_logits=False)` state dict, which `fid_inception_v3()` loads
with `load_state_dict` (strict): `Conv2d_1a_3x3`, `Conv2d_2a_3x3`, `Conv2d_2b_3x3`,
`Conv2d_3b_1x1`, `Conv2d_4a_3x3` and the branches of `Mixed_5b`..`Mixed_7c`, each a
`BasicConv2d` (`<name>.conv.weight`, `<name>.bn.weight|bias|running_mean|running_var`), then
`fc.weight` (1008, 2048) and `fc.bias`. No `AuxLogits` (aux_logits=False). Our modules carry the
same names, so the table needs no renames. BatchNorm's `num_batches_tracked` only counts
training steps and is ignored.

`fc` is kept, not ignored: FID reads pool3 only and never runs it, but with it the converted
folder is the whole file, so `to_torch` gives back a state dict that `fid_inception_v3()`'s
strict `load_state_dict` accepts, and the 1008 logits can check a conversion on real images
(the expected class of a known photo) without TensorFlow. It costs 2.1 M parameters (8 MB, 9% of
the file) and no compute on the FID path.

The released file may predate torch 1.6's zip format (it was published in 2019; whether it is a
legacy pickle could not be checked here): `torch.load` memory-maps only zip files, so a legacy
file is read whole instead (`weights.TorchFileSource`), still with `weights_only=True`.

Our format: `config.json` (InceptionConfig fields + an `etalk_format` record) and `state/`
(Orbax).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from etalk_jax import model_io
from etalk_jax.evaluation.inception import FIDInception, InceptionConfig
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.weights import (
  ConversionError,
  ConversionTable,
  TensorSource,
  export_torch_state,
  load_from_source,
  open_source,
  strip_module_prefix,
)

IGNORE = (r".*\.num_batches_tracked",)
# Our module paths are upstream's: no renames beyond the leaf names (kernel -> weight, ...).
RENAMES: list[tuple[str, str]] = []
RELEASED_FILE = "pt_inception-2015-12-05-6726825d.pth"


FORMAT = model_io.ConvertedFormat(
    name="fid_inception", label="a converted FID Inception",
    command=f"etalk convert inception --src {RELEASED_FILE} --dst DIR",
    upstream=f"pytorch-fid's {RELEASED_FILE}")


def conversion_table(model: FIDInception) -> ConversionTable:
  """Our `FIDInception` leaves <-> `Inception3.state_dict()` names."""
  return ConversionTable.build(model, renames=RENAMES, ignore=IGNORE)


def abstract_inception(config: InceptionConfig, compute: Compute = FP32) -> FIDInception:
  """The network's structure with shapes only (no weights allocated)."""
  return model_io.abstract(lambda rngs: FIDInception(config, compute=compute, rngs=rngs))



# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def config_from_checkpoint(source: TensorSource) -> InceptionConfig:
  """The InceptionConfig whose shapes the checkpoint has (the released file gives the defaults).

  The width divisor is read from the first conv's width (32 upstream), the classes from `fc`;
  the resize target is not in the file and stays pytorch-fid's 299.
  """
  keys = set(source.keys())
  needed = ["Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight"]
  absent = [k for k in needed if k not in keys]
  if absent:
    raise ConversionError(f"{source.description} is not an Inception-v3 checkpoint (no "
                          f"{', '.join(absent)}); give pytorch-fid's {RELEASED_FILE}.")
  stem_width = source.shape("Conv2d_1a_3x3.conv.weight")[0]
  if stem_width < 1 or 32 % stem_width:
    raise ConversionError(f"{source.description}: Conv2d_1a_3x3 has {stem_width} output "
                          "channels; Inception-v3 has 32 (or a divisor of 32 in a narrow test "
                          "network).")
  try:
    return InceptionConfig(width_divisor=32 // stem_width,
                           num_classes=source.shape("fc.weight")[0])
  except ValueError as error:
    raise ConversionError(f"{source.description} has shapes no Inception-v3 has: {error}"
                          ) from error


def inception_from_torch(src: Any, config: InceptionConfig | None = None, *,
                         compute: Compute = FP32, dtype: Any = None) -> FIDInception:
  """pytorch-fid's Inception (module, state dict or the .pth file) -> our `FIDInception`.

  config: the sizes to build; by default read from the checkpoint's shapes. Strict: one
  ConversionError lists every missing, unexpected and mis-shaped key.
  """
  source = strip_module_prefix(open_source(src))
  return load_from_source(source, config, config_from_checkpoint,
                          lambda config: abstract_inception(config, compute), conversion_table,
                          dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def to_torch(model: FIDInception, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our network -> an `Inception3` state dict (numpy) that `load_state_dict(strict=True)`
  takes; `num_batches_tracked` is written as 0 for every BatchNorm."""
  return export_torch_state(model, conversion_table(model), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------


def save_inception(model: FIDInception, dst: str | Path, *, overwrite: bool = False) -> dict:
  """Our format (config.json + Orbax state/); returns {tensors, parameters, bytes}
  (`model_io.weights_summary`)."""
  return FORMAT.save(model, dst, overwrite=overwrite)


def load_inception(folder: str | Path, compute: Compute = FP32) -> FIDInception:
  """Our format (written by `etalk convert inception`) -> `FIDInception`."""
  return FORMAT.load(folder, InceptionConfig, lambda config: abstract_inception(config, compute))


def convert_inception_command(src: str, dst: str, overwrite: bool = False) -> dict:
  """`etalk convert inception --src pt_inception-2015-12-05-6726825d.pth --dst DIR` [--overwrite];
  returns {tensors, parameters, bytes, seconds, dst}."""
  return FORMAT.convert_file(src, dst, inception_from_torch, overwrite=overwrite)
