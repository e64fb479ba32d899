"""PD-FGC `motion_model.pth` <-> NNX weights, our saved format, and `etalk convert pdfgc`.

Upstream layout (read from `Dorniwang/PD-FGC-inference`, `FanEncoder` in
lib/models/networks/encoder.py and `FAN_use` in lib/models/networks/FAN_feature_extractor.py):
`motion_model.pth` is a plain `FanEncoder.state_dict()`: `model.*` (the FAN trunk: conv1, bn1,
conv2..conv4 ConvBlocks, m0 the hourglass with b1_/b2_/b2_plus_/b3_<level> blocks, top_m_0,
conv_last0, bn_end0, l0, bn5, conv6, fc) and `to_mouth/to_emo/to_headpose/to_eye.{0,2,3}` +
`mouth_embed/emo_embed/headpose_embed/eye_embed.1`. Upstream's loader (lib/model_builder.py)
copies the file's keys that also appear in `FanEncoder.state_dict()`, so they carry no prefix; a
`module.` prefix (a DataParallel save) is stripped all the same. BatchNorm's `num_batches_tracked`
only counts training steps and is ignored.

Our format: `config.json` (PDFGCConfig fields + an `etalk_format` record) and `state/` (Orbax).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from etalk_jax import model_io
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.vision.pdfgc import AdaptedPDFGC, PDFGCConfig, PDFGCEncoder
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

# our trunk module -> upstream FAN_use attribute
_TRUNK_NAMES = {
    "stem_conv": "conv1", "stem_norm": "bn1", "block1": "conv2", "block2": "conv3",
    "block3": "conv4", "hourglass": "m0", "post_block": "top_m_0", "post_conv": "conv_last0",
    "post_norm": "bn_end0", "heatmap_conv": "l0", "heatmap_norm": "bn5",
    "summary_conv": "conv6", "feature_proj": "fc",
}
# our head -> upstream name stem (to_<stem> / <stem>_embed)
_HEAD_NAMES = {"mouth": "mouth", "expression": "emo", "pose": "headpose", "eye": "eye"}
# our hourglass level block -> upstream block prefix (followed by the level number)
_LEVEL_BLOCKS = {"upper": "b1_", "lower_in": "b2_", "innermost": "b2_plus_", "lower_out": "b3_"}


def renames(config: PDFGCConfig) -> list[tuple[str, Any]]:
  """(regex, replacement) from our dotted module paths to `FanEncoder`'s, applied in order."""
  depth = config.hourglass_depth

  def level_block(match: re.Match) -> str:
    # Our levels run outermost first; upstream numbers them depth..1.
    return f".m0.{_LEVEL_BLOCKS[match.group(2)]}{depth - int(match.group(1))}"

  rules: list[tuple[str, Any]] = [(r"^trunk(?=\.|$)", "model")]
  rules.append((r"\.hourglass\.levels\.(\d+)\.(upper|lower_in|innermost|lower_out)(?=\.|$)",
                level_block))
  rules += [(rf"^model\.{ours}(?=\.|$)", f"model.{theirs}")
            for ours, theirs in _TRUNK_NAMES.items()]
  rules += [(r"\.norm([123])$", r".bn\1"), (r"\.shortcut_norm$", ".downsample.0"),
            (r"\.shortcut_conv$", ".downsample.2")]
  for ours, theirs in _HEAD_NAMES.items():
    rules += [(rf"^{ours}\.fc1$", f"to_{theirs}.0"), (rf"^{ours}\.norm$", f"to_{theirs}.2"),
              (rf"^{ours}\.fc2$", f"to_{theirs}.3"), (rf"^{ours}\.embed$", f"{theirs}_embed.1")]
  return rules


FORMAT = model_io.ConvertedFormat(
    name="pdfgc", label="a converted PD-FGC encoder",
    command="etalk convert pdfgc --src motion_model.pth --dst DIR",
    upstream="PD-FGC's motion_model.pth")


def conversion_table(encoder: PDFGCEncoder) -> ConversionTable:
  """Our `PDFGCEncoder` leaves <-> `FanEncoder.state_dict()` names."""
  return ConversionTable.build(encoder, renames=renames(encoder.config), ignore=IGNORE)


def abstract_encoder(config: PDFGCConfig, compute: Compute = FP32) -> PDFGCEncoder:
  """The encoder's structure with shapes only (no weights allocated)."""
  return model_io.abstract(lambda rngs: PDFGCEncoder(config, compute=compute, rngs=rngs))



# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def config_from_checkpoint(source: TensorSource) -> PDFGCConfig:
  """The PDFGCConfig whose shapes the checkpoint has (the released file gives the defaults).

  Needed because `motion_model.pth` carries no config. The input size is read back from the
  projection's input width (28x28 -> 224); adapters are not in the file and keep the default
  width (= feature_dim).
  """
  keys = set(source.keys())
  needed = ["model.conv1.weight", "model.conv2.conv1.weight", "model.conv_last0.weight",
            "model.l0.weight", "model.fc.weight", "to_emo.0.weight", "emo_embed.1.weight",
            "headpose_embed.1.weight", "eye_embed.1.weight"]
  absent = [k for k in needed if k not in keys]
  if absent:
    raise ConversionError(f"{source.description} is not a PD-FGC motion encoder checkpoint "
                          f"(no {', '.join(absent)}); give motion_model.pth.")
  levels = [int(m.group(1)) for k in keys if (m := re.fullmatch(r"model\.m0\.b1_(\d+)\..*", k))]
  summary_size = math.isqrt(source.shape("model.fc.weight")[1])
  stem_channels, in_channels = source.shape("model.conv1.weight")[:2]
  feature_dim = source.shape("model.fc.weight")[0]
  try:
    return PDFGCConfig(
        image_size=8 * summary_size, in_channels=in_channels, stem_channels=stem_channels,
        block_channels=2 * source.shape("model.conv2.conv1.weight")[0],
        hourglass_channels=source.shape("model.conv_last0.weight")[0],
        hourglass_depth=max(levels, default=0), num_landmarks=source.shape("model.l0.weight")[0],
        feature_dim=feature_dim, pose_dim=source.shape("headpose_embed.1.weight")[0],
        eye_dim=source.shape("eye_embed.1.weight")[0],
        expression_dim=source.shape("emo_embed.1.weight")[0], adapter_dim=feature_dim)
  except ValueError as error:
    raise ConversionError(f"{source.description} has shapes no PD-FGC encoder has: {error}"
                          ) from error


def pdfgc_from_torch(src: Any, config: PDFGCConfig | None = None, *, compute: Compute = FP32,
                     dtype: Any = None) -> PDFGCEncoder:
  """A `FanEncoder` (module, state dict or `motion_model.pth`) -> our `PDFGCEncoder`.

  config: the sizes to build; by default read from the checkpoint's shapes. Strict: one
  ConversionError lists every missing, unexpected and mis-shaped key.
  """
  source = strip_module_prefix(open_source(src))
  return load_from_source(source, config, config_from_checkpoint,
                          lambda config: abstract_encoder(config, compute), conversion_table,
                          dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def to_torch(encoder: PDFGCEncoder, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our encoder -> a `FanEncoder` state dict (numpy) that `load_state_dict(strict=True)` takes;
  `num_batches_tracked` is written as 0 for every BatchNorm."""
  return export_torch_state(encoder, conversion_table(encoder), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Our format
# ----------------------------------------------------------------------------------------------


def save_pdfgc(encoder: PDFGCEncoder, dst: str | Path, *, overwrite: bool = False) -> dict:
  """Our format (config.json + Orbax state/); returns {tensors, parameters, bytes}
  (`model_io.weights_summary`)."""
  return FORMAT.save(encoder, dst, overwrite=overwrite)


def load_pdfgc(folder: str | Path, compute: Compute = FP32) -> PDFGCEncoder:
  """Our format (written by `etalk convert pdfgc`) -> `PDFGCEncoder`."""
  return FORMAT.load(folder, PDFGCConfig, lambda config: abstract_encoder(config, compute))


def convert_pdfgc_command(src: str, dst: str, overwrite: bool = False) -> dict:
  """`etalk convert pdfgc --src motion_model.pth --dst DIR [--overwrite]`; returns {tensors,
  parameters, bytes, seconds, dst}."""
  return FORMAT.convert_file(src, dst, pdfgc_from_torch, overwrite=overwrite)


# The trained lip and expression encoders (PD-FGC + adapters): the same config.json with its own
# format record, so a bare PD-FGC folder and an adapted one are never mistaken for each other.
ENCODERS_NAME = "pdfgc_adapted"


def save_encoders(encoders: AdaptedPDFGC, dst: str | Path, *, overwrite: bool = False) -> dict:
  """`AdaptedPDFGC` (trunk + trained adapters) -> our format; returns {tensors, parameters,
  bytes}."""
  config = encoders.config.to_dict()
  config["etalk_format"] = {"model": ENCODERS_NAME, "version": FORMAT.version}
  model_io.save_model(encoders, dst, config, overwrite=overwrite)
  return model_io.weights_summary(encoders)


def load_encoders(folder: str | Path, compute: Compute = FP32) -> AdaptedPDFGC:
  """A folder written by `save_encoders` (e.g. the encoder stage's export) -> `AdaptedPDFGC`."""
  folder = Path(folder)
  try:
    fields = dict(model_io.read_config(folder))
  except (FileNotFoundError, ValueError) as error:
    raise ConversionError(f"{folder} does not hold trained lip / expression encoders ({error}); "
                          "give the folder the encoder stage exported (`etalk train "
                          "--config configs/encoders.py`).") from error
  record = fields.pop("etalk_format", None)
  if not isinstance(record, Mapping) or record.get("model") != ENCODERS_NAME:
    raise ConversionError(f"{folder} does not hold trained lip / expression encoders (PD-FGC with "
                          "adapters); a bare PD-FGC folder loads with load_pdfgc.")
  config = PDFGCConfig.from_dict(fields)
  return model_io.restore_model(folder, lambda: model_io.abstract(
      lambda rngs: AdaptedPDFGC(config, compute=compute, rngs=rngs)))
