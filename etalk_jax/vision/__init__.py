"""Vision encoders: PD-FGC's motion encoder in Flax NNX, its lip / expression adapters, and the
converter from PD-FGC's `motion_model.pth` (docs/ARCHITECTURE.md section 3.2), and PD-FGC's own
input preprocessing (`pdfgc_inputs`: aligned, cropped and resized on each frame's landmarks)."""

from etalk_jax.vision.alignment import pdfgc_inputs
from etalk_jax.vision.params import (
  config_from_checkpoint,
  convert_pdfgc_command,
  load_encoders,
  load_pdfgc,
  pdfgc_from_torch,
  save_encoders,
  save_pdfgc,
  to_torch,
)
from etalk_jax.vision.pdfgc import (
  ADAPTER_PARAMS,
  PDFGC_FULL,
  PDFGC_SMALL,
  AdaptedPDFGC,
  MotionCodes,
  PDFGCConfig,
  PDFGCEncoder,
  ResidualAdapter,
)

__all__ = [
    "ADAPTER_PARAMS", "AdaptedPDFGC", "MotionCodes", "PDFGCConfig", "PDFGCEncoder", "PDFGC_FULL",
    "PDFGC_SMALL", "ResidualAdapter", "config_from_checkpoint", "convert_pdfgc_command",
    "load_encoders", "load_pdfgc", "pdfgc_from_torch", "pdfgc_inputs", "save_encoders",
    "save_pdfgc", "to_torch",
]
