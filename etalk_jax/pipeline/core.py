"""Inference: portrait + speech (+ an emotion source) -> talking-head video
(docs/ARCHITECTURE.md §1).

`EmotiveTalkPipeline.load(folder)` reads a checkpoint (`checkpoint.py`: its format, and the check
that the components fit each other); calling it runs, as numbered steps of `__call__`:

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
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from data_pipeline import FPS, SAMPLE_RATE, media
from data_pipeline.faces import face_and_lip_masks
from etalk_jax.audio.features import AudioFeatures, FeatureConfig, normalize
from etalk_jax.diffusion.sampling import (
  SamplerConfig,
  WindowConfig,
  model_denoiser,
  plan_windows,
  sample_video,
  window_sharding,
  windows_for_devices,
)
from etalk_jax.emotion.codebook import MAX_INTENSITY
from etalk_jax.emotion.keywords import emotion_name, keyword_from_text, parse_emotion
from etalk_jax.emotion.ser import keyword_from_speech
from etalk_jax.errors import UserError
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.pipeline import inputs
from etalk_jax.pipeline.checkpoint import (
  component_mismatches,
  default_windows,
  load_components,
  raise_mismatches,
)
from etalk_jax.pipeline.inputs import FaceCrop
from etalk_jax.svd.codec import reference_noise, to_uint8, to_unit_range
from etalk_jax.vaid import dicte as dicte_module
from etalk_jax.vaid.data import VAIDFeaturizer

EMOTION_OPTIONS = ("emotion", "emotion_text", "emotion_image", "emotion_video", "emotion_audio")
REFERENCE_NOISE_STREAM = 2  # the reference's noise augmentation: fold_in(seed key, 2)
STAGES = ("features", "expressions", "denoising", "decoding")  # the progress bar's ticks


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
# Results and progress
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
    audio = np.round(np.clip(self.audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    media.write_video_file(path, self.frames, audio, fps=self.fps, sample_rate=SAMPLE_RATE)
    return Path(path)


def check_sampling_arguments(intensity: Any, steps: int | None, guidance: float | None) -> float:
  """The numeric arguments of a call (or of `etalk sample`, before anything loads) checked;
  returns the intensity as a float."""
  intensity = _as_float(intensity)
  if not 0.0 <= intensity <= MAX_INTENSITY:  # also rejects NaN
    raise UserError(f"emotion intensity {intensity} is out of range; give a number from 0 "
                    f"(neutral) to 1 (the emotion's mean face) up to {MAX_INTENSITY} "
                    "(--intensity).")
  if steps is not None and (not _is_integer(steps) or int(steps) < 1):
    raise UserError(f"steps must be at least 1, got {steps}; give a whole number of ETHD "
                    "sampling steps (--steps; default: the checkpoint's).")
  if guidance is not None and not _as_float(guidance) >= 1.0:  # also rejects NaN
    raise UserError(f"guidance must be a number of at least 1 (1 switches it off), got "
                    f"{guidance}.")
  return intensity


def _is_integer(value: Any) -> bool:
  """An int, or a number equal to one (2.0); not a bool or a string."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    return False
  return float(value).is_integer()


def _as_float(value: Any) -> float:
  """value as a float; NaN when it is not a number (so that the range checks refuse it)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return float("nan")


class StageProgress:
  """The call's progress bar, one tick per stage of STAGES: `sample_video` runs every window and
  step in one compiled call, so no per-step bar is possible."""

  def __init__(self, enabled: bool):
    self._bar = tqdm(total=len(STAGES), desc="etalk", unit="stage", disable=not enabled)
    self._running = False

  def begin(self, stage: str) -> None:
    """Ticks off the stage that ran (if any) and shows `stage`."""
    if self._running:
      self._bar.update()
    self._bar.set_postfix_str(stage)
    self._running = True

  def __enter__(self) -> "StageProgress":
    return self

  def __exit__(self, error_type, *_) -> None:
    if error_type is None and self._running:
      self._bar.update()
    self._bar.close()


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
    feature_config = FeatureConfig() if feature_config is None else feature_config
    self.audio_features = AudioFeatures(audio_encoder, feature_config)
    self.wavlm_features = None if wavlm is None else AudioFeatures(wavlm, feature_config)
    raise_mismatches(f"{name} is", component_mismatches(
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
    self.windows = default_windows(resolution) if windows is None else windows
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
    UserError naming the components). compute: how every model computes (default fp32;
    `Compute.bf16()`: bf16 activations over the fp32 weights, the backend's best attention);
    devices: as the constructor's."""
    # Sampling keeps no residuals for a backward pass: a training Compute's remat would only
    # wrap every layer in a checkpoint (and nnx.remat does not nest in the sampler's lax.map).
    compute = dataclasses.replace(compute, remat="none")
    return cls(**load_components(folder, compute), devices=devices)

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
    emotion source: a keyword (or a blend of keywords, "happy:0.7,surprised:0.3", weights
    normalised to sum 1), a text, an image, a driving video (its per-frame expressions drive
    the face directly) or emotional speech; none -> the portrait's own expression ("uncond.").
    intensity in [0, 1.5] scales a keyword's, a blend's or an image's condition from neutral.
    steps: ETHD Euler steps (default: pipeline.json's). guidance: classifier-free guidance on
    the speech, a constant scale (default: pipeline.json's sampler scales; 1 is off): each step
    also denoises with the lip latents zeroed, as training's condition dropout drops them, and
    moves the result `guidance` times as far from it (two ETHD calls per step). seed: the noise
    of both diffusions.
    aligned: the portrait already is a training crop at the pipeline's resolution (a frame of a
    prepared dataset) with `landmarks` in its pixels: used as it is, not re-cropped.
    """
    # 1. Check the arguments, and the word or text emotion, before any model runs.
    sampler, keyword, intensity = self.check_inputs(
        emotion=emotion, emotion_text=emotion_text, emotion_image=emotion_image,
        emotion_video=emotion_video, emotion_audio=emotion_audio, intensity=intensity,
        steps=steps, guidance=guidance)
    # The seed's streams: Di-CTE's and ETHD's noise, and (its own stream, so that the two
    # diffusions draw what they drew before) the reference frame's noise augmentation.
    key = jax.random.key(seed)
    dicte_key, noise_key = jax.random.split(key)
    reference_key = jax.random.fold_in(key, REFERENCE_NOISE_STREAM)
    with StageProgress(progress) as stages:
      stages.begin("features")
      # 2. The portrait's face crop.
      image, face = self.prepare_portrait(portrait, landmarks, aligned)
      # 3. The speech: A_w, and l_a through the projector.
      samples, audio_windows, lip_latents = self.encode_speech(speech)
      frames = lip_latents.shape[0]
      # 4. The reference: e_ref, the face mask and z_ref.
      reference = self.encode_reference(face, reference_key)

      stages.begin("expressions")
      # 5. The expressions e_dri: a driving video's own, or Di-CTE's from the speech and the
      #    emotion condition (the portrait's own e_ref when no source is given).
      if emotion_video is not None:
        expressions, used = self.video_expressions(emotion_video, frames), "video"
      else:
        condition, used = self.encode_emotion(
            keyword, emotion_image, emotion_audio, intensity,
            reference["reference_expression"][0])
        expressions = self.generate_expressions(dicte_key, audio_windows, face, condition)

      stages.begin("denoising")
      # 6. The initial noise, and ETHD's sampling of the latents from it.
      noise = self.prepare_latents(noise_key, frames, reference["reference_latent"].shape[1:])
      latents = self.denoise(noise, lip_latents, expressions, reference, sampler)

      stages.begin("decoding")
      # 7. The latents decoded to frames, pasted into the portrait if asked.
      video = self.decode_latents(latents, reference["reference_latent"])
      if paste_back:
        video = inputs.paste_into_portrait(image, video, face.box)
    return Result(frames=video, audio=samples, fps=FPS, expressions=expressions,
                  lip_latents=lip_latents, emotion=used)

  # ------------------------------------------------------------------------------ the steps

  def check_inputs(self, *, emotion: str | None, emotion_text: str | None, emotion_image: Any,
                   emotion_video: Any, emotion_audio: Any, intensity: Any, steps: int | None,
                   guidance: float | None) -> tuple[SamplerConfig, str | None, float]:
    """The call's arguments checked -> (the sampler with `steps` and `guidance` applied, the
    keyword of a word or text emotion or None, the intensity as a float). A word or text is
    resolved here, so that a codebook without its keyword says so before any model runs."""
    sources = {name: value for name, value in zip(EMOTION_OPTIONS, (
        emotion, emotion_text, emotion_image, emotion_video, emotion_audio)) if value is not None}
    if len(sources) > 1:
      raise UserError(f"give at most one emotion source; got {', '.join(sources)}.")
    intensity = check_sampling_arguments(intensity, steps, guidance)
    sampler = self.sampler if steps is None else dataclasses.replace(self.sampler,
                                                                     steps=int(steps))
    if guidance is not None:
      sampler = dataclasses.replace(sampler, min_guidance_scale=float(guidance),
                                    max_guidance_scale=float(guidance))
    keyword = None
    if emotion is not None:  # a keyword, or a blend "happy:0.7,surprised:0.3"
      parts = parse_emotion(emotion)
      keyword = emotion_name(parts)
      for name, _ in parts:
        self.codebook.latent(name)  # a codebook without this keyword says so now
    elif emotion_text is not None:
      keyword = keyword_from_text(emotion_text)
      self.codebook.latent(keyword)
    if emotion_audio is not None:
      self._check_speech_emotion_model()
    return sampler, keyword, intensity

  def prepare_portrait(self, portrait: Any, landmarks: np.ndarray | None, aligned: bool
                       ) -> tuple[np.ndarray, FaceCrop]:
    """The portrait as read (uint8 (H, W, 3)) and its face crop at the pipeline's resolution:
    the training crop around its landmarks (detected when not given), or the image itself when
    `aligned`."""
    image, name = inputs.read_image(portrait)
    if landmarks is None:
      landmarks = inputs.detect_face(image, name)
    if aligned:
      return image, inputs.aligned_face(image, landmarks, self.resolution, name)
    return image, inputs.crop_face(image, landmarks, self.resolution)

  def encode_speech(self, speech: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The speech -> (its 16 kHz samples, A_w (frames, ...) wav2vec2 windows, l_a
    (frames, lip_dim)), one frame per 1/25 s."""
    samples, what = inputs.read_speech(speech)
    frames = max(1, int(round(samples.shape[0] / SAMPLE_RATE * FPS)))
    audio_windows = np.asarray(self.audio_features.windows(normalize(samples), frames,
                                                           what=what), np.float32)
    return samples, audio_windows, self.project_lips(audio_windows, frames)

  def encode_reference(self, face: FaceCrop, reference_key: jax.Array) -> dict[str, np.ndarray]:
    """ETHD's video conditions of the portrait's crop, each with a batch axis of 1:
    `reference_latent` z_ref (SVD's conditioning: the frame noise-augmented as the added time
    ids say, for the VAE; the weight-free codecs encode it plainly), `reference_expression`
    e_ref and `face_mask`."""
    reference_expression = self.encode_expressions(face.crop[None], face.landmarks[None])[0]
    face_mask, _ = face_and_lip_masks(face.landmarks, self.resolution)
    reference_latent = np.asarray(self.codec.encode_reference(
        face.crop[None], reference_noise(reference_key, face.crop[None]),
        self.ethd_config.noise_aug_strength), np.float32)
    return {"reference_latent": reference_latent,
            "reference_expression": reference_expression[None],
            "face_mask": face_mask[None].astype(np.float32)}

  def encode_emotion(self, keyword: str | None, emotion_image: Any, emotion_audio: Any,
                     intensity: float, reference_expression: np.ndarray
                     ) -> tuple[np.ndarray, str | None]:
    """Di-CTE's condition e_cond (expression_dim,) and the name of its source: a keyword's
    (given, or from emotional speech) or an image's, scaled by `intensity` from neutral; with
    no source the portrait's own e_ref ("uncond.", name None)."""
    if emotion_audio is not None:
      keyword = self.keyword_from_speech(emotion_audio)
    if keyword is not None:
      return self.codebook.condition(keyword, intensity), keyword
    if emotion_image is not None:
      return self.image_condition(emotion_image, intensity), "image"
    return reference_expression, None

  def generate_expressions(self, dicte_key: jax.Array, audio_windows: np.ndarray,
                           face: FaceCrop, condition: np.ndarray) -> np.ndarray:
    """e_a (frames, expression_dim): Di-CTE's expressions for the speech, the portrait's crop
    and the emotion condition."""
    return np.asarray(dicte_module.generate_expressions(
        self.dicte, dicte_key, jnp.asarray(audio_windows)[None],
        to_unit_range(face.crop)[None], jnp.asarray(condition, jnp.float32)[None],
        sample_steps=self.dicte_steps), np.float32)[0]

  def prepare_latents(self, noise_key: jax.Array, frames: int,
                      latent_shape: tuple[int, ...]) -> jax.Array:
    """ETHD's initial noise (1, frames, h, w, c) at unit scale."""
    return jax.random.normal(noise_key, (1, frames) + tuple(latent_shape), jnp.float32)

  def denoise(self, noise: jax.Array, lip_latents: np.ndarray, expressions: np.ndarray,
              reference: dict[str, np.ndarray], sampler: SamplerConfig) -> jax.Array:
    """ETHD's overlapping-window sampling from `noise` driven by l_a and e_dri, with the
    reference's video conditions -> latents (1, frames, h, w, c). With guidance, the
    unconditional branch has the lip latents zeroed."""
    frame_conditions = {"lip_latents": lip_latents[None],
                        "expression": expressions[None].astype(np.float32)}
    without_speech = None
    if sampler.guided:
      without_speech = ({**frame_conditions, "lip_latents": np.zeros_like(lip_latents[None])},
                        reference)
    latents = sample_video(self.denoiser, self.ethd_params, noise, frame_conditions, reference,
                           sampler=sampler, windows=self.windows, unconditional=without_speech,
                           devices=self.devices)
    return latents.block_until_ready()

  def decode_latents(self, latents: jax.Array, reference_latent: np.ndarray) -> np.ndarray:
    """ETHD's latents (1, frames, h, w, c) -> uint8 frames (frames, R, R, 3)."""
    # float32 before the rounding to pixels: a bf16 VAE's output has 8 significant bits.
    return to_uint8(self.codec.decode(self.ethd_config.from_target(
        latents[0], reference_latent)).astype(jnp.float32))

  # ------------------------------------------------------------------------------ the models

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
    image, name = inputs.read_image(emotion_image, "the emotion image")
    face = inputs.crop_face(image, inputs.detect_face(image, name), self.resolution)
    expression = self.encode_expressions(face.crop[None], face.landmarks[None])[0]
    neutral = self.codebook.latent("neutral")
    return (neutral + np.float32(intensity) * (expression - neutral)).astype(np.float32)

  def _check_speech_emotion_model(self) -> None:
    if self.ser is None or self.wavlm_features is None:
      raise UserError(f"{self.name} has no speech-emotion model (wavlm/ and ser/); "
                      "--emotion-audio needs a checkpoint exported with them. Use --emotion "
                      "WORD or --emotion-text instead.")

  def keyword_from_speech(self, emotion_audio: Any) -> str:
    """Emotional speech -> keyword through WavLM and the speech-emotion head."""
    self._check_speech_emotion_model()
    keyword, _ = keyword_from_speech(self.ser, self.wavlm_features, emotion_audio)
    return keyword

  def video_expressions(self, emotion_video: Any, frames: int) -> np.ndarray:
    """e_v of every frame of a driving video's face crops, cut or stretched to `frames`."""
    crops, crop_landmarks = inputs.video_face_crops(emotion_video, self.resolution)
    return inputs.resample_frames(self.encode_expressions(crops, crop_landmarks), frames)
