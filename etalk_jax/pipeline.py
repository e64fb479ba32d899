"""Inference: portrait + speech (+ an emotion source) -> talking-head video (ARCHITECTURE.md §1).

A pipeline checkpoint is one folder with `pipeline.json` at its root naming every component's
sub-folder (each in its own format, written by that component's save function):

  {"format": "etalk_pipeline", "version": 1, "resolution": R, "codec": codec.spec(),
   "components": {"ethd": "ethd", "projector": "projector", "dicte": "dicte",
                  "encoders": "encoders", "audio_encoder": "wav2vec2",
                  "codebook": "codebook.json", optional "wavlm", "ser", "vae"},
   "audio_features": FeatureConfig fields, "sampler": SamplerConfig fields,
   "windows": WindowConfig fields, "dicte_steps": Di-CTE's DDIM steps}

`save_pipeline` writes one atomically; `EmotiveTalkPipeline.load` reads it back and checks that
the components fit each other (sizes of latents, lip and expression codes, audio features)
before anything runs. Calling the pipeline:

  portrait -> face landmarks -> square crop at R -> z_ref (codec), face mask, e_ref (encoders)
  speech   -> A_w (wav2vec2 windows) -> l_a (projector)
  emotion  -> e_cond (codebook / image) -> e_a (Di-CTE), or e_v of a driving video directly
  ETHD     -> overlapping-window Euler sampling of the latents -> codec decode -> frames

Compiles: AudioFeatures buckets audio lengths, Di-CTE runs fixed-size windows, the projector
runs on the frame count of the sampler's window bucket, and the ETHD sampler compiles once per
window-count bucket (`sample_video`'s design): a second call of another length in the same
bucket compiles nothing new for ETHD.

Hardware: `load(folder, compute=Compute.bf16())` builds every model to compute in bf16 over its
fp32 weights (default fp32, the CPU's parity setting); with several local devices ETHD's windows
are split over them (`sample_video`'s `devices`), its weights replicated on each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline import FPS, SAMPLE_RATE
from etalk_jax.diffusion.sampling import (SamplerConfig, WindowConfig, model_denoiser,
                                          plan_windows, sample_video, window_sharding,
                                          windows_for_devices)
from etalk_jax.layers.compute import FP32, Compute

log = logging.getLogger(__name__)

FORMAT = "etalk_pipeline"
VERSION = 1
PIPELINE_FILE = "pipeline.json"
MIN_SPEECH_SECONDS = 0.2
MAX_INTENSITY = 1.5  # ARCHITECTURE.md §3.10: alpha in [0, 1.5]
COMPONENT_FOLDERS = {"ethd": "ethd", "projector": "projector", "dicte": "dicte",
                     "encoders": "encoders", "audio_encoder": "wav2vec2",
                     "codebook": "codebook.json"}
OPTIONAL_FOLDERS = {"wavlm": "wavlm", "ser": "ser", "vae": "vae"}
DTYPES = ("float32", "bfloat16")  # `etalk sample --dtype`
EMOTION_OPTIONS = ("emotion", "emotion_text", "emotion_image", "emotion_video", "emotion_audio")
MISMATCH = "a checkpoint that does not match the config"
REFERENCE_NOISE_STREAM = 2  # the reference's noise augmentation: fold_in(seed key, 2)


# ----------------------------------------------------------------------------------------------
# Compiled pieces shared by every pipeline (module level, so equal structures share programs)
# ----------------------------------------------------------------------------------------------


def with_reference_latent(scaled_noisy: jax.Array, reference_latent: jax.Array) -> jax.Array:
  """ETHD's input: the scaled noisy latents `(batch, frames, h, w, c)` ⊕ the reference latent
  `(batch, h, w, c)` on every frame, on the channels (SVD's image-latent concatenation)."""
  reference = jnp.broadcast_to(reference_latent[:, None],
                               scaled_noisy.shape[:-1] + reference_latent.shape[-1:])
  return jnp.concatenate([scaled_noisy, reference.astype(scaled_noisy.dtype)], axis=-1)


def call_ethd(ethd, scaled_noisy: jax.Array, c_noise: jax.Array, frame_conditions: dict,
              video_conditions: dict) -> jax.Array:
  """ETHD as `sample_video`'s denoiser call. frame_conditions: `lip_latents` l_a and
  `expression` e_dri, `(batch, frames, d)`; video_conditions: `reference_latent` z_ref
  `(batch, h, w, c)` (the codec's `encode_reference`: for the VAE SVD's unscaled mode of the
  noise-augmented frame; broadcast over the frames and concatenated after input scaling, as in
  training), `reference_expression` e_ref `(batch, d)` and `face_mask` `(batch, H, W)`."""
  sample = with_reference_latent(scaled_noisy, video_conditions["reference_latent"])
  return ethd(sample, c_noise, frame_conditions["lip_latents"], frame_conditions["expression"],
              video_conditions["reference_expression"], video_conditions["face_mask"])


def _apply_model(graphdef, state, *inputs):
  return nnx.merge(graphdef, state)(*inputs)


# The graphdef compares by value: one program per model structure and input shape.
apply_model = jax.jit(_apply_model, static_argnums=0)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  """One generated video."""
  frames: np.ndarray         # uint8 (n, R, R, 3), or the portrait's size with paste-back
  audio: np.ndarray          # float32 16 kHz mono speech
  fps: int                   # 25
  expressions: np.ndarray    # e_dri (n, expression_dim): what drove the face
  lip_latents: np.ndarray    # l_a (n, lip_dim)
  emotion: str | None        # keyword used; "image" / "video" for those sources; None: uncond.

  def write(self, path: str | Path) -> Path:
    """An H.264 mp4 with the speech as AAC, written atomically."""
    from data_pipeline.media import write_video_file  # noqa: PLC0415
    audio = np.round(np.clip(self.audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    write_video_file(path, self.frames, audio, fps=self.fps, sample_rate=SAMPLE_RATE)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Input reading
# ----------------------------------------------------------------------------------------------


def read_image(source: Any, what: str = "the portrait") -> tuple[np.ndarray, str]:
  """A path or an array -> (uint8 RGB (H, W, 3), its name for messages)."""
  if isinstance(source, (str, Path)):
    path = Path(source)
    if not path.is_file():
      raise FileNotFoundError(f"{what} {path} does not exist; give a PNG or JPEG photo.")
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415
    try:
      with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), str(path)
    except (UnidentifiedImageError, OSError) as error:
      raise ValueError(f"{what} {path} could not be read as an image ({error}); give a PNG or "
                       "JPEG photo.") from None
  image = np.asarray(source)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"{what} array has shape {image.shape} and dtype {image.dtype}; give "
                     "uint8 RGB (height, width, 3).")
  return image, f"{what} array"


def detect_face(image: np.ndarray, name: str) -> np.ndarray:
  """Pixel landmarks (478, 2) of the largest face in an RGB image (MediaPipe)."""
  from data_pipeline.faces import FaceLandmarker  # noqa: PLC0415
  with FaceLandmarker() as landmarker:
    landmarks = landmarker(image)
    faces = landmarker.faces_seen_max
  if landmarks is None:
    raise ValueError(f"no face found in the portrait {name}; use a photo with one clearly "
                     "visible, frontal face")
  if faces > 1:
    message = f"{faces} faces found in {name}; using the largest"
    warnings.warn(message, stacklevel=3)
    log.warning(message)
  return np.asarray(landmarks, np.float32)


@dataclasses.dataclass(frozen=True)
class FaceCrop:
  """The square face crop of one image at the pipeline's resolution."""
  crop: np.ndarray       # uint8 (R, R, 3)
  box: np.ndarray        # (x0, y0, x1, y1) in the source image's pixels
  landmarks: np.ndarray  # (478, 2) pixels of the crop


def crop_face(image: np.ndarray, landmarks_px: np.ndarray, resolution: int) -> FaceCrop:
  """The training crop (`clip_crop_box`) of one image, with its landmarks in crop pixels."""
  from data_pipeline.faces import clip_crop_box, crop_frame, to_crop_coordinates  # noqa: PLC0415
  landmarks_px = np.asarray(landmarks_px, np.float32)
  if landmarks_px.shape != (478, 2):
    raise ValueError(f"landmarks have shape {landmarks_px.shape}; give (478, 2) pixel "
                     "coordinates (MediaPipe's face mesh).")
  box = clip_crop_box(landmarks_px[None])
  return FaceCrop(crop_frame(image, box, resolution), box,
                  to_crop_coordinates(landmarks_px, box) * resolution)


def read_speech(source: Any) -> tuple[np.ndarray, str]:
  """A path, a `(samples, rate)` pair or 16 kHz float samples -> (float32 16 kHz mono, name);
  speech shorter than MIN_SPEECH_SECONDS is refused."""
  from etalk_jax.audio.features import load_speech  # noqa: PLC0415
  if isinstance(source, np.ndarray):
    source = (source, SAMPLE_RATE)
  what = str(source) if isinstance(source, (str, Path)) else "the speech array"
  samples = load_speech(source, what)
  if samples.shape[0] < MIN_SPEECH_SECONDS * SAMPLE_RATE:
    raise ValueError(f"{what} lasts {samples.shape[0] / SAMPLE_RATE:.3f} s; the speech must last "
                     f"at least {MIN_SPEECH_SECONDS} s.")
  return samples, what


def resample_frames(values: np.ndarray, frames: int) -> np.ndarray:
  """Per-frame values (m, ...) -> (frames, ...): cut when m >= frames, else stretched by nearest
  frame (a driving video shorter than the speech is slowed down, not looped)."""
  count = values.shape[0]
  if count >= frames:
    return values[:frames]
  return values[np.floor(np.arange(frames) * count / frames).astype(np.int64)]


def paste_into_portrait(portrait: np.ndarray, crops: np.ndarray, box: np.ndarray,
               feather: float = 0.06) -> np.ndarray:
  """Generated crops (n, R, R, 3) resized to the crop box and pasted into copies of the portrait
  frame; the crop's border fades into the portrait over `feather` of its side so no seam shows.
  Parts of the box outside the portrait are dropped."""
  from PIL import Image  # noqa: PLC0415
  height, width = portrait.shape[:2]
  x0, y0 = int(round(box[0])), int(round(box[1]))
  side = max(int(round(box[2] - box[0])), 1)
  left, top = max(x0, 0), max(y0, 0)
  right, bottom = min(x0 + side, width), min(y0 + side, height)
  frames = np.repeat(portrait[None], crops.shape[0], axis=0)
  if right <= left or bottom <= top:
    return frames
  ramp = np.clip((np.minimum(np.arange(side), side - 1 - np.arange(side)) + 0.5)
                 / max(feather * side, 1.0), 0.0, 1.0)
  alpha = np.minimum(ramp[:, None], ramp[None, :])[..., None]
  alpha = alpha[top - y0:bottom - y0, left - x0:right - x0]
  for index, crop in enumerate(crops):
    resized = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BILINEAR),
                         np.float32)[top - y0:bottom - y0, left - x0:right - x0]
    region = frames[index, top:bottom, left:right].astype(np.float32)
    frames[index, top:bottom, left:right] = np.round(
        alpha * resized + (1 - alpha) * region).astype(np.uint8)
  return frames


# ----------------------------------------------------------------------------------------------
# Checkpoint consistency
# ----------------------------------------------------------------------------------------------


def _unet_downsample(ethd) -> int:
  return 2 ** (len(ethd.ethd_config.unet.block_out_channels) - 1)


def component_mismatches(*, ethd, projector, dicte, encoders, audio_features, codebook, codec,
                         resolution: int, ser=None, wavlm_features=None) -> list[str]:
  """Every size on which two components disagree, one line each naming both."""
  problems = []
  ethd_config = ethd.ethd_config
  encoder_config = encoders.config

  def expect(left: str, left_value, right: str, right_value):
    if left_value != right_value:
      problems.append(f"{left} = {left_value} but {right} = {right_value}")

  expect("ethd lip_dim", ethd_config.lip_dim, "projector output_dim",
         projector.config.output_dim)
  expect("projector output_dim (l_a)", projector.config.output_dim,
         "encoders feature_dim (l_v)", encoder_config.feature_dim)
  expect("ethd expression_dim", ethd_config.expression_dim, "encoders expression_dim",
         encoder_config.expression_dim)
  expect("dicte expression_dim", dicte.config.expression_dim, "encoders expression_dim",
         encoder_config.expression_dim)
  expect("dicte condition_dim", dicte.config.condition_dim, "encoders expression_dim",
         encoder_config.expression_dim)
  expect("codebook dim", codebook.dim, "encoders expression_dim", encoder_config.expression_dim)
  audio_sizes = (audio_features.config.window, audio_features.num_layers,
                 audio_features.model_config.hidden_size)
  for name, model in (("projector", projector), ("dicte", dicte)):
    expect(f"{name} (window, audio_layers, audio_dim)",
           (model.config.window, model.config.audio_layers, model.config.audio_dim),
           "audio_encoder with audio_features (window, layers, hidden)", audio_sizes)
  unet = ethd_config.unet
  expect("codec latent channels x 2 (noisy + reference)", 2 * codec.latent_channels,
         "ethd in_channels", unet.in_channels)
  expect("codec latent channels", codec.latent_channels, "ethd out_channels", unet.out_channels)
  step = codec.downsample * _unet_downsample(ethd)
  if resolution % step:
    problems.append(f"resolution {resolution} is not divisible by codec downsample "
                    f"{codec.downsample} x ethd levels {_unet_downsample(ethd)} = {step}")
  if ser is not None:
    if wavlm_features is None:
      problems.append("ser is given but no wavlm to read the speech with")
    else:
      expect("ser (num_layers, hidden_size)", (ser.config.num_layers, ser.config.hidden_size),
             "wavlm (layers, hidden)", (wavlm_features.num_layers,
                                        wavlm_features.model_config.hidden_size))
  return problems


def _raise_mismatches(subject: str, problems: list[str]) -> None:
  """One ValueError listing every mismatch: "<subject> a checkpoint that does not match..."."""
  if problems:
    raise ValueError(f"{subject} {MISMATCH}: " + "; ".join(problems) + ". Export components "
                     "trained together (the same encoders, audio encoder and sizes).")


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save_pipeline(folder: str | Path, *, ethd, projector, dicte, encoders, audio_encoder,
                  codebook, codec, resolution: int, wavlm=None, ser=None, feature_config=None,
                  sampler: SamplerConfig = SamplerConfig(), windows: WindowConfig | None = None,
                  dicte_steps: int | None = None, overwrite: bool = False) -> Path:
  """Writes a pipeline checkpoint (every component in its own format + pipeline.json),
  atomically: a failure leaves nothing at `folder`. Components that do not fit each other are
  refused before anything is written."""
  from etalk_jax.audio import params as audio_params  # noqa: PLC0415
  from etalk_jax.audio.features import AudioFeatures, FeatureConfig  # noqa: PLC0415
  from etalk_jax.ethd.model import save_ethd  # noqa: PLC0415
  from etalk_jax.svd.codec import VAECodec  # noqa: PLC0415
  from etalk_jax.vaid.storage import save_vaid_model  # noqa: PLC0415
  from etalk_jax.vision.params import save_encoders  # noqa: PLC0415
  from etalk_jax.weights import atomic_folder  # noqa: PLC0415

  feature_config = FeatureConfig() if feature_config is None else feature_config
  windows = _default_windows(resolution) if windows is None else windows
  if (ser is None) != (wavlm is None):
    raise ValueError("save_pipeline: emotional-speech control needs both `wavlm` and `ser`; "
                     "give both or neither.")
  _raise_mismatches("save_pipeline: these components would make", component_mismatches(
      ethd=ethd, projector=projector, dicte=dicte, encoders=encoders,
      audio_features=AudioFeatures(audio_encoder, feature_config), codebook=codebook,
      codec=codec, resolution=resolution, ser=ser,
      wavlm_features=None if wavlm is None else AudioFeatures(wavlm, feature_config)))
  components = dict(COMPONENT_FOLDERS)
  folder = Path(folder).absolute()
  with atomic_folder(folder, overwrite=overwrite) as tmp:
    save_ethd(ethd, tmp / components["ethd"])
    save_vaid_model(projector, tmp / components["projector"])
    save_vaid_model(dicte, tmp / components["dicte"])
    save_encoders(encoders, tmp / components["encoders"])
    audio_params.save_speech_encoder(audio_encoder, tmp / components["audio_encoder"])
    codebook.save(tmp / components["codebook"])
    if wavlm is not None:
      from etalk_jax.emotion.ser import save_ser  # noqa: PLC0415
      components.update(wavlm=OPTIONAL_FOLDERS["wavlm"], ser=OPTIONAL_FOLDERS["ser"])
      audio_params.save_speech_encoder(wavlm, tmp / components["wavlm"])
      save_ser(ser, tmp / components["ser"])
    if isinstance(codec, VAECodec):
      from etalk_jax.svd.params import save_svd_model  # noqa: PLC0415
      components["vae"] = OPTIONAL_FOLDERS["vae"]
      save_svd_model(codec.vae, tmp / components["vae"])
    record = {
        "format": FORMAT, "version": VERSION, "resolution": int(resolution),
        "codec": codec.spec(), "components": components,
        "audio_features": dataclasses.asdict(feature_config),
        "sampler": dataclasses.asdict(sampler), "windows": dataclasses.asdict(windows),
        "dicte_steps": int(dicte.config.sample_steps if dicte_steps is None else dicte_steps)}
    (tmp / PIPELINE_FILE).write_text(json.dumps(record, indent=2) + "\n")
  return folder


def _default_windows(resolution: int) -> WindowConfig:
  from etalk_jax.diffusion.sampling import WINDOWS_512, WINDOWS_1024  # noqa: PLC0415
  return WINDOWS_1024 if resolution >= 1024 else WINDOWS_512


def read_pipeline_record(folder: str | Path) -> dict[str, Any]:
  """pipeline.json of a checkpoint, with its format checked."""
  folder = Path(folder)
  path = folder / PIPELINE_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{folder} is not an etalk pipeline checkpoint; it has no "
                            f"{PIPELINE_FILE}. Give the folder save_pipeline (or training's "
                            "export) wrote.")
  try:
    record = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not valid JSON ({error}); the checkpoint is damaged.") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise ValueError(f"{folder} is not an etalk pipeline checkpoint; {PIPELINE_FILE} has no "
                     f"\"format\": \"{FORMAT}\".")
  if record.get("version") != VERSION:
    raise ValueError(f"{path} has version {record.get('version')!r}; this etalk-jax reads "
                     f"version {VERSION}.")
  missing = [key for key in ("resolution", "codec", "components", "audio_features", "sampler",
                             "windows") if key not in record]
  missing += [f"components.{name}" for name in COMPONENT_FOLDERS
              if name not in record.get("components", {})]
  if missing:
    raise ValueError(f"{path} lacks {', '.join(missing)}; the checkpoint is incomplete.")
  return record


def _config(cls, fields: dict, what: str):
  try:
    return cls(**fields)
  except TypeError as error:
    raise ValueError(f"pipeline.json's {what} is not understood ({error}).") from None


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


class EmotiveTalkPipeline:
  """Portrait + speech (+ emotion) -> talking-head video. Build with `load(folder)`."""

  def __init__(self, *, ethd, projector, dicte, encoders, audio_encoder, codebook, codec,
               resolution: int, feature_config=None, sampler: SamplerConfig = SamplerConfig(),
               windows: WindowConfig | None = None, dicte_steps: int | None = None,
               wavlm=None, ser=None, name: str = "the pipeline", devices=None):
    """devices: what ETHD's windows are split over (`sample_video`'s `devices`); None: every
    local device (one: no sharding)."""
    from etalk_jax.audio.features import AudioFeatures, FeatureConfig  # noqa: PLC0415
    from etalk_jax.vaid.data import VAIDFeaturizer  # noqa: PLC0415
    feature_config = FeatureConfig() if feature_config is None else feature_config
    self.audio_features = AudioFeatures(audio_encoder, feature_config)
    self.wavlm_features = None if wavlm is None else AudioFeatures(wavlm, feature_config)
    _raise_mismatches(f"{name} is", component_mismatches(
        ethd=ethd, projector=projector, dicte=dicte, encoders=encoders,
        audio_features=self.audio_features, codebook=codebook, codec=codec,
        resolution=resolution, ser=ser, wavlm_features=self.wavlm_features))
    self.name = name
    self.resolution = int(resolution)
    self.codec = codec
    self.codebook = codebook
    self.dicte = dicte
    self.ser = ser
    self.sampler = sampler
    self.windows = _default_windows(resolution) if windows is None else windows
    self.dicte_steps = dicte.config.sample_steps if dicte_steps is None else int(dicte_steps)
    self.expression_dim = encoders.config.expression_dim
    # The vision encoders' jitted, chunked encode (frames aligned as in training).
    self.vision = VAIDFeaturizer(self.audio_features, encoders)
    self.projector_graphdef, self.projector_state = nnx.split(projector)
    self.ethd_config = ethd.ethd_config  # its latent target: absolute or reference-relative
    self.denoiser, self.ethd_params = model_denoiser(ethd, call_ethd)
    self.devices = list(jax.local_devices() if devices is None else devices)
    sharding = window_sharding(self.devices)
    # The windows as the sampler runs them (more per group on several devices), so that the
    # projector pads to the sampler's bucket.
    self.sample_windows = windows_for_devices(self.windows, len(self.devices))
    if sharding is not None:
      # Replicated once here: sample_video's own placement is then a no-op, not a copy per call.
      self.ethd_params = jax.device_put(self.ethd_params,
                                        NamedSharding(sharding.mesh, PartitionSpec()))

  @classmethod
  def load(cls, folder: str | Path, compute: Compute = FP32, devices=None
           ) -> "EmotiveTalkPipeline":
    """A checkpoint folder written by `save_pipeline` -> the pipeline (mismatches raise one
    ValueError naming the components). compute: how every model computes (default fp32;
    `Compute.bf16()`: bf16 activations over the fp32 weights, the backend's best attention);
    devices: as the constructor's."""
    from etalk_jax.audio.features import FeatureConfig  # noqa: PLC0415
    from etalk_jax.audio.params import load_wav2vec2, load_wavlm  # noqa: PLC0415
    from etalk_jax.emotion.codebook import Codebook  # noqa: PLC0415
    from etalk_jax.ethd.model import load_ethd  # noqa: PLC0415
    from etalk_jax.svd.codec import codec_from_spec  # noqa: PLC0415
    from etalk_jax.vaid.storage import load_dicte, load_projector  # noqa: PLC0415
    from etalk_jax.vision.params import load_encoders  # noqa: PLC0415

    # Sampling keeps no residuals for a backward pass: a training Compute's remat would only
    # wrap every layer in a checkpoint (and nnx.remat does not nest in the sampler's lax.map).
    compute = dataclasses.replace(compute, remat="none")
    folder = Path(folder)
    record = read_pipeline_record(folder)
    parts = record["components"]
    path = lambda name: folder / parts[name]
    wavlm = ser = None
    if parts.get("wavlm") and parts.get("ser"):
      from etalk_jax.emotion.ser import load_ser  # noqa: PLC0415
      wavlm, ser = load_wavlm(path("wavlm"), compute), load_ser(path("ser"), compute)
    codec = codec_from_spec(record["codec"], folder, compute)  # a VAE loads from folder/vae
    feature_fields = dict(record["audio_features"])
    if "bucket_frames" in feature_fields:
      feature_fields["bucket_frames"] = tuple(feature_fields["bucket_frames"])
    return cls(
        ethd=load_ethd(path("ethd"), compute),
        projector=load_projector(path("projector"), compute),
        dicte=load_dicte(path("dicte"), compute), encoders=load_encoders(path("encoders"), compute),
        audio_encoder=load_wav2vec2(path("audio_encoder"), compute),
        codebook=Codebook.load(path("codebook")), codec=codec,
        resolution=int(record["resolution"]),
        feature_config=_config(FeatureConfig, feature_fields, "audio_features"),
        sampler=_config(SamplerConfig, record["sampler"], "sampler"),
        windows=_config(WindowConfig, record["windows"], "windows"),
        dicte_steps=record.get("dicte_steps"), wavlm=wavlm, ser=ser, name=str(folder),
        devices=devices)

  # ------------------------------------------------------------------------------ stages

  def encode_expressions(self, crops: np.ndarray, landmarks_px: np.ndarray) -> np.ndarray:
    """uint8 face crops (n, R, R, 3) and each crop's own landmarks (n, 478, 2) in its pixels ->
    e_v (n, expression_dim) through the encoders, each crop aligned as PD-FGC reads faces (the
    training crops, at the training resolution, as the targets Di-CTE learned were encoded)."""
    # float32 whatever the encoders compute in: later stages and Result hold fp32 arrays.
    return self.vision.encode_frames(crops, landmarks_px)[1].astype(np.float32)

  def project_lips(self, audio_windows: np.ndarray, frames: int) -> np.ndarray:
    """A_w (n, ...) -> l_a (n, lip_dim), run on the sampler bucket's frame count so that every
    length of one bucket reuses the projector's program."""
    buffer_frames = plan_windows(frames, self.sample_windows).buffer_frames
    padded = np.zeros((buffer_frames,) + audio_windows.shape[1:], np.float32)
    padded[:frames] = audio_windows
    return np.asarray(apply_model(self.projector_graphdef, self.projector_state,
                                  padded), np.float32)[:frames]

  def image_condition(self, emotion_image: Any, intensity: float) -> np.ndarray:
    """e_cond of a face photo: its e_v scaled from the codebook's neutral latent,
    e_neutral + intensity (e_image - e_neutral)."""
    image, name = read_image(emotion_image, "the emotion image")
    face = crop_face(image, detect_face(image, name), self.resolution)
    expression = self.encode_expressions(face.crop[None], face.landmarks[None])[0]
    neutral = self.codebook.latent("neutral")
    return (neutral + np.float32(intensity) * (expression - neutral)).astype(np.float32)

  def _check_speech_emotion_model(self) -> None:
    if self.ser is None or self.wavlm_features is None:
      raise ValueError(f"{self.name} has no speech-emotion model (wavlm/ and ser/); "
                       "--emotion-audio needs a checkpoint exported with them. Use --emotion "
                       "WORD or --emotion-text instead.")

  def keyword_from_speech(self, emotion_audio: Any) -> str:
    """Emotional speech -> keyword through WavLM and the speech-emotion head."""
    self._check_speech_emotion_model()
    from etalk_jax.emotion.ser import keyword_from_speech  # noqa: PLC0415
    keyword, _ = keyword_from_speech(self.ser, self.wavlm_features, emotion_audio)
    return keyword

  def video_expressions(self, emotion_video: Any, frames: int) -> np.ndarray:
    """e_v of every frame of a driving video's face crops, cut or stretched to `frames`."""
    from data_pipeline.faces import (  # noqa: PLC0415
        FaceLandmarker, clip_crop_box, crop_frame, to_crop_coordinates)
    from data_pipeline.media import iter_video_frames  # noqa: PLC0415
    path = Path(emotion_video)
    if not path.is_file():
      raise FileNotFoundError(f"the emotion video {path} does not exist; give an mp4 of a "
                              "talking face.")
    video, landmarks = [], []
    with FaceLandmarker() as landmarker:
      for frame in iter_video_frames(path):
        points = landmarker(frame)
        if points is not None:
          video.append(frame)
          landmarks.append(points)
    if not landmarks:
      raise ValueError(f"no face found in the emotion video {path}; use a video with one "
                       "clearly visible, frontal face")
    landmarks = np.stack(landmarks)
    box = clip_crop_box(landmarks)
    crops = np.stack([crop_frame(frame, box, self.resolution) for frame in video])
    crop_landmarks = to_crop_coordinates(landmarks, box) * self.resolution
    return resample_frames(self.encode_expressions(crops, crop_landmarks), frames)

  # ------------------------------------------------------------------------------ the call

  def __call__(self, portrait: Any, speech: Any, *, emotion: str | None = None,
               emotion_text: str | None = None, emotion_image: Any = None,
               emotion_video: Any = None, emotion_audio: Any = None, intensity: float = 1.0,
               steps: int | None = None, guidance: float | None = None, seed: int = 0,
               paste_back: bool = False, landmarks: np.ndarray | None = None,
               aligned: bool = False, progress: bool = True) -> Result:
    """Generates the talking-head video of `portrait` saying `speech`.

    portrait: image path or uint8 (H, W, 3); landmarks: its (478, 2) pixel landmarks (skips
    face detection). speech: audio path, `(samples, rate)` or 16 kHz float samples. At most one
    emotion source: a keyword, a text, an image, a driving video (its per-frame expressions
    drive the face directly) or emotional speech; none -> the portrait's own expression
    ("uncond."). intensity in [0, 1.5] scales a keyword or image condition from neutral.
    steps: ETHD Euler steps (default: pipeline.json's). guidance: classifier-free guidance on
    the speech, a constant scale (default: pipeline.json's sampler scales; 1 is off): each step
    also denoises with the lip latents zeroed, as training's condition dropout drops them, and
    moves the result `guidance` times as far from it (two ETHD calls per step). seed: the noise
    of both diffusions.
    aligned: the portrait already is a training crop at the pipeline's resolution (a frame of a
    prepared dataset) with `landmarks` in its pixels: used as it is, not re-cropped.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415
    from data_pipeline.faces import face_and_lip_masks  # noqa: PLC0415
    from etalk_jax.audio.features import normalize  # noqa: PLC0415
    from etalk_jax.svd.codec import reference_noise, to_uint8, to_unit_range  # noqa: PLC0415
    from etalk_jax.vaid.dicte import generate_expressions  # noqa: PLC0415

    sources = {name: value for name, value in zip(EMOTION_OPTIONS, (
        emotion, emotion_text, emotion_image, emotion_video, emotion_audio)) if value is not None}
    if len(sources) > 1:
      raise ValueError(f"give at most one emotion source; got {', '.join(sources)}.")
    try:
      intensity = float(intensity)
    except (TypeError, ValueError):
      intensity = float("nan")
    if not 0.0 <= intensity <= MAX_INTENSITY:
      raise ValueError(f"emotion intensity {intensity} is out of range; give a number from 0 "
                       f"(neutral) to 1 (the emotion's mean face) up to {MAX_INTENSITY}.")
    if steps is not None and int(steps) < 1:
      raise ValueError(f"steps must be at least 1, got {steps}.")
    sampler = self.sampler if steps is None else dataclasses.replace(self.sampler,
                                                                     steps=int(steps))
    if guidance is not None:
      if not float(guidance) >= 1.0:
        raise ValueError(f"guidance must be a number of at least 1 (1 switches it off), got "
                         f"{guidance}.")
      sampler = dataclasses.replace(sampler, min_guidance_scale=float(guidance),
                                    max_guidance_scale=float(guidance))
    # Word and text sources are checked before any model runs.
    keyword = None
    if emotion is not None or emotion_text is not None:
      from etalk_jax.emotion.keywords import check_keyword, keyword_from_text  # noqa: PLC0415
      keyword = check_keyword(emotion) if emotion is not None else keyword_from_text(
          emotion_text)
      self.codebook.latent(keyword)  # a codebook without this keyword says so now
    if emotion_audio is not None:
      self._check_speech_emotion_model()
    # sample_video runs every window and step in one compiled call, so no per-step bar is
    # possible: the bar advances per stage.
    stages = tqdm(total=4, desc="etalk", unit="stage", disable=not progress)
    try:
      stages.set_postfix_str("features")
      image, name = read_image(portrait)
      if landmarks is None:
        landmarks = detect_face(image, name)
      if aligned:
        if image.shape[:2] != (self.resolution, self.resolution):
          raise ValueError(f"an aligned portrait must be {self.resolution}x{self.resolution} "
                           f"(the pipeline's resolution); {name} is {image.shape[1]}x"
                           f"{image.shape[0]}. Pass aligned=False to crop it.")
        face = FaceCrop(image, np.array([0, 0, self.resolution, self.resolution], np.float64),
                        np.asarray(landmarks, np.float32))
      else:
        face = crop_face(image, landmarks, self.resolution)
      samples, what = read_speech(speech)
      frames = max(1, int(round(samples.shape[0] / SAMPLE_RATE * FPS)))
      audio_windows = np.asarray(self.audio_features.windows(normalize(samples), frames,
                                                             what=what), np.float32)
      lip_latents = self.project_lips(audio_windows, frames)
      reference_expression = self.encode_expressions(face.crop[None], face.landmarks[None])[0]
      face_mask, _ = face_and_lip_masks(face.landmarks, self.resolution)
      key = jax.random.key(seed)
      dicte_key, noise_key = jax.random.split(key)
      # SVD's conditioning: the frame noise-augmented as the added time ids say (the VAE; the
      # weight-free codecs encode it plainly). Its own stream of the seed, so the two
      # diffusions draw what they drew before.
      reference_latent = np.asarray(self.codec.encode_reference(
          face.crop[None], reference_noise(jax.random.fold_in(key, REFERENCE_NOISE_STREAM),
                                           face.crop[None]),
          self.ethd_config.noise_aug_strength), np.float32)
      stages.update()

      stages.set_postfix_str("expressions")
      used = None
      if emotion_video is not None:
        expressions, used = self.video_expressions(emotion_video, frames), "video"
      else:
        if emotion_audio is not None:
          keyword = self.keyword_from_speech(emotion_audio)
        if keyword is not None:
          condition, used = self.codebook.condition(keyword, intensity), keyword
        elif emotion_image is not None:
          condition, used = self.image_condition(emotion_image, intensity), "image"
        else:
          condition = reference_expression  # "uncond.": the portrait's own expression
        expressions = np.asarray(generate_expressions(
            self.dicte, dicte_key, jnp.asarray(audio_windows)[None],
            to_unit_range(face.crop)[None], jnp.asarray(condition, jnp.float32)[None],
            sample_steps=self.dicte_steps), np.float32)[0]
      stages.update()

      stages.set_postfix_str("denoising")
      latent_shape = reference_latent.shape[1:]
      noise = jax.random.normal(noise_key, (1, frames) + latent_shape, jnp.float32)
      frame_conditions = {"lip_latents": lip_latents[None],
                          "expression": expressions[None].astype(np.float32)}
      video_conditions = {"reference_latent": reference_latent,
                          "reference_expression": reference_expression[None],
                          "face_mask": face_mask[None].astype(np.float32)}
      without_speech = None  # guidance's unconditional branch: the lip latents zeroed
      if sampler.guided:
        without_speech = ({**frame_conditions, "lip_latents": np.zeros_like(lip_latents[None])},
                          video_conditions)
      latents = sample_video(self.denoiser, self.ethd_params, noise, frame_conditions,
                             video_conditions, sampler=sampler, windows=self.windows,
                             unconditional=without_speech, devices=self.devices)
      latents.block_until_ready()
      stages.update()

      stages.set_postfix_str("decoding")
      # float32 before the rounding to pixels: a bf16 VAE's output has 8 significant bits.
      video = to_uint8(self.codec.decode(self.ethd_config.from_target(
          latents[0], reference_latent)).astype(jnp.float32))
      if paste_back:
        video = paste_into_portrait(image, video, face.box)
      stages.update()
    finally:
      stages.close()
    return Result(frames=video, audio=samples, fps=FPS, expressions=expressions,
                  lip_latents=lip_latents, emotion=used)



# ----------------------------------------------------------------------------------------------
# `etalk sample`
# ----------------------------------------------------------------------------------------------


def sample_command(portrait: str, audio: str, out: str, checkpoint: str, *,
                   emotion: str | None = None, emotion_text: str | None = None,
                   emotion_image: str | None = None, emotion_video: str | None = None,
                   emotion_audio: str | None = None, intensity: float = 1.0,
                   steps: int | None = None, guidance: float | None = None,
                   resolution: int | None = None, seed: int = 0, paste_back: bool = False,
                   progress: bool = True, dtype: str | None = None, attention: str = "auto"
                   ) -> dict[str, Any]:
  """`etalk sample`: loads the checkpoint, generates, writes `out` atomically (nothing is left
  there on failure) and returns a summary {out, frames, seconds, generation_seconds, fps}.
  dtype: "float32" or "bfloat16" (bf16 compute over the fp32 weights); None: the backend's
  default (`default_dtype`). attention: a `Compute` attention implementation."""
  out_path = Path(out)
  if out_path.suffix.lower() != ".mp4":
    raise ValueError(f"--out {out}: the output is an H.264 mp4; give a path ending in .mp4.")
  if out_path.is_dir():
    raise IsADirectoryError(f"--out {out} is a folder; give a file path ending in .mp4.")
  record = read_pipeline_record(checkpoint)
  if resolution is not None and int(resolution) != int(record["resolution"]):
    raise ValueError(f"--resolution {resolution} does not match the checkpoint {checkpoint}, "
                     f"which generates {record['resolution']}x{record['resolution']}; pass "
                     f"--resolution {record['resolution']} or another checkpoint.")
  for label, path in (("--portrait", portrait), ("--audio", audio),
                      ("--emotion-image", emotion_image), ("--emotion-video", emotion_video),
                      ("--emotion-audio", emotion_audio)):
    if path is not None and not Path(path).is_file():
      raise FileNotFoundError(f"{label} {path} does not exist.")
  pipeline = EmotiveTalkPipeline.load(checkpoint, compute_for(dtype, attention))
  start = time.perf_counter()
  result = pipeline(portrait, audio, emotion=emotion, emotion_text=emotion_text,
                    emotion_image=emotion_image, emotion_video=emotion_video,
                    emotion_audio=emotion_audio, intensity=intensity, steps=steps,
                    guidance=guidance, seed=seed, paste_back=paste_back, progress=progress)
  generation_seconds = time.perf_counter() - start
  result.write(out_path)
  frames = result.frames.shape[0]
  return {"out": str(out_path), "frames": frames, "seconds": frames / result.fps,
          "generation_seconds": generation_seconds,
          "generation_fps": frames / max(generation_seconds, 1e-9), "emotion": result.emotion,
          "size": list(result.frames.shape[1:3]), "dtype": dtype or default_dtype(),
          "devices": len(pipeline.devices)}


def default_dtype() -> str:
  """`etalk sample`'s default compute dtype: bfloat16 on a GPU or TPU (their fast matmul type),
  float32 on the CPU (where bf16 is emulated and slower)."""
  return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def compute_for(dtype: str | None, attention: str = "auto") -> Compute:
  """The `Compute` of `etalk sample --dtype D --attention A`."""
  dtype = default_dtype() if dtype is None else dtype
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype} is not supported; give one of {', '.join(DTYPES)}.")
  if dtype == "bfloat16":
    return Compute.bf16(attention)
  return Compute(attention=attention)
