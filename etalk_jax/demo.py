"""`etalk demo`: the whole system on a fresh CPU machine with nothing downloaded.

1. builds the synthetic talking-face dataset (configs/tiny.py), holding out whole identities;
2. saves random tiny frozen encoders (wav2vec2, PD-FGC trunk, WavLM): no pretrained weights
   exist offline, and every stage reads them from folders as it would read converted ones;
3. trains every stage with `etalk_jax.train.loop.train` (configs/<stage>.py:tiny): encoder
   adapters (with the renderer ETHD); then precomputes the trained encoders' outputs for every
   training clip (`etalk precompute`), which the projector, Di-CTE and ETHD (from the renderer)
   read; the speech-emotion head; builds the emotion codebook; writes one pipeline checkpoint.
   A second (spawned) process runs the phases that the next one does not wait for (module
   `run`), so both cores work;
4. generates, for a held-out identity and held-out speech, videos in two emotions, the same with
   the audio removed (silence), and writes them and the ground-truth renders as mp4;
5. reports, measured on the frames: the lip-sync score (correlation between the mouth opening read
   from the frames and the speech envelope) and the emotion accuracy (the fraction of frames an
   emotion reader reads as the intended keyword), for the generated videos, the ground truth and
   the no-audio baseline.

Both readers are fitted on training identities' ground-truth frames only and never see the
generator: the mouth opening is a ridge regression from the mouth region's pixels (placed by the
portrait's landmarks) to the synthetic renderer's exact mouth opening; the emotion is a ridge
one-vs-rest classifier of the frame's downsampled colour difference to the person's neutral
portrait (so the identity's appearance cancels).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import FPS, SAMPLES_PER_FRAME

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
INT16_SCALE = 32768.0


def _stage_config(name: str, file: str):
  from etalk_jax.train.config import load_config  # noqa: PLC0415
  config = load_config(str(CONFIGS / f"{file}.py:tiny"))
  assert config.stage == name
  return config


def _demo_config(quick: bool):
  from etalk_jax.train.config import load_config  # noqa: PLC0415
  return load_config(str(CONFIGS / f"tiny.py:{'quick' if quick else 'full'}"))


class Clock:
  """Prints each phase with its duration."""

  def __init__(self):
    self.started = time.perf_counter()
    self.phases: dict[str, float] = {}

  def phase(self, name: str):
    clock = self

    class _Phase:
      def __enter__(self):
        print(f"\n== {name}", flush=True)
        self.began = time.perf_counter()

      def __exit__(self, *exc):
        seconds = time.perf_counter() - self.began
        clock.phases[name] = round(seconds, 1)
        if exc[0] is None:
          print(f"   {name}: {seconds:.1f} s (total {time.perf_counter() - clock.started:.0f} s)",
                flush=True)
        return False

    return _Phase()


# ----------------------------------------------------------------------------------- setup


def build_dataset(workdir: Path, config, progress: bool) -> str:
  from data_pipeline import synthetic  # noqa: PLC0415
  from data_pipeline.builders.synthetic_talking_heads import SyntheticConfig, build  # noqa: PLC0415
  data = dict(config.data)
  test_fraction = float(data.pop("test_fraction"))
  spec = synthetic.SyntheticSpec(**{name: tuple(value) if isinstance(value, list) else value
                                    for name, value in data.items()})
  name = f"demo_{spec.identities}x{spec.num_frames}_{spec.seed}"
  if spec.head_motion != 1.0:
    name += f"_motion{spec.head_motion:g}".replace(".", "p")
  if spec.face_scale != 1.0:
    name += f"_face{spec.face_scale:g}".replace(".", "p")
  builder_config = SyntheticConfig(name=name, description="etalk demo: identities held out",
                                   spec=spec, split_by_speaker=True, test_fraction=test_fraction)
  del progress  # TFDS prints its own progress bars
  return build(str(workdir / "data"), builder_config)


def save_frozen_encoders(workdir: Path, config) -> dict[str, Path]:
  """Random tiny wav2vec2, PD-FGC trunk and WavLM, saved once (seeded: the same every run)."""
  from etalk_jax import parallel  # noqa: PLC0415
  from etalk_jax.audio import Wav2Vec2, Wav2Vec2Config, WavLM, WavLMConfig  # noqa: PLC0415
  from etalk_jax.audio.params import save_speech_encoder  # noqa: PLC0415
  from etalk_jax.vision.params import save_pdfgc  # noqa: PLC0415
  from etalk_jax.vision.pdfgc import PDFGC_SMALL, PDFGCEncoder  # noqa: PLC0415

  def sizes(fields):
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in dict(fields).items()}

  # Initialised in one jitted call each (eager flax init of PD-FGC alone takes ~12 s here).
  mesh = parallel.make_mesh({"data": -1})
  folders = {name: workdir / "frozen" / name for name in ("wav2vec2", "pdfgc", "wavlm")}
  if not folders["wav2vec2"].exists():
    save_speech_encoder(parallel.create_sharded(
        lambda rngs: Wav2Vec2(Wav2Vec2Config(**sizes(config.wav2vec2)), rngs=rngs), mesh, seed=0),
        folders["wav2vec2"])
  if not folders["pdfgc"].exists():
    save_pdfgc(parallel.create_sharded(lambda rngs: PDFGCEncoder(PDFGC_SMALL, rngs=rngs), mesh,
                                       seed=1), folders["pdfgc"])
  if not folders["wavlm"].exists():
    save_speech_encoder(parallel.create_sharded(
        lambda rngs: WavLM(WavLMConfig(**sizes(config.wavlm)), rngs=rngs), mesh, seed=2),
        folders["wavlm"])
  return folders


def fit_codec(workdir: Path, dataset_dir: str, config) -> tuple[Path, float]:
  """The demo's latent codec, patch PCA fitted on training frames (no pretrained VAE offline),
  and the scale that brings reference-relative latents (each frame's latent minus its clip's
  first frame's) to unit std: ETHD's diffusion target (`ETHDConfig.latent_target`)."""
  from data_pipeline.loader import data_source  # noqa: PLC0415
  from etalk_jax.svd.codec import PatchPCACodec  # noqa: PLC0415
  path = workdir / "codec.json"
  scale_file = workdir / "target_scale.json"
  if not (path.exists() and scale_file.exists()):
    source = data_source(dataset_dir, "train")
    step = max(1, len(source) // 24)
    clips = [_record_clip(source[i]).frames[::4] for i in range(0, len(source), step)]
    codec = PatchPCACodec.fit(np.concatenate(clips), int(config.latent_channels))
    differences = [np.asarray(codec.encode(frames[1:])) - np.asarray(codec.encode(frames[:1]))
                   for frames in clips]
    target_scale = 1.0 / float(np.concatenate(differences).std())
    path.write_text(json.dumps(codec.spec()))
    scale_file.write_text(json.dumps({"target_scale": target_scale}))
  return path, float(json.loads(scale_file.read_text())["target_scale"])


STAGES = ("encoders", "projector", "dicte", "ethd", "ser")  # in dependency order
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
  from etalk_jax import parallel  # noqa: PLC0415
  from etalk_jax.ethd.model import save_ethd  # noqa: PLC0415
  from etalk_jax.train.stages.common import build_ethd  # noqa: PLC0415
  from etalk_jax.vision.pdfgc import PDFGC_SMALL  # noqa: PLC0415
  folder = workdir / "frozen" / "renderer_init"
  if not folder.exists():
    stage_config = _stage_config("encoders", "encoders")
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
  exports = {name: export_folder(workdir, name) for name in STAGES}
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
  encoders = common(_stage_config("encoders", "encoders"), "encoders")
  encoders.encoders.vision = str(frozen["pdfgc"])
  encoders.data.window = window
  encoders.ethd.init = f"ethd:{frozen['renderer']}"
  projector = common(_stage_config("projector", "vaid"), "projector")
  dicte = common(_stage_config("dicte", "dicte"), "dicte")
  for stage_config in (projector, dicte):
    stage_config.encoders.audio = str(frozen["wav2vec2"])
    stage_config.encoders.vision = str(exports["encoders"] / "encoders")
    stage_config.encoders.audio_features = audio_features
  ethd = common(_stage_config("ethd", "ethd_512"), "ethd")
  ethd.data.window = window
  ethd.encoders.audio = str(frozen["wav2vec2"])
  ethd.encoders.vision = str(exports["encoders"] / "encoders")
  ethd.encoders.audio_features = audio_features
  ethd.ethd.init = f"ethd:{exports['encoders'] / 'renderer'}"
  ethd.data.cross_clip_reference = float(config.cross_clip_reference)
  for stage_config in (encoders, ethd):
    stage_config.codec = codec
    _demo_ethd(stage_config, config, target_scale)
  ethd.vaid.projector = str(exports["projector"])
  ethd.vaid.dicte = str(exports["dicte"])
  # The trained encoders' outputs for every training clip, written once after the encoder stage
  # (`precompute_features`): these stages would otherwise re-encode each window they draw.
  for stage_config in (projector, dicte, ethd):
    stage_config.data.precomputed = str(workdir / PRECOMPUTED)
  ser = common(_stage_config("ser", "ser"), "ser")
  ser.encoders.wavlm = str(frozen["wavlm"])
  ser.encoders.audio_features = audio_features
  ser.data.window = min(int(ser.data.window), int(config.data.num_frames))
  return {"encoders": encoders, "projector": projector, "dicte": dicte, "ethd": ethd, "ser": ser}


def train_stage(workdir: Path, name: str, stage_config, progress: bool) -> str:
  """Trains one stage into workdir/runs/<name> unless its export exists; returns a summary line.
  Module-level: the side process runs it too."""
  from etalk_jax.train.loop import train  # noqa: PLC0415
  export = export_folder(workdir, name)
  if (export / ("renderer" if name == "encoders" else "")).exists():
    return f"{export} exists: already trained"
  summary = train(stage_config, export.parent, progress=progress)
  metrics = summary["final_metrics"]
  return (f"{name}: loss {metrics.get('loss', float('nan')):.4f} after {summary['steps']} "
          f"steps, {metrics.get('steps_per_s', 0):.2f} steps/s, compile "
          f"{summary['compile_seconds']:.0f} s")


def _wait(clock: Clock, name: str, job) -> Any:
  """A side-process job's result, its wait timed as phase `name`; prints the job's own time."""
  with clock.phase(f"{name} (side process)"):
    result, seconds = job.result()
    if isinstance(result, str):
      print(f"   {result}")
    print(f"   {seconds:.1f} s in the side process", flush=True)
  return result


def train_here(workdir: Path, configs: dict, name: str, clock: Clock, progress: bool) -> None:
  """`train_stage` in this process, timed as a phase."""
  with clock.phase(f"train {name}"):
    print(f"   {train_stage(workdir, name, configs[name], progress)}", flush=True)


def precompute_features(ethd_config, progress: bool) -> None:
  """`etalk precompute` of the training clips with the ETHD stage's codec and encoders (the
  projector and Di-CTE stages read the same folder's encoder outputs)."""
  from etalk_jax.train.precompute import precompute_command  # noqa: PLC0415
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
  from etalk_jax.emotion.codebook import codebook_build_command  # noqa: PLC0415
  summary = codebook_build_command(dataset_dir, workdir / CODEBOOK,
                                   export_folder(workdir, "encoders") / "encoders",
                                   overwrite=True, progress=False)
  return "codebook frames per keyword: " + ", ".join(
      f"{keyword} {count}" for keyword, count in summary["frames"].items())


def assemble_pipeline(workdir: Path, frozen, config):
  from etalk_jax.audio import FeatureConfig  # noqa: PLC0415
  from etalk_jax.audio.params import load_wav2vec2, load_wavlm  # noqa: PLC0415
  from etalk_jax.diffusion.sampling import SamplerConfig, WindowConfig  # noqa: PLC0415
  from etalk_jax.emotion.codebook import Codebook  # noqa: PLC0415
  from etalk_jax.emotion.ser import load_ser  # noqa: PLC0415
  from etalk_jax.ethd.model import load_ethd  # noqa: PLC0415
  from etalk_jax.pipeline import EmotiveTalkPipeline, save_pipeline  # noqa: PLC0415
  from etalk_jax.svd.codec import codec_from_spec  # noqa: PLC0415
  from etalk_jax.vaid.storage import load_dicte, load_projector  # noqa: PLC0415
  from etalk_jax.vision.params import load_encoders  # noqa: PLC0415

  exports = {name: export_folder(workdir, name) for name in STAGES}
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


# --------------------------------------------------------------------------------- measures


@dataclasses.dataclass
class HeldOutClip:
  clip_id: str
  emotion: str
  frames: np.ndarray  # uint8 (n, R, R, 3)
  speech: np.ndarray  # float32 16 kHz
  landmarks_px: np.ndarray  # (n, 478, 2)
  mouth_open: np.ndarray  # (n,)


def _record_clip(record) -> HeldOutClip:
  from data_pipeline import EMOTION_LABELS, media  # noqa: PLC0415
  frames = media.decode_frames(record["video"])
  resolution = frames.shape[1]
  clip_id = record["clip_id"]
  return HeldOutClip(
      clip_id=clip_id.decode() if isinstance(clip_id, bytes) else str(clip_id),
      emotion=EMOTION_LABELS[int(record["emotion"])], frames=frames,
      speech=np.asarray(record["audio"], np.float32) / INT16_SCALE,
      landmarks_px=np.asarray(record["landmarks"], np.float32) * resolution,
      mouth_open=np.asarray(record["mouth_open"], np.float32))


def held_out_clips(dataset_dir: str) -> dict[str, list[HeldOutClip]]:
  """Test-split clips (identities never trained on), by speaker."""
  from data_pipeline.loader import data_source  # noqa: PLC0415
  source = data_source(dataset_dir, "test")
  by_speaker: dict[str, list[HeldOutClip]] = {}
  for index in range(len(source)):
    record = source[index]
    speaker = record["speaker"]
    speaker = speaker.decode() if isinstance(speaker, bytes) else str(speaker)
    by_speaker.setdefault(speaker, []).append(_record_clip(record))
  if not by_speaker:
    raise ValueError(f"{dataset_dir} has no test clips; the demo needs a held-out identity")
  return by_speaker


MOUTH_PATCH = (8, 16)  # rows, columns of the resampled mouth region


def mouth_box(landmarks_px: np.ndarray, size: int) -> tuple[int, int, int, int]:
  """The mouth region (left, top, right, bottom) from one frame's landmarks, with margin for an
  open jaw."""
  from data_pipeline.faces import LIPS_OUTER  # noqa: PLC0415
  lips = landmarks_px[list(LIPS_OUTER)]
  (left, top), (right, bottom) = lips.min(axis=0), lips.max(axis=0)
  width, height = right - left, bottom - top
  box = (left - 0.25 * width, top - 0.5 * height, right + 0.25 * width, bottom + 1.0 * height)
  left, top, right, bottom = (int(round(v)) for v in box)
  return max(left, 0), max(top, 0), min(right, size), min(bottom, size)


def _mouth_patches(frames: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
  """Colour mouth-region pixels in [0, 1], resampled to MOUTH_PATCH: `(n, rows * cols * 3)`."""
  from PIL import Image  # noqa: PLC0415
  left, top, right, bottom = box
  rows, cols = MOUTH_PATCH
  return np.stack([np.asarray(Image.fromarray(frame[top:bottom, left:right]).resize(
      (cols, rows), Image.BILINEAR), np.float32).reshape(-1) / 255.0 for frame in frames])


def mouth_features(frames: np.ndarray, portrait: np.ndarray,
                   portrait_landmarks_px: np.ndarray) -> np.ndarray:
  """Per frame, the mouth region of the portrait's box in colour and its absolute difference to
  the portrait's: `(n, 2 * rows * cols * 3 + 1)` with a bias column. Grey levels alone are
  ambiguous (an opening shows a dark cavity on one face and white teeth on another, which read
  inverted); the difference to the closed-mouth portrait grows either way."""
  box = mouth_box(portrait_landmarks_px, frames.shape[1])
  patches = _mouth_patches(frames, box)
  difference = np.abs(patches - _mouth_patches(portrait[None], box))
  return np.concatenate([patches, difference, np.ones((len(patches), 1), np.float32)], axis=1)


class MouthReader:
  """Ridge regression: mouth-region pixels -> mouth opening (0 shut .. 1 wide)."""

  def __init__(self, clips_with_portraits: list[tuple[HeldOutClip, np.ndarray, np.ndarray]],
               ridge: float = 1.0):
    """`clips_with_portraits`: (clip, its speaker's portrait frame, the portrait's landmarks in
    pixels). The mouth box comes from the portrait, as at test, so the reader learns to read
    mouths that an emotion moves within that box (a sad mouth's lowered corners, a surprised
    jaw)."""
    features, targets = [], []
    for clip, portrait, portrait_landmarks_px in clips_with_portraits:
      features.append(mouth_features(clip.frames, portrait, portrait_landmarks_px))
      targets.append(clip.mouth_open)
    x, y = np.concatenate(features), np.concatenate(targets)
    self.weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    self.fit_correlation = float(np.corrcoef(x @ self.weights, y)[0, 1])

  def __call__(self, frames: np.ndarray, portrait: np.ndarray,
               portrait_landmarks_px: np.ndarray) -> np.ndarray:
    return mouth_features(frames, portrait, portrait_landmarks_px) @ self.weights


def speech_envelope(speech: np.ndarray, frames: int) -> np.ndarray:
  """RMS of each frame's 640 samples, smoothed over 3 frames."""
  samples = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
  samples[:min(len(speech), len(samples))] = speech[:len(samples)]
  rms = np.sqrt(np.mean(samples.reshape(frames, SAMPLES_PER_FRAME) ** 2, axis=1))
  return np.convolve(np.pad(rms, 1, mode="edge"), np.ones(3) / 3, mode="valid")


def lip_sync_score(mouth_opening: np.ndarray, envelope: np.ndarray) -> float:
  if np.std(mouth_opening) < 1e-8 or np.std(envelope) < 1e-8:
    return 0.0
  return float(np.corrcoef(mouth_opening, envelope)[0, 1])


FACE_PATCH = 32  # side of the downsampled face difference image the emotion reader sees


def face_difference(frames: np.ndarray, portrait: np.ndarray) -> np.ndarray:
  """Per frame, the colour difference to the person's neutral portrait, area-downsampled to
  FACE_PATCH² (identity appearance cancels; brows, eyes and mouth remain): `(n, features + 1)`
  with a bias column."""
  size = frames.shape[1]
  factor = size // FACE_PATCH
  difference = frames.astype(np.float32) / 255.0 - portrait.astype(np.float32)[None] / 255.0
  small = difference.reshape(len(frames), FACE_PATCH, factor, FACE_PATCH, factor, 3).mean((2, 4))
  features = small.reshape(len(frames), -1)
  return np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)


class EmotionReader:
  """Ridge one-vs-rest classifier: face difference to the person's neutral portrait -> emotion
  keyword, fitted on training identities' ground-truth frames."""

  def __init__(self, clips_with_portraits: list[tuple[HeldOutClip, np.ndarray]], keywords,
               ridge: float = 10.0):
    self.keywords = tuple(keywords)
    features, labels = [], []
    for clip, portrait in clips_with_portraits:
      features.append(face_difference(clip.frames, portrait))
      labels.append(np.full(len(clip.frames), self.keywords.index(clip.emotion)))
    x, y = np.concatenate(features), np.concatenate(labels)
    targets = np.eye(len(self.keywords), dtype=np.float32)[y]
    self.weights = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ targets)
    self.fit_accuracy = float(np.mean((x @ self.weights).argmax(1) == y))

  def accuracy(self, frames: np.ndarray, portrait: np.ndarray, emotion: str) -> float:
    """Fraction of frames read as `emotion`."""
    predicted = (face_difference(frames, portrait) @ self.weights).argmax(1)
    return float(np.mean(predicted == self.keywords.index(emotion)))


def fit_readers(dataset_dir: str) -> tuple[MouthReader, EmotionReader]:
  """The mouth and emotion readers, fitted on training identities' ground truth only."""
  from data_pipeline.loader import data_source  # noqa: PLC0415
  source = data_source(dataset_dir, "train")
  clips = [_record_clip(source[i]) for i in range(len(source))]
  speakers: dict[str, list[HeldOutClip]] = {}
  for record_index, clip in enumerate(clips):
    speakers.setdefault(str(source[record_index]["speaker"]), []).append(clip)
  with_portraits = []  # (clip, its speaker's neutral portrait frame, the portrait's landmarks)
  for speaker_clips in speakers.values():
    neutral = next((c for c in speaker_clips if c.emotion == "neutral"), speaker_clips[0])
    with_portraits += [(clip, neutral.frames[0], neutral.landmarks_px[0])
                       for clip in speaker_clips]
  keywords = sorted({clip.emotion for clip in clips})
  step = max(1, len(clips) // 24)
  return (MouthReader(with_portraits[::step]),
          EmotionReader([(clip, portrait) for clip, portrait, _ in with_portraits], keywords))


# ------------------------------------------------------------------------------------- run


def _timed(function, *args):
  """(function(*args), seconds it took): what the side process returns."""
  began = time.perf_counter()
  return function(*args), time.perf_counter() - began


def run(workdir: str | Path = "demo_out", *, quick: bool = False, progress: bool = True) -> int:
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  config = _demo_config(quick)
  clock = Clock()
  print(f"etalk demo{' --quick' if quick else ''}: EmotiveTalk end to end on synthetic talking "
        f"faces, CPU, nothing downloaded (output: {workdir})")
  # A second process runs what nothing waits on at once: the frozen encoders and the renderer's
  # initialisation beside the dataset build; the speech-emotion head and the report's readers
  # beside the encoder stage; Di-CTE beside the projector; the codebook beside ETHD. One process
  # keeps ~1.2 of the two cores busy (the demo's user time / wall time in one process).
  # spawn: JAX does not survive fork.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as side:
    frozen_job = side.submit(_timed, save_frozen_models, workdir, config)
    with clock.phase("synthetic dataset"):
      dataset_dir = build_dataset(workdir, config, progress)
      print(f"   {dataset_dir}")
    frozen = _wait(clock, "frozen encoders (random tiny wav2vec2, PD-FGC, WavLM) and the "
                   "initial renderer", frozen_job)
    configs = stage_configs(workdir, dataset_dir, frozen, config)
    ser_job = side.submit(_timed, train_stage, workdir, "ser", configs["ser"], False)
    readers_job = side.submit(_timed, fit_readers, dataset_dir)
    train_here(workdir, configs, "encoders", clock, progress)
    with clock.phase("precompute the trained encoders' outputs"):
      precompute_features(configs["ethd"], progress)
    _wait(clock, "train ser", ser_job)
    dicte_job = side.submit(_timed, train_stage, workdir, "dicte", configs["dicte"], False)
    train_here(workdir, configs, "projector", clock, progress)
    _wait(clock, "train dicte", dicte_job)
    codebook_job = side.submit(_timed, build_codebook, workdir, dataset_dir)
    train_here(workdir, configs, "ethd", clock, progress)
    _wait(clock, "emotion codebook", codebook_job)
    reader, emotion_reader = _wait(clock, "mouth and emotion readers, fitted on training "
                                   "identities,", readers_job)
  print(f"   mouth reader fit correlation {reader.fit_correlation:.3f}, emotion reader fit "
        f"accuracy {emotion_reader.fit_accuracy:.3f}")
  with clock.phase("pipeline checkpoint"):
    pipe = assemble_pipeline(workdir, frozen, config)

  by_speaker = held_out_clips(dataset_dir)
  speaker, clips = sorted(by_speaker.items())[0]
  by_emotion = {clip.emotion: clip for clip in clips}
  emotions = [e for e in config.emotions if e in by_emotion]
  if len(emotions) < 2:
    raise ValueError(f"held-out speaker {speaker} lacks the demo's emotions {config.emotions}")
  portrait_clip = by_emotion.get("neutral", clips[0])
  portrait, portrait_landmarks = portrait_clip.frames[0], portrait_clip.landmarks_px[0]
  videos = workdir / "videos"
  videos.mkdir(exist_ok=True)
  rows: dict[str, dict[str, list[float]]] = {
      kind: {"lip_sync": [], "emotion": []} for kind in ("generated", "ground truth",
                                                      "no-audio baseline")}
  generation: list[dict[str, float]] = []
  with clock.phase(f"generate: held-out identity {speaker}, emotions {', '.join(emotions)}"):
    for emotion in emotions:
      clip = by_emotion[emotion]
      envelope = speech_envelope(clip.speech, len(clip.frames))
      for kind, speech in (("generated", clip.speech),
                           ("no-audio baseline", np.zeros_like(clip.speech))):
        began = time.perf_counter()
        result = pipe(portrait, speech, emotion=emotion, landmarks=portrait_landmarks,
                      aligned=True, seed=0, progress=progress)
        seconds = time.perf_counter() - began
        generation.append({"frames": len(result.frames), "seconds": seconds})
        name = f"{emotion}{'' if kind == 'generated' else '_no_audio'}.mp4"
        result.write(videos / name)
        rows[kind]["lip_sync"].append(lip_sync_score(reader(result.frames, portrait,
                                                            portrait_landmarks),
                                                     envelope))
        rows[kind]["emotion"].append(emotion_reader.accuracy(result.frames, portrait, emotion))
        print(f"   {videos / name}: {len(result.frames)} frames in {seconds:.1f} s")
      from etalk_jax.pipeline import Result  # noqa: PLC0415
      Result(frames=clip.frames, audio=clip.speech, fps=FPS, expressions=np.zeros((0,)),
             lip_latents=np.zeros((0,)), emotion=emotion).write(videos / f"{emotion}_ground_truth.mp4")
      rows["ground truth"]["lip_sync"].append(lip_sync_score(
          reader(clip.frames, portrait, portrait_landmarks), envelope))
      rows["ground truth"]["emotion"].append(emotion_reader.accuracy(clip.frames, portrait,
                                                                     emotion))

  report = {kind: {name: float(np.mean(values)) for name, values in scores.items()}
            for kind, scores in rows.items()}
  # One 100-frame video's correlation moves by 0.1-0.2 by chance: the spread shows how much.
  report["lip_sync_per_video"] = {kind: dict(zip(emotions, scores["lip_sync"]))
                                  for kind, scores in rows.items()}
  later = generation[1:] or generation
  report["sampling"] = {
      "first_video_seconds_incl_compile": round(generation[0]["seconds"], 1),
      "frames_per_second": round(sum(g["frames"] for g in later) /
                                 sum(g["seconds"] for g in later), 2)}
  report["phases_seconds"] = clock.phases
  report["total_seconds"] = round(time.perf_counter() - clock.started, 1)
  report["mouth_reader_fit_correlation"] = reader.fit_correlation
  report["emotion_reader_fit_accuracy"] = emotion_reader.fit_accuracy
  (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")

  print(f"\n== report (held-out identity {speaker}; {len(emotions)} emotions; "
        f"{workdir / 'report.json'})")
  print(f"   {'':20s} {'lip-sync':>9s} {'emotion acc.':>13s}")
  for kind in ("ground truth", "generated", "no-audio baseline"):
    print(f"   {kind:20s} {report[kind]['lip_sync']:9.3f} {report[kind]['emotion']:13.3f}")
  print(f"   sampling: {report['sampling']['frames_per_second']} frames/s after the first video "
        f"({report['sampling']['first_video_seconds_incl_compile']} s incl. compile)")
  print(f"   total {report['total_seconds'] / 60:.1f} min; videos in {videos}")
  margin = report["generated"]["lip_sync"] - report["no-audio baseline"]["lip_sync"]
  print("   lip sync above the no-audio baseline by " f"{margin:.3f}")
  return 0
