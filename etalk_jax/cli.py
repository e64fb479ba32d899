"""`etalk`: the command line.

  etalk demo [--train | --quick] [--workdir DIR]  the README's main job: generate, report
  etalk convert svd --src DIR --dst DIR         diffusers SVD (pipeline or one component) -> ours
  etalk convert svd --src DIR --dst DIR --to diffusers
  etalk convert wav2vec2|wavlm --src DIR --dst DIR [--to transformers]
  etalk convert pdfgc --src motion_model.pth --dst DIR
  etalk convert inception|i3d|syncnet|face3d --src FILE --dst DIR    the evaluation networks
  etalk prepare --src DIR --layout {hdtf,mead,folder} --dst DIR [--resolution 512]
  etalk synthesize --dst DIR [--config tiny|demo|res512]   synthetic talking faces dataset
  etalk train --config configs/STAGE.py[:variant] --workdir DIR [--config.key=value ...]
  etalk codebook build --data DIR --dst FILE [--encoders DIR]
                                          emotion codebook from labelled frames
  etalk precompute --data DIR --dst DIR --codec pixel_shuffle:4|vae:DIR|patch_pca:FILE
                   --audio-encoder DIR --vision-encoders DIR [--split train]
                                          latents + encoder outputs for V-AID and ETHD
  etalk sample --portrait P --audio A --checkpoint DIR --out OUT.mp4 [--emotion WORD | ...]
               [--dtype float32|bfloat16] [--attention auto|xla|cudnn|splash]
  etalk app [--checkpoint DIR] [--port 7860]      a web page: portrait + speech -> video
  etalk eval --generated DIR --reference DIR --protocol hdtf|mead --models DIR [--out FILE]
  etalk eval --checkpoint DIR --data DIR [--split test] --protocol hdtf|mead --models DIR
                                          the paper's FID, FVD, Sync-C / Sync-D and E-FID

Compiled programs are kept in JAX's persistent compilation cache (`use_compilation_cache`:
$JAX_COMPILATION_CACHE_DIR, else ~/.cache/etalk-jax/xla), so a second `etalk sample` of the same
shapes, or a resumed `etalk train`, loads its programs instead of compiling them again.

A user error (`etalk_jax.errors.UserError`: bad file, mismatched checkpoint, wrong argument, a
missing optional dependency) prints one message and exits 2 (with --verbose, its traceback too);
anything else is a bug and keeps its traceback.

The `etalk` command (`entry`) keeps XLA's "Very slow compile?" alarms off the terminal
(`etalk_jax.native_log`; XLA_FLAGS=--xla_dump_to=DIR shows them again); `main` alone, as the tests
call it, leaves stderr as it is.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import sys
from pathlib import Path

import jax

from etalk_jax import native_log
from etalk_jax.errors import UserError
from etalk_jax.layers.compute import ATTENTION_IMPLEMENTATIONS

# The project's own user errors only (ConversionError, AudioError and the rest derive from it):
# a ValueError or FileNotFoundError from anywhere else is a bug and keeps its traceback.
USER_ERRORS = (UserError,)


# Each subcommand imports what it runs (JAX, TFDS: seconds) when it runs, so that `etalk --help`
# and a mistyped argument answer without loading them: the `noqa: PLC0415 (subcommand)` imports.

# model family -> (the "upstream" value of --to, command function "module:name")
CONVERTERS = {
    "svd": ("diffusers", "etalk_jax.svd.params:convert_svd_command"),
    "wav2vec2": ("transformers", "etalk_jax.audio.params:convert_wav2vec2_command"),
    "wavlm": ("transformers", "etalk_jax.audio.params:convert_wavlm_command"),
    "pdfgc": (None, "etalk_jax.vision.params:convert_pdfgc_command"),  # motion_model.pth -> ours
    # the evaluation networks (one file each -> ours)
    "inception": (None, "etalk_jax.evaluation.inception_params:convert_inception_command"),
    "i3d": (None, "etalk_jax.evaluation.i3d_params:convert_i3d_command"),
    "syncnet": (None, "etalk_jax.evaluation.syncnet_params:convert_syncnet_command"),
    "face3d": (None, "etalk_jax.evaluation.face3d_params:convert_face3d_command"),
}


def _convert(args: argparse.Namespace) -> int:
  upstream, target = CONVERTERS[args.model]
  to = args.to or "ours"
  if to not in ("ours", upstream):
    targets = "'ours'" + (f" or '{upstream}'" if upstream else "")
    raise UserError(f"--to {to}: {args.model} converts to {targets}")
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
  from data_pipeline.builders.real import prepare_command  # noqa: PLC0415 (subcommand)
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
  from data_pipeline.builders.synthetic_talking_heads import build  # noqa: PLC0415 (subcommand)
  print(f"dataset: {build(args.dst, args.config, progress=not args.no_progress)}")
  return 0


def _sample(args: argparse.Namespace) -> int:
  from etalk_jax.pipeline.command import sample_command  # noqa: PLC0415 (subcommand)
  summary = sample_command(
      args.portrait, args.audio, args.out, args.checkpoint, emotion=args.emotion,
      emotion_text=args.emotion_text, emotion_image=args.emotion_image,
      emotion_video=args.emotion_video, emotion_audio=args.emotion_audio,
      intensity=args.intensity, steps=args.steps, guidance=args.guidance,
      resolution=args.resolution, seed=args.seed, paste_back=args.paste_back,
      progress=not args.no_progress, dtype=args.dtype, attention=args.attention,
      overwrite=args.overwrite)
  emotion = summary["emotion"] or "none (the portrait's own expression)"
  print(f"wrote {summary['out']}: {summary['frames']} frames ({summary['seconds']:.2f} s of "
        f"video) in {summary['generation_seconds']:.1f} s ({summary['generation_fps']:.2f} "
        f"frames/s, {summary['dtype']} on {summary['devices']} device(s)), emotion: {emotion}")
  return 0


def _train(args: argparse.Namespace) -> int:
  from etalk_jax.parallel import initialize_distributed  # noqa: PLC0415 (subcommand)
  from etalk_jax.train.config import load_config  # noqa: PLC0415 (subcommand)
  from etalk_jax.train.loop import train  # noqa: PLC0415 (subcommand)
  initialize_distributed()  # a no-op unless a cluster launcher or explicit settings say otherwise
  config = load_config(args.config, args.overrides)
  summary = train(config, args.workdir, progress=not args.no_progress)
  if "stopped_at" in summary:
    print(f"stopped at step {summary['stopped_at']} (checkpoint saved); run the same command to "
          "resume")
    return 0
  metrics = summary["final_metrics"]
  shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
  print(f"{summary['stage']}: {summary['steps']} steps ({shown}); compile "
        f"{summary['compile_seconds']:.1f} s")
  print(f"exported {summary['export']}")
  return 0


def _codebook(args: argparse.Namespace) -> int:
  from etalk_jax.emotion.codebook import codebook_build_command  # noqa: PLC0415 (subcommand)
  summary = codebook_build_command(args.data, args.dst, args.encoders, split=args.split,
                                   max_frames_per_clip=args.max_frames_per_clip,
                                   overwrite=args.overwrite, progress=not args.no_progress)
  print("frames per keyword: " + ", ".join(f"{k} {n}" for k, n in summary["frames"].items()))
  if summary["skipped"]:
    print(f"skipped clips (not an emotion keyword): {summary['skipped']}")
  if summary["missing"]:
    print(f"no frames for: {', '.join(summary['missing'])} (the codebook leaves them out)")
  print(f"wrote {summary['dst']} from {summary['clips']} clips in {summary['seconds']:.1f} s")
  return 0


def _precompute(args: argparse.Namespace) -> int:
  from etalk_jax.train import precompute  # noqa: PLC0415 (subcommand)
  try:
    audio_features = json.loads(args.audio_features)
  except json.JSONDecodeError as error:
    raise UserError(f"--audio-features {args.audio_features!r} is not JSON ({error}); give "
                    "FeatureConfig fields like '{\"chunk_frames\": 500}'") from error
  summary = precompute.precompute_command(
      args.data, args.dst, codec_spec=precompute.parse_codec(args.codec),
      audio_encoder_dir=args.audio_encoder, vision_encoders_dir=args.vision_encoders,
      audio_features=audio_features, split=args.split, chunk_frames=args.chunk_frames,
      overwrite=args.overwrite, progress=not args.no_progress)
  print(f"wrote {summary['dst']}: {summary['clips']} clips, {summary['frames']} frames, "
        f"{summary['bytes'] / 2 ** 20:.1f} MiB in {summary['seconds']:.1f} s "
        f"(encoders fingerprint {summary['fingerprint'][:12]})")
  return 0


def _app(args: argparse.Namespace) -> int:
  from etalk_jax.app import app_command  # noqa: PLC0415 (subcommand)
  app_command(args.checkpoint, host=args.host, port=args.port, open_browser=args.open)
  return 0


def _eval(args: argparse.Namespace) -> int:
  from etalk_jax.evaluation.command import eval_command  # noqa: PLC0415 (subcommand)
  eval_command(args)
  return 0


def _demo(args: argparse.Namespace) -> int:
  from etalk_jax.demo import wiring  # noqa: PLC0415 (subcommand)
  return wiring.run(args.workdir, train=args.train, quick=args.quick,
                    progress=not args.no_progress)


NO_PROGRESS = "no progress bars (for logs and scripts)"


def use_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache for this process and those it starts; returns
  its folder (None: off). $JAX_COMPILATION_CACHE_DIR, when set, is JAX's own setting and is left
  to JAX (empty turns the cache off); otherwise $XDG_CACHE_HOME/etalk-jax/xla
  (~/.cache/etalk-jax/xla). Every program is kept, however fast it compiled (JAX's default keeps
  those over 1 s; `etalk sample`'s many small ones add up to seconds), unless
  $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise. Entries are keyed by the program,
  the compile options and the jax / jaxlib versions, so a changed model or a new jax compiles
  afresh; the folder can be deleted at any time."""
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # for processes started here
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return os.environ["JAX_COMPILATION_CACHE_DIR"] or None
  cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  folder = str(Path(cache_home) / "etalk-jax" / "xla")
  jax.config.update("jax_compilation_cache_dir", folder)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder  # for processes started here
  return folder


def installed_version() -> str:
  """The installed etalk-jax distribution's version (pyproject.toml's)."""
  try:
    return importlib.metadata.version("etalk-jax")
  except importlib.metadata.PackageNotFoundError:
    return "(source tree, not installed)"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="etalk", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="log at INFO level; user errors show their traceback")
  parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
  commands = parser.add_subparsers(dest="command", required=True)

  demo = commands.add_parser("demo", help="videos of held-out synthetic identities from the "
                                          "embedded tiny checkpoint, with their lip-sync and "
                                          "emotion report (CPU, no downloads, ~2 min)")
  demo.add_argument("--workdir", default="demo_out",
                    help="output folder: data, checkpoint, videos, report.json, and with "
                         "--train runs and checkpoint_packed (default demo_out; an existing one "
                         "made with the same demo configuration reuses finished stages, another "
                         "is refused)")
  demo_mode = demo.add_mutually_exclusive_group()
  demo_mode.add_argument("--train", action="store_true",
                         help="train every stage from scratch first (~21 min on 2 cores) and "
                              "pack the result as the embedded checkpoint is")
  demo_mode.add_argument("--quick", action="store_true",
                         help="a short smoke run of --train at toy size (~3 min)")
  demo.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
  demo.set_defaults(run=_demo)

  convert = commands.add_parser("convert", help="convert weights between PyTorch and ours")
  convert.add_argument("model", choices=sorted(CONVERTERS), help="model family")
  convert.add_argument("--src", required=True,
                       help="source folder (pdfgc and the evaluation networks: the file)")
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
  prepare.add_argument("--test-fraction", type=float, default=0.1,
                       help="share of the clips (with --split-by-speaker: of the speakers) held "
                            "out for the test split (default 0.1)")
  prepare.add_argument("--split-by-speaker", action="store_true",
                       help="hold out whole speakers instead of clips")
  prepare.add_argument("--seed", type=int, default=0,
                       help="seed of the train / test split (default 0)")
  prepare.add_argument("--workers", type=int, default=1, help="videos processed in parallel")
  prepare.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
  prepare.set_defaults(run=_prepare)

  synthesize = commands.add_parser("synthesize", help="build the synthetic talking-face dataset")
  synthesize.add_argument("--dst", required=True, help="output folder (TFDS data_dir)")
  synthesize.add_argument("--config", choices=["tiny", "demo", "res512"], default="demo",
                          help="dataset size: tiny (the tests': 64 px, 2 identities), demo "
                               "(etalk demo's: 64 px, 10 identities; default) or res512 (512 "
                               "px, for loader benchmarks)")
  synthesize.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
  synthesize.set_defaults(run=_synthesize)

  train = commands.add_parser(
      "train", help="train a stage: encoders, projector, dicte, ethd or ser",
      description="Runs (or resumes) the stage a config file names; any --config.key=value "
                  "overrides a config field, e.g. --config.data.dataset_dir=DIR "
                  "--config.optim.lr=2e-5.")
  train.add_argument("--config", required=True,
                     help="config file, e.g. configs/vaid.py or configs/vaid.py:tiny, or a "
                          "shipped config by name, e.g. vaid:tiny")
  train.add_argument("--workdir", required=True,
                     help="run folder: checkpoints/, metrics.jsonl, tensorboard/, export/; an "
                          "existing one resumes")
  train.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
  train.set_defaults(run=_train)

  codebook = commands.add_parser("codebook", help="emotion codebook: one expression latent per "
                                                  "keyword")
  codebook_commands = codebook.add_subparsers(dest="codebook_command", required=True)
  build = codebook_commands.add_parser("build", help="labelled frames of a prepared dataset -> "
                                                     "codebook JSON")
  build.add_argument("--data", required=True,
                     help="prepared dataset folder <dir>/<name>/<config>/<version>")
  build.add_argument("--dst", required=True, help="codebook JSON to write")
  build.add_argument("--encoders", default=None,
                     help="trained encoders folder (the encoder stage's export/encoders)")
  build.add_argument("--split", default="train", help="dataset split to read (default train)")
  build.add_argument("--max-frames-per-clip", type=int, default=32,
                     help="labelled frames read from each clip (default 32)")
  build.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  build.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
  build.set_defaults(run=_codebook)

  precompute = commands.add_parser(
      "precompute", help="a prepared dataset -> fp16 latents, l_v, e_v and speech states, for "
                         "projector, Di-CTE and ETHD training without running the frozen "
                         "encoders (config.data.precomputed)")
  precompute.add_argument("--data", required=True,
                          help="prepared dataset folder <dir>/<name>/<config>/<version>")
  precompute.add_argument("--dst", required=True, help="folder to write")
  precompute.add_argument("--codec", required=True,
                          help="pixel_shuffle[:FACTOR[:SCALE]], vae:DIR (`etalk convert svd` "
                               "output or its vae/) or patch_pca:FILE, as the ethd stage's "
                               "config.codec")
  precompute.add_argument("--audio-encoder", required=True,
                          help="wav2vec2 folder (config.encoders.audio)")
  precompute.add_argument("--vision-encoders", required=True,
                          help="trained encoders (the encoder stage's export/encoders) or a "
                               "PD-FGC folder (config.encoders.vision)")
  precompute.add_argument("--audio-features", default="{}",
                          help="FeatureConfig fields as JSON (config.encoders.audio_features)")
  precompute.add_argument("--split", default="train",
                          help="dataset split to precompute (default train)")
  precompute.add_argument("--chunk-frames", type=int, default=16,
                          help="frames per latent-codec call")
  precompute.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  precompute.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
  precompute.set_defaults(run=_precompute)

  sample = commands.add_parser("sample", help="portrait + speech (+ emotion) -> talking-head mp4")
  sample.add_argument("--portrait", required=True, help="photo of one face (PNG, JPEG)")
  sample.add_argument("--audio", required=True, help="speech (wav, flac, mp3, m4a, mp4)")
  sample.add_argument("--checkpoint", required=True, help="pipeline checkpoint folder")
  sample.add_argument("--out", required=True,
                      help="output video (.mp4, H.264 + AAC); a missing folder is created")
  source = sample.add_mutually_exclusive_group()
  source.add_argument("--emotion", default=None,
                      help="keyword: happy, angry, sad, surprised, fearful, disgusted, worried, "
                           "neutral; or a blend of them with relative weights, e.g. "
                           "happy:0.7,surprised:0.3 (--intensity scales the mix)")
  source.add_argument("--emotion-text", default=None, help="emotion described in words")
  source.add_argument("--emotion-image", default=None, help="photo of a face showing it")
  source.add_argument("--emotion-video", default=None,
                      help="video of a face whose expressions drive the result frame by frame")
  source.add_argument("--emotion-audio", default=None,
                      help="emotional speech (needs a checkpoint with wavlm/ and ser/)")
  sample.add_argument("--intensity", type=float, default=1.0,
                      help="emotion strength from 0 (neutral) to 1.5 (default 1)")
  sample.add_argument("--resolution", type=int, default=None,
                      help="must equal the checkpoint's (default: the checkpoint's)")
  sample.add_argument("--steps", type=int, default=None,
                      help="ETHD sampling steps (default: the checkpoint's sample steps, "
                           "25 for a full-size pipeline, 8 for etalk demo's)")
  sample.add_argument("--guidance", type=float, default=None,
                      help="classifier-free guidance on the speech, >= 1 (default: the "
                           "checkpoint's, 1 = off; >1 costs two ETHD calls per step)")
  sample.add_argument("--seed", type=int, default=0,
                      help="seed of the sampler's noise: the same seed gives the same video "
                           "(default 0)")
  sample.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                      help="compute dtype of every model; bfloat16 computes in bf16 over the "
                           "fp32 weights (default: bfloat16 on a GPU or TPU, float32 on the CPU)")
  sample.add_argument("--attention", choices=list(ATTENTION_IMPLEMENTATIONS), default="auto",
                      help="attention implementation: auto (default: cuDNN flash on a GPU, "
                           "splash on a TPU, XLA on the CPU), xla, cudnn or splash")
  sample.add_argument("--overwrite", action="store_true",
                      help="replace --out if it exists (without it, an existing file is an error)")
  sample.add_argument("--paste-back", action="store_true",
                      help="paste the generated face into the full portrait frame")
  sample.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
  sample.set_defaults(run=_sample)

  app = commands.add_parser("app", help="a web page (Gradio): portrait + speech (+ emotion) -> "
                                        "video; needs the `app` extra")
  app.add_argument("--checkpoint", default=None,
                   help="pipeline checkpoint folder (default demo_out/checkpoint, which "
                        "`make demo` writes)")
  app.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only)")
  app.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
  app.add_argument("--open", action="store_true", help="open the page in a browser")
  app.set_defaults(run=_app)

  evaluate = commands.add_parser(
      "eval", help="the paper's metrics (FID, FVD, Sync-C / Sync-D, E-FID) of generated videos "
                   "against their ground truth")
  evaluate.add_argument("--generated", default=None,
                        help="folder of generated videos, paired with --reference's by file name")
  evaluate.add_argument("--reference", default=None, help="folder of ground-truth videos")
  evaluate.add_argument("--checkpoint", default=None,
                        help="pipeline checkpoint: generate --data's --split clips first "
                             "(instead of --generated / --reference)")
  evaluate.add_argument("--data", default=None,
                        help="prepared dataset (`etalk prepare`), with --checkpoint")
  evaluate.add_argument("--split", default="test", help="dataset split to generate (default test)")
  evaluate.add_argument("--workdir", default="eval_out",
                        help="with --checkpoint: where generated/ and reference/ are written "
                             "(default eval_out; videos already there are kept)")
  evaluate.add_argument("--steps", type=int, default=None,
                        help="with --checkpoint: ETHD sampling steps (default: the checkpoint's)")
  evaluate.add_argument("--seed", type=int, default=0,
                        help="with --checkpoint: the sampler's seed (default 0)")
  evaluate.add_argument("--protocol", required=True, choices=["hdtf", "mead"],
                        help="hdtf: 5.76 s per video, FVD on 128 frames; mead: 3.04 s, FVD on 72")
  evaluate.add_argument("--models", required=True,
                        help="folder with inception/, i3d/, syncnet/, face3d/ (each written by "
                             "`etalk convert`)")
  evaluate.add_argument("--metrics", default="fid,fvd,sync,efid",
                        help="comma-separated subset of fid, fvd, sync, efid (default all)")
  evaluate.add_argument("--fvd-convention", choices=["stylegan_v", "center_crop_224"],
                        default="stylegan_v",
                        help="I3D input: stylegan_v (resize to 224, [-1, 1], default) or "
                             "center_crop_224 (shorter side to 224, centre crop)")
  evaluate.add_argument("--batch-size", type=int, default=16,
                        help="frames per network call (rounded up to the local devices)")
  evaluate.add_argument("--out", default=None, help="also write the report as JSON here")
  evaluate.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
  evaluate.set_defaults(run=_eval)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  # Only `etalk train` takes free-form arguments: its --config.key=value overrides.
  if extra and args.command != "train":
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.overrides = extra
  logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  use_compilation_cache()  # before the first compile: JAX fixes the folder then
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


def entry() -> None:
  """The `etalk` console script: `main` with XLA's slow-operation alarms filtered from stderr."""
  native_log.hide_slow_operation_alarms()
  sys.exit(main())


if __name__ == "__main__":
  entry()
