"""`etalk`: the command line.

  etalk demo                                    the README's main job
  etalk convert svd --src DIR --dst DIR         diffusers SVD (pipeline or one component) -> ours
  etalk convert svd --src DIR --dst DIR --to diffusers
  etalk convert wav2vec2|wavlm --src DIR --dst DIR [--to transformers]
  etalk convert pdfgc --src motion_model.pth --dst DIR
  etalk prepare --src DIR --layout {hdtf,mead,folder} --dst DIR [--resolution 512]
  etalk synthesize --dst DIR [--config tiny|demo|res512]   synthetic talking faces dataset

A user error (bad file, mismatched checkpoint, wrong argument, a missing optional dependency)
prints one message and exits 2 (with --verbose, its traceback too); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from etalk_jax.weights import ConversionError

USER_ERRORS = (ConversionError, ValueError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, ImportError)


# model family -> (the "upstream" value of --to, command function "module:name")
CONVERTERS = {
    "svd": ("diffusers", "etalk_jax.svd.params:convert_command"),
    "wav2vec2": ("transformers", "etalk_jax.audio.params:convert_wav2vec2_command"),
    "wavlm": ("transformers", "etalk_jax.audio.params:convert_wavlm_command"),
    "pdfgc": (None, "etalk_jax.vision.params:convert_pdfgc_command"),  # motion_model.pth -> ours
}


def _convert(args: argparse.Namespace) -> int:
  import importlib
  upstream, target = CONVERTERS[args.model]
  to = args.to or "ours"
  if to not in ("ours", upstream):
    targets = "'ours'" + (f" or '{upstream}'" if upstream else "")
    raise ValueError(f"--to {to}: {args.model} converts to {targets}")
  module_name, function_name = target.split(":")
  command = getattr(importlib.import_module(module_name), function_name)
  if args.model == "svd":
    summary = command(args.src, args.dst, to=to, overwrite=args.overwrite, dtype=args.dtype,
                      variant=args.variant)
    parts = summary["components"]
  elif upstream is None:
    summary = command(args.src, args.dst, overwrite=args.overwrite)
    parts = {args.model: summary}
  else:
    summary = command(args.src, args.dst, to=to, overwrite=args.overwrite)
    parts = {args.model: summary}
  for name, part in parts.items():
    print(f"{name}: {part['tensors']} tensors, {part['parameters']:,} parameters, "
          f"{part['bytes'] / 2**20:,.1f} MiB")
  print(f"wrote {summary['dst']} in {summary['seconds']:.1f} s")
  if args.json:
    print(json.dumps(summary))
  return 0


def _prepare(args: argparse.Namespace) -> int:
  from data_pipeline.prepare import prepare_command
  report = prepare_command(
      args.src, args.layout, args.dst, args.resolution, clip_frames=args.clip_frames,
      min_clip_frames=args.min_clip_frames, min_source_side=args.min_source_side,
      min_face_fraction=args.min_face_fraction, max_gap_frames=args.max_gap_frames,
      crf=args.crf, test_fraction=args.test_fraction, split_by_speaker=args.split_by_speaker,
      seed=args.seed, workers=args.workers, progress=not args.no_progress)
  if report.get("already_prepared"):
    print(f"{report['dataset_dir']} is already prepared; nothing to do")
  else:
    print(f"videos: {report['videos_ok']} prepared, {report['videos_skipped']} skipped "
          f"{report['skipped_by_reason']}")
    print(f"clips: {report['clips']}, frames: {report['frames']}")
  print(f"dataset: {report['dataset_dir']} (report: {args.dst}/prepare_report.json)")
  return 0


def _synthesize(args: argparse.Namespace) -> int:
  from data_pipeline.builders.synthetic_talking_heads import build
  print(f"dataset: {build(args.dst, args.config)}")
  return 0


def _demo(args: argparse.Namespace) -> int:
  from etalk_jax import demo
  return demo.run()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="etalk", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
  commands = parser.add_subparsers(dest="command", required=True)

  demo = commands.add_parser("demo", help="run the end-to-end demo on random weights (CPU)")
  demo.set_defaults(run=_demo)

  convert = commands.add_parser("convert", help="convert weights between PyTorch and ours")
  convert.add_argument("model", choices=sorted(CONVERTERS), help="model family")
  convert.add_argument("--src", required=True, help="source folder (pdfgc: the .pth file)")
  convert.add_argument("--dst", required=True, help="destination folder (must not exist)")
  convert.add_argument("--to", choices=["ours", "diffusers", "transformers"], default=None,
                       help="ours (default): upstream -> our format; diffusers (svd) or "
                            "transformers (wav2vec2, wavlm): our format -> upstream")
  convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="svd: dtype of the written weights (default float32)")
  convert.add_argument("--variant", default=None,
                       help="svd: upstream weight variant to read, e.g. fp16 (default: plain, "
                            "then fp16)")
  convert.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  convert.add_argument("--json", action="store_true", help="also print the summary as JSON")
  convert.set_defaults(run=_convert)

  prepare = commands.add_parser("prepare", help="videos -> TFDS ArrayRecord dataset of clips")
  prepare.add_argument("--src", required=True, help="folder of videos")
  prepare.add_argument("--layout", required=True, choices=["hdtf", "mead", "folder"],
                       help="mead: <speaker>/video/front/<emotion>/level_<k>/NNN.mp4 with audio "
                            "under <speaker>/audio/...; hdtf and folder: any *.mp4 below --src")
  prepare.add_argument("--dst", required=True, help="output folder (TFDS data_dir)")
  prepare.add_argument("--resolution", type=int, default=512, help="crop size (default 512)")
  prepare.add_argument("--clip-frames", type=int, default=250, help="longest clip (frames)")
  prepare.add_argument("--min-clip-frames", type=int, default=25, help="shortest clip kept")
  prepare.add_argument("--min-source-side", type=int, default=64,
                       help="skip videos smaller than this many pixels")
  prepare.add_argument("--min-face-fraction", type=float, default=0.25,
                       help="skip faces whose crop is smaller than this x resolution")
  prepare.add_argument("--max-gap-frames", type=int, default=3,
                       help="interpolate landmarks over face dropouts up to this long")
  prepare.add_argument("--crf", type=int, default=18, help="H.264 quality of stored crops")
  prepare.add_argument("--test-fraction", type=float, default=0.1)
  prepare.add_argument("--split-by-speaker", action="store_true",
                       help="hold out whole speakers instead of clips")
  prepare.add_argument("--seed", type=int, default=0)
  prepare.add_argument("--workers", type=int, default=1, help="videos processed in parallel")
  prepare.add_argument("--no-progress", action="store_true")
  prepare.set_defaults(run=_prepare)

  synthesize = commands.add_parser("synthesize", help="build the synthetic talking-face dataset")
  synthesize.add_argument("--dst", required=True, help="output folder (TFDS data_dir)")
  synthesize.add_argument("--config", choices=["tiny", "demo", "res512"], default="demo")
  synthesize.set_defaults(run=_synthesize)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  try:
    return args.run(args)
  except USER_ERRORS as error:
    if args.verbose:
      raise
    print(f"etalk {args.command}: error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"etalk {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
