"""`etalk`: the command line.

  etalk demo                                    the README's main job
  etalk convert svd --src DIR --dst DIR         diffusers SVD (pipeline or one component) -> ours
  etalk convert svd --src DIR --dst DIR --to diffusers

A user error (bad file, mismatched checkpoint, wrong argument) prints one message and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from etalk_jax.weights import ConversionError

USER_ERRORS = (ConversionError, ValueError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError)


def _convert(args: argparse.Namespace) -> int:
  if args.model == "svd":
    from etalk_jax.svd.params import convert_command
    summary = convert_command(args.src, args.dst, to=args.to, overwrite=args.overwrite,
                              dtype=args.dtype, variant=args.variant)
  else:  # argparse restricts the choices
    raise ValueError(f"unknown model family {args.model!r}")
  for name, part in summary.get("components", {}).items():
    print(f"{name}: {part['tensors']} tensors, {part['parameters']:,} parameters, "
          f"{part['bytes'] / 2**20:,.1f} MiB")
  print(f"wrote {summary['dst']} in {summary['seconds']:.1f} s")
  if args.json:
    print(json.dumps(summary))
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
  convert.add_argument("model", choices=["svd"], help="model family")
  convert.add_argument("--src", required=True, help="source folder")
  convert.add_argument("--dst", required=True, help="destination folder (must not exist)")
  convert.add_argument("--to", choices=["ours", "diffusers"], default="ours",
                       help="direction: upstream -> ours (default) or ours -> upstream")
  convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="dtype of the written weights (default float32)")
  convert.add_argument("--variant", default=None,
                       help="upstream weight variant to read, e.g. fp16 (default: plain, then fp16)")
  convert.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  convert.add_argument("--json", action="store_true", help="also print the summary as JSON")
  convert.set_defaults(run=_convert)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  try:
    return args.run(args)
  except USER_ERRORS as error:
    print(f"etalk {args.command}: error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"etalk {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
