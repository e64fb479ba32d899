"""`etalk demo`'s wiring: what each step of the stage graph (`stages.STEPS`) does, and `run`.

1. builds the synthetic talking-face dataset (configs/tiny.py), holding out whole identities;
2. saves random tiny frozen speech encoders (wav2vec2, WavLM) and pretrains a tiny PD-FGC on the
   training frames' ground truth (`pdfgc_standin`: a random one encodes neither lips nor
   emotion): no pretrained weights exist offline, and every stage reads them from folders as it
   would read converted ones;
3. trains every stage with `etalk_jax.train.loop.train` (configs/<stage>.py:tiny): encoder
   adapters (with the renderer ETHD); then precomputes the trained encoders' outputs for every
   training clip (`etalk precompute`), which the projector, Di-CTE and ETHD (from the renderer)
   read; the speech-emotion head; builds the emotion codebook; writes one pipeline checkpoint.
   A second (spawned) process runs the steps that the next one does not wait for
   (`schedule.run_steps`), so both cores work;
4. generates, for two held-out identities and their held-out speech, videos in two emotions, the
   same with the audio removed (silence), and writes them and the ground-truth renders as mp4;
5. reports, measured on the frames (`report`): the lip-sync score (correlation between the mouth
   opening read from the frames and the speech envelope) and the emotion accuracy (the fraction
   of frames an emotion reader reads as the intended keyword), for the generated videos, the
   ground truth and the no-audio baseline.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np

from data_pipeline import FPS, synthetic
from data_pipeline.builders.synthetic_talking_heads import SyntheticConfig, build
from data_pipeline.loader import data_source
from etalk_jax import parallel
from etalk_jax.audio import FeatureConfig, Wav2Vec2, Wav2Vec2Config, WavLM, WavLMConfig
from etalk_jax.audio.params import load_wav2vec2, load_wavlm, save_speech_encoder
from etalk_jax.codecs import PatchPCACodec, codec_from_spec
from etalk_jax.demo import shipped
from etalk_jax.demo.pdfgc_standin import pretrain_pdfgc
from etalk_jax.demo.report import (
  KINDS,
  EmotionReader,
  MouthReader,
  clip_from_record,
  fit_readers,
  held_out_clips,
  lip_sync_score,
  speech_envelope,
  write_frame_grid,
  write_report,
)
from etalk_jax.demo.schedule import Action, Clock, run_steps
from etalk_jax.demo.stages import CONFIG_FILES, STEPS, TRAINED_STAGES
from etalk_jax.diffusion.sampling import SamplerConfig, WindowConfig
from etalk_jax.emotion.codebook import Codebook, codebook_build_command
from etalk_jax.emotion.ser import load_ser
from etalk_jax.errors import UserError
from etalk_jax.ethd.model import load_ethd, save_ethd
from etalk_jax.pipeline import EmotiveTalkPipeline, Result, save_pipeline
from etalk_jax.records import write_text_atomically
from etalk_jax.train.config import load_config
from etalk_jax.train.loop import train
from etalk_jax.train.precompute import precompute_command
from etalk_jax.train.stages.common import build_ethd
from etalk_jax.vaid.storage import load_dicte, load_projector
from etalk_jax.vision.params import load_encoders
from etalk_jax.vision.pdfgc import PDFGC_SMALL

# The seeds of the demo's own steps (the dataset's is configs/tiny.py's data.seed, each stage's
# its config's train.seed and data.seed): `demo_seeds` records them all in the packed
# checkpoint's provenance.
SEEDS = {"wav2vec2": 0, "wavlm": 2, "pdfgc stand-in": 1, "sampling": 0}


def tiny_stage_config(stage: str):
  """The shipped config of `stage` (`stages.CONFIG_FILES`) at its tiny size, as it ships."""
  config = load_config(f"{CONFIG_FILES[stage]}:tiny")
  assert config.stage == stage
  return config


def demo_config(quick: bool):
  """configs/tiny.py's demo sizes: "quick" (the smoke run) or "full"."""
  return load_config(f"tiny:{'quick' if quick else 'full'}")


def demo_seeds(config) -> dict[str, int]:
  """Every seed the demo's training and sampling use, by what it seeds."""
  seeds = {"dataset": int(config.data.seed), **SEEDS}
  for stage in TRAINED_STAGES:
    stage_config = tiny_stage_config(stage)
    seeds[f"{stage} train"] = int(stage_config.train.seed)
    seeds[f"{stage} data"] = int(stage_config.data.seed)
  return seeds


# ----------------------------------------------------------------------------------- setup


def build_dataset(workdir: Path, config, progress: bool) -> str:
  """The synthetic talking-face dataset of configs/tiny.py's `data` (whole identities held out
  for the test split), built once under workdir/data; returns its folder."""
  data = dict(config.data)
  test_fraction = float(data.pop("test_fraction"))
  spec = synthetic.SyntheticSpec(**{name: tuple(value) if isinstance(value, list) else value
                                    for name, value in data.items()})
  name = f"demo_{spec.identities}x{spec.num_frames}_{spec.seed}"
  if spec.head_motion != 1.0:
    name += f"_motion{spec.head_motion:g}".replace(".", "p")
  if spec.face_scale != 1.0:
    name += f"_face{spec.face_scale:g}".replace(".", "p")
  # The split is part of the name: a workdir of another split is not reused with the wrong one.
  name += f"_test{test_fraction:g}".replace(".", "p")
  builder_config = SyntheticConfig(name=name, description="etalk demo: identities held out",
                                   spec=spec, split_by_speaker=True, test_fraction=test_fraction)
  return build(str(workdir / "data"), builder_config, progress=progress)


def save_frozen_encoders(workdir: Path, config) -> dict[str, Path]:
  """Random tiny wav2vec2 and WavLM, saved once (seeded: the same every run). PD-FGC's stand-in
  is pretrained instead (`pretrain_stand_in`)."""

  def sizes(fields):
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in dict(fields).items()}

  # Initialised in one jitted call each.
  mesh = parallel.make_mesh({"data": -1})
  folders = {name: workdir / "frozen" / name for name in ("wav2vec2", "wavlm")}
  if not folders["wav2vec2"].exists():
    save_speech_encoder(parallel.create_sharded(
        lambda rngs: Wav2Vec2(Wav2Vec2Config(**sizes(config.wav2vec2)), rngs=rngs), mesh,
        seed=SEEDS["wav2vec2"]),
        folders["wav2vec2"])
  if not folders["wavlm"].exists():
    save_speech_encoder(parallel.create_sharded(
        lambda rngs: WavLM(WavLMConfig(**sizes(config.wavlm)), rngs=rngs), mesh,
        seed=SEEDS["wavlm"]),
        folders["wavlm"])
  return folders


def pretrain_stand_in(workdir: Path, dataset_dir: str, config, progress: bool) -> Path:
  """The tiny PD-FGC pretrained on the training frames' ground truth (`pdfgc_standin`), saved
  once under workdir/frozen/pdfgc; returns the folder."""
  folder = workdir / "frozen" / "pdfgc"
  summary = pretrain_pdfgc(dataset_dir, folder, steps=int(config.steps.pdfgc),
                           seed=SEEDS["pdfgc stand-in"], progress=progress)
  print(f"   {summary}", flush=True)
  return folder


def fit_codec(workdir: Path, dataset_dir: str, config) -> tuple[Path, float]:
  """The demo's latent codec, patch PCA fitted on training frames (no pretrained VAE offline),
  and the scale that brings reference-relative latents (each frame's latent minus its clip's
  first frame's) to unit std: ETHD's diffusion target (`ETHDConfig.latent_target`)."""
  path = workdir / "codec.json"
  scale_file = workdir / "target_scale.json"
  if not (path.exists() and scale_file.exists()):
    source = data_source(dataset_dir, "train")
    step = max(1, len(source) // 24)
    clips = [clip_from_record(source[i]).frames[::4] for i in range(0, len(source), step)]
    codec = PatchPCACodec.fit(np.concatenate(clips), int(config.latent_channels))
    differences = [np.asarray(codec.encode(frames[1:])) - np.asarray(codec.encode(frames[:1]))
                   for frames in clips]
    target_scale = 1.0 / float(np.concatenate(differences).std())
    path.write_text(json.dumps(codec.spec()))
    scale_file.write_text(json.dumps({"target_scale": target_scale}))
  return path, float(json.loads(scale_file.read_text())["target_scale"])


PRECOMPUTED = "precomputed"  # the workdir's `etalk precompute` folder


def export_folder(workdir: Path, stage: str) -> Path:
  """Where the demo's run of `stage` exports its trained component."""
  return workdir / "runs" / stage / "export"


def _demo_ethd(stage_config, config, target_scale: float) -> None:
  """The demo's ETHD fields in an encoder or ETHD stage config."""
  channels = int(config.latent_channels)
  stage_config.ethd.unet.in_channels = 2 * channels
  stage_config.ethd.unet.out_channels = channels
  stage_config.ethd.latent_target = str(config.latent_target)
  stage_config.ethd.target_scale = target_scale
  stage_config.ethd.lip_statistics_batches = int(config.lip_statistics_batches)


def save_initial_renderer(workdir: Path, config) -> Path:
  """The encoder stage's renderer ETHD as `build_ethd` initialises it without an init (the same
  seeded weights), saved for that stage to start from: its jitted initialiser compiles for ~40 s,
  which the side process spends while the dataset is built. target_scale, measured on the
  dataset, is the stage's own (`build_ethd` takes it from the stage config)."""
  folder = workdir / "frozen" / "renderer_init"
  if not folder.exists():
    stage_config = tiny_stage_config("encoders")
    _demo_ethd(stage_config, config, target_scale=1.0)
    renderer = build_ethd(stage_config, parallel.make_mesh({"data": -1}),
                          PDFGC_SMALL.feature_dim, PDFGC_SMALL.expression_dim)
    save_ethd(renderer, folder)
  return folder


def save_frozen_models(workdir: Path, config) -> dict[str, Path]:
  """`save_frozen_encoders` and `save_initial_renderer` (the side process's first job)."""
  return {**save_frozen_encoders(workdir, config),
          "renderer": save_initial_renderer(workdir, config)}


def stage_configs(workdir: Path, dataset_dir: str, frozen: dict[str, Path], config) -> dict:
  """Each stage's training config (configs/<stage>.py:tiny with the demo's sizes, steps and the
  folders of the frozen encoders and earlier stages' exports), by stage name."""
  exports = {name: export_folder(workdir, name) for name in TRAINED_STAGES}
  audio_features = dict(config.audio_features)
  window = int(config.video_window)

  def common(stage_config, stage: str):
    stage_config.data.dataset_dir = dataset_dir
    stage_config.data.reference = str(config.reference_frame)
    stage_config.train.steps = int(config.steps[stage])
    stage_config.train.log_every = max(1, min(25, stage_config.train.steps))
    stage_config.train.checkpoint_every = stage_config.train.steps
    return stage_config

  codec_file, target_scale = fit_codec(workdir, dataset_dir, config)
  codec = {"kind": "patch_pca", "file": str(codec_file)}
  encoders = common(tiny_stage_config("encoders"), "encoders")
  encoders.encoders.vision = str(frozen["pdfgc"])
  encoders.data.window = window
  encoders.ethd.init = f"ethd:{frozen['renderer']}"
  projector = common(tiny_stage_config("projector"), "projector")
  dicte = common(tiny_stage_config("dicte"), "dicte")
  for stage_config in (projector, dicte):
    stage_config.encoders.audio = str(frozen["wav2vec2"])
    stage_config.encoders.vision = str(exports["encoders"] / "encoders")
    stage_config.encoders.audio_features = audio_features
  ethd = common(tiny_stage_config("ethd"), "ethd")
  ethd.data.window = window
  ethd.encoders.audio = str(frozen["wav2vec2"])
  ethd.encoders.vision = str(exports["encoders"] / "encoders")
  ethd.encoders.audio_features = audio_features
  ethd.ethd.init = f"ethd:{exports['encoders'] / 'renderer'}"
  ethd.data.cross_clip_reference = float(config.cross_clip_reference)
  ethd.data.cross_clip_emotion = str(config.cross_clip_emotion)
  for stage_config in (encoders, ethd):
    stage_config.codec = codec
    _demo_ethd(stage_config, config, target_scale)
  ethd.vaid.projector = str(exports["projector"])
  # The demo's ETHD trains on ground-truth expressions only, so it reads no Di-CTE and trains
  # while Di-CTE does (stages.py: it does not wait for Di-CTE's export).
  ethd.vaid.dicte = ""
  ethd.expression_from_truth = 1.0
  training = dict(config.ethd_training)
  ethd.lip_weight = float(training["lip_weight"])
  ethd.sigma.p_mean = float(training["p_mean"])
  ethd.sigma.p_std = float(training["p_std"])
  ethd.optim.lr = float(training["lr"])
  ethd.data.batch_size = int(training["batch_size"])
  # The trained encoders' outputs for every training clip, written once after the encoder stage
  # (`precompute_features`): these stages would otherwise re-encode each window they draw.
  for stage_config in (projector, dicte, ethd):
    stage_config.data.precomputed = str(workdir / PRECOMPUTED)
  ser = common(tiny_stage_config("ser"), "ser")
  ser.encoders.wavlm = str(frozen["wavlm"])
  ser.encoders.audio_features = audio_features
  ser.data.window = min(int(ser.data.window), int(config.data.num_frames))
  return {"encoders": encoders, "projector": projector, "dicte": dicte, "ethd": ethd, "ser": ser}


class DemoInterrupted(Exception):
  """A stage's training stopped on SIGTERM (its last step saved): the demo stops too, and the
  same command resumes it."""


def _interrupt(signum, frame) -> None:
  raise DemoInterrupted("SIGTERM")


def train_stage(workdir: Path, name: str, stage_config, progress: bool) -> str:
  """Trains one stage into workdir/runs/<name> unless its export exists; returns a summary line.
  Module-level: the side process runs it too."""
  export = export_folder(workdir, name)
  if (export / ("renderer" if name == "encoders" else "")).exists():
    return f"{export} exists: already trained"
  summary = train(stage_config, export.parent, progress=progress)
  if "stopped_at" in summary:
    raise DemoInterrupted(f"stage {name} stopped at step {summary['stopped_at']}, saved")
  metrics = summary["final_metrics"]
  return (f"{name}: loss {metrics.get('loss', float('nan')):.4f} after {summary['steps']} "
          f"steps, {metrics.get('steps_per_s', 0):.2f} steps/s, compile "
          f"{summary['compile_seconds']:.0f} s")


def precompute_features(ethd_config, progress: bool) -> None:
  """`etalk precompute` of the training clips with the ETHD stage's codec and encoders (the
  projector and Di-CTE stages read the same folder's encoder outputs)."""
  folder = Path(ethd_config.data.precomputed)
  if folder.exists():
    print(f"   {folder} exists: already computed")
    return
  summary = precompute_command(
      ethd_config.data.dataset_dir, folder, codec_spec=dict(ethd_config.codec),
      audio_encoder_dir=ethd_config.encoders.audio, vision_encoders_dir=ethd_config.encoders.vision,
      audio_features=dict(ethd_config.encoders.audio_features), progress=progress)
  print(f"   {summary['clips']} clips, {summary['frames']} frames, "
        f"{summary['bytes'] / 2**20:.0f} MiB: {folder}")


CODEBOOK = "codebook.json"


def build_codebook(workdir: Path, dataset_dir: str) -> str:
  """The emotion codebook of the training clips' labelled frames, by the trained expression
  encoder; returns a summary line."""
  summary = codebook_build_command(dataset_dir, workdir / CODEBOOK,
                                   export_folder(workdir, "encoders") / "encoders",
                                   overwrite=True, progress=False)
  return "codebook frames per keyword: " + ", ".join(
      f"{keyword} {count}" for keyword, count in summary["frames"].items())


def assemble_pipeline(workdir: Path, frozen, config):

  exports = {name: export_folder(workdir, name) for name in TRAINED_STAGES}
  codebook_file = workdir / CODEBOOK
  audio_features = {name: tuple(value) if isinstance(value, list) else value
                    for name, value in dict(config.audio_features).items()}
  checkpoint = workdir / "checkpoint"
  save_pipeline(
      checkpoint, ethd=load_ethd(exports["ethd"]), projector=load_projector(exports["projector"]),
      dicte=load_dicte(exports["dicte"]), encoders=load_encoders(exports["encoders"] / "encoders"),
      audio_encoder=load_wav2vec2(frozen["wav2vec2"]), codebook=Codebook.load(codebook_file),
      codec=codec_from_spec({"kind": "patch_pca", "file": str(workdir / "codec.json")}),
      resolution=int(config.data.resolution),
      wavlm=load_wavlm(frozen["wavlm"]), ser=load_ser(exports["ser"]),
      feature_config=FeatureConfig(**audio_features),
      sampler=SamplerConfig(steps=int(config.sample_steps), sigma_max=float(config.sigma_max),
                            sigma_min=float(config.sigma_min)),
      windows=WindowConfig(frames=int(config.video_window), overlap=int(config.window_overlap)),
      dicte_steps=10, overwrite=True)
  print(f"   pipeline checkpoint: {checkpoint}")
  return EmotiveTalkPipeline.load(checkpoint)




# ------------------------------------------------------------------------------------- run


def step_actions(workdir: Path, config, progress: bool) -> dict[str, Action]:
  """What each step of `stages.STEPS` calls, with which of the earlier steps' results."""
  beside = {step.name: step.beside for step in STEPS}

  def trains(stage: str) -> Action:
    # The side process trains without progress bars: they would interleave with the main's.
    return lambda done: (train_stage, (workdir, stage, done["configs"][stage],
                                       progress and not beside[stage]))

  return {
      "frozen": lambda done: (save_frozen_models, (workdir, config)),
      "dataset": lambda done: (build_dataset, (workdir, config, progress)),
      "pdfgc": lambda done: (pretrain_stand_in, (workdir, done["dataset"], config, progress)),
      "configs": lambda done: (stage_configs, (workdir, done["dataset"],
                                               {**done["frozen"], "pdfgc": done["pdfgc"]}, config)),
      "readers": lambda done: (fit_readers, (done["dataset"],)),
      "precompute": lambda done: (precompute_features, (done["configs"]["ethd"], progress)),
      "codebook": lambda done: (build_codebook, (workdir, done["dataset"])),
      **{stage: trains(stage) for stage in TRAINED_STAGES}}


def generate_held_out(pipe: EmotiveTalkPipeline, workdir: Path, dataset_dir: str, config,
                      readers: tuple[MouthReader, EmotionReader], clock: Clock, progress: bool
                      ) -> tuple[list[tuple[str, str]], dict[str, dict[str, list[float]]],
                                 list[dict[str, float]]]:
  """Videos of the held-out identities (`config.held_out_identities` of them) in the demo's
  emotions, each with its speech and with silence (the same seed), beside its ground truth,
  written to workdir/videos and scored by `readers`: (each video's (speaker, emotion), kind ->
  "lip_sync" / "emotion" -> one score per video, per generated video its frames and seconds)."""
  reader, emotion_reader = readers
  by_speaker = sorted(held_out_clips(dataset_dir).items())
  wanted = int(config.held_out_identities)
  if len(by_speaker) < wanted:
    raise ValueError(f"the demo's test split holds {len(by_speaker)} identities; the report needs "
                     f"{wanted} (configs/tiny.py: data.test_fraction)")
  videos_folder = workdir / "videos"
  videos_folder.mkdir(exist_ok=True)
  rows: dict[str, dict[str, list[float]]] = {kind: {"lip_sync": [], "emotion": []}
                                             for kind in KINDS}
  videos: list[tuple[str, str]] = []
  generation: list[dict[str, float]] = []
  strip: list[tuple[str, np.ndarray]] = []  # the first video's rows, for frames.png
  speakers = [speaker for speaker, _ in by_speaker[:wanted]]
  with clock.phase(f"generate: held-out identities {', '.join(speakers)}, emotions "
                   f"{', '.join(config.emotions)}"):
    for speaker, clips in by_speaker[:wanted]:
      by_emotion = {clip.emotion: clip for clip in clips}
      missing = [e for e in config.emotions if e not in by_emotion]
      if missing:
        raise ValueError(f"held-out speaker {speaker} has no clip in {', '.join(missing)}")
      portrait_clip = by_emotion.get("neutral", clips[0])
      portrait, portrait_landmarks = portrait_clip.frames[0], portrait_clip.landmarks_px[0]
      for emotion in config.emotions:
        clip = by_emotion[emotion]
        videos.append((speaker, emotion))
        envelope = speech_envelope(clip.speech, len(clip.frames))
        for kind, speech in (("generated", clip.speech),
                             ("no-audio baseline", np.zeros_like(clip.speech))):
          began = time.perf_counter()
          result = pipe(portrait, speech, emotion=emotion, landmarks=portrait_landmarks,
                        aligned=True, seed=SEEDS["sampling"], progress=progress)
          seconds = time.perf_counter() - began
          generation.append({"frames": len(result.frames), "seconds": seconds})
          name = f"{speaker}_{emotion}{'' if kind == 'generated' else '_no_audio'}.mp4"
          result.write(videos_folder / name)
          if len(videos) == 1:
            strip.append(("generated" if kind == "generated" else "no audio", result.frames))
          rows[kind]["lip_sync"].append(lip_sync_score(
              reader(result.frames, portrait, portrait_landmarks), envelope))
          rows[kind]["emotion"].append(emotion_reader.accuracy(result.frames, portrait, emotion))
          print(f"   {videos_folder / name}: {len(result.frames)} frames in {seconds:.1f} s")
        truth = Result(frames=clip.frames, audio=clip.speech, fps=FPS, expressions=np.zeros((0,)),
                       lip_latents=np.zeros((0,)), emotion=emotion)
        truth.write(videos_folder / f"{speaker}_{emotion}_ground_truth.mp4")
        if len(videos) == 1:
          strip.append(("ground truth", clip.frames))
          grid = write_frame_grid(workdir / "frames.png", strip)
          print(f"   {grid}: {speaker} {emotion}, generated / no audio / ground truth, 8 frames "
                "each")
        rows["ground truth"]["lip_sync"].append(lip_sync_score(
            reader(clip.frames, portrait, portrait_landmarks), envelope))
        rows["ground truth"]["emotion"].append(emotion_reader.accuracy(clip.frames, portrait,
                                                                       emotion))
  return videos, rows, generation


CONFIG_RECORD = "demo_config.json"  # the configs/tiny.py variant a workdir was made with


def check_workdir(workdir: Path, config) -> None:
  """Records `config` in a new workdir; refuses one made with another configuration (or by a
  version before the record existed): its finished stages would be reused as they are, trained
  on other data or from other frozen models."""
  record = workdir / CONFIG_RECORD
  wanted = json.loads(config.to_json())
  if record.exists():
    if json.loads(record.read_text()) == wanted:
      return
    why = "another demo configuration"
  elif any((workdir / name).exists() for name in ("runs", "frozen", "data")):
    why = "an earlier version of `etalk demo`"
  else:
    write_text_atomically(record, json.dumps(wanted, indent=2) + "\n")
    return
  raise UserError(f"{workdir} was made by {why}; its finished stages would be reused as they "
                  f"are. Remove the folder, or give another --workdir.")


def embedded_provenance(config) -> dict:
  """The embedded checkpoint's provenance (its files' digests checked), refused when it was
  trained with another configs/tiny.py than `config`: its held-out identities, sizes and
  sampling would not be this demo's."""
  record = shipped.read_provenance(shipped.EMBEDDED)
  wanted = json.loads(config.to_json())
  if record["config"] != wanted:
    fields = sorted(name for name in set(wanted) | set(record["config"])
                    if wanted.get(name) != record["config"].get(name))
    raise UserError(f"{shipped.EMBEDDED} was trained with another configs/tiny.py (it differs in "
                    f"{', '.join(fields)}); {shipped.RETRAIN}, or restore configs/tiny.py.")
  return record


def unpack_embedded(workdir: Path) -> EmotiveTalkPipeline:
  """The embedded checkpoint as workdir/checkpoint (what `etalk app` opens), loaded."""
  checkpoint = shipped.unpack(shipped.EMBEDDED, workdir / "checkpoint")
  print(f"   pipeline checkpoint: {checkpoint} (from {shipped.EMBEDDED})")
  return EmotiveTalkPipeline.load(checkpoint)


def pack_trained(workdir: Path, config, command: str, clock: Clock, training_seconds: float,
                 report: dict) -> Path:
  """workdir/checkpoint in the embedded form (`shipped`), with its provenance."""
  commit, dirty = shipped.source_commit()
  provenance = {
      "command": command, "commit": commit, "dirty": dirty,
      "config": json.loads(config.to_json()), "seeds": demo_seeds(config),
      "training_seconds": round(training_seconds, 1), "phases_seconds": dict(clock.phases),
      "machine": shipped.machine(),
      "report": {name: report[name] for name in (*KINDS, "videos")}}
  return shipped.pack(workdir / "checkpoint", workdir / shipped.PACKED, provenance)


def _summary(report: dict) -> str:
  return ", ".join(f"{kind}: lip sync {report[kind]['lip_sync']:.3f}, emotion "
                   f"{report[kind]['emotion']:.3f}" for kind in ("generated", "no-audio baseline"))


# `etalk demo` without --train: the dataset (for the held-out clips) and the readers, then the
# embedded checkpoint.
SAMPLING_STEPS = tuple(step for step in STEPS if step.name in ("dataset", "readers"))


def run(workdir: str | Path = "demo_out", *, train: bool = False, quick: bool = False,
        progress: bool = True) -> int:
  """`etalk demo` into `workdir`: the held-out report of the embedded checkpoint; with `train`,
  every stage trained from scratch first (an existing workdir of the same configuration reuses
  finished stages) and the result packed as the embedded one is; `quick`: a smoke run of the
  training at toy size."""
  workdir = Path(workdir).absolute()
  train = train or quick
  config = demo_config(quick)
  embedded = None if train else embedded_provenance(config)
  workdir.mkdir(parents=True, exist_ok=True)
  check_workdir(workdir, config)
  clock = Clock()
  command = "etalk demo" + (" --quick" if quick else " --train" if train else "")
  print(f"{command}: EmotiveTalk end to end on synthetic talking faces, CPU, nothing downloaded "
        f"(output: {workdir})")
  if embedded is None:
    what = "trains every stage from scratch"
  else:
    what = (f"samples the embedded checkpoint, which `{embedded['command']}` trained in "
            f"{embedded['training_seconds'] / 60:.0f} min (commit {str(embedded['commit'])[:10]}"
            f"); `etalk demo --train` trains one from scratch")
  # Measured on the 2-core dev machine (WORKSPACE.md); a finished stage is not run again.
  minutes = 3 if quick else 21 if train else 2
  print(f"   {what}; expect about {minutes} minutes on 2 CPU cores (longer on a busy machine); "
        "each stage prints its progress")
  # SIGTERM outside a stage's training (which saves its step and stops on its own) ends the demo
  # at once; every step writes atomically, so the same command resumes it either way.
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    done = run_steps(STEPS if train else SAMPLING_STEPS, step_actions(workdir, config, progress),
                     clock)
  except DemoInterrupted as interruption:
    print(f"\n{command}: interrupted ({interruption}); run the same command to resume",
          flush=True)
    return 130  # as a shell reports a run stopped by a signal
  finally:
    signal.signal(signal.SIGTERM, previous)
  reader, emotion_reader = done["readers"]
  print(f"   mouth reader fit correlation {reader.fit_correlation:.3f}, emotion reader fit "
        f"accuracy {emotion_reader.fit_accuracy:.3f}")
  with clock.phase("pipeline checkpoint"):
    pipe = (assemble_pipeline(workdir, done["frozen"], config) if train else
            unpack_embedded(workdir))
  training_seconds = time.perf_counter() - clock.started
  videos, rows, generation = generate_held_out(
      pipe, workdir, done["dataset"], config, done["readers"], clock, progress)
  source = ({"trained": command, "training_seconds": round(training_seconds, 1)} if train else
            {"embedded": str(shipped.EMBEDDED), "commit": embedded["commit"],
             "training_seconds": embedded["training_seconds"]})
  report = write_report(workdir, videos, rows, generation, done["readers"], clock.phases,
                        time.perf_counter() - clock.started, checkpoint=source)
  if train:
    packed = pack_trained(workdir, config, command, clock, training_seconds, report)
    print(f"   packed as the embedded checkpoint is (float16, provenance.json): {packed}")
  else:
    print(f"   the embedded checkpoint's training run reported {_summary(embedded['report'])}")
  return 0
