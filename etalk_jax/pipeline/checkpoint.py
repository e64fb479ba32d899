"""The pipeline checkpoint format: one folder with `pipeline.json` at its root naming every
component's sub-folder (each in its own format, written by that component's save function):

  {"format": "etalk_pipeline", "version": 1, "resolution": R, "codec": codec.spec(),
   "components": {"ethd": "ethd", "projector": "projector", "dicte": "dicte",
                  "encoders": "encoders", "audio_encoder": "wav2vec2",
                  "codebook": "codebook.json", optional "wavlm", "ser", "vae"},
   "audio_features": FeatureConfig fields, "sampler": SamplerConfig fields,
   "windows": WindowConfig fields, "dicte_steps": Di-CTE's DDIM steps}

`save_pipeline` writes one atomically; `load_components` reads one back as the pipeline's
constructor arguments. Components that do not fit each other (sizes of latents, lip and
expression codes, audio features) are refused on both sides, before anything is written or runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from etalk_jax.audio import params as audio_params
from etalk_jax.audio.features import AudioFeatures, FeatureConfig
from etalk_jax.codecs import codec_from_spec
from etalk_jax.diffusion.sampling import WINDOWS_512, WINDOWS_1024, SamplerConfig, WindowConfig
from etalk_jax.emotion.codebook import Codebook
from etalk_jax.emotion.ser import load_ser, save_ser
from etalk_jax.errors import UserError
from etalk_jax.ethd.model import load_ethd, save_ethd
from etalk_jax.layers.compute import FP32, Compute
from etalk_jax.records import read_record
from etalk_jax.svd import params as svd_params
from etalk_jax.svd.codec import VAECodec
from etalk_jax.vaid.storage import load_dicte, load_projector, save_vaid_model
from etalk_jax.vision.params import load_encoders, save_encoders
from etalk_jax.weights import atomic_folder

FORMAT = "etalk_pipeline"
VERSION = 1
PIPELINE_FILE = "pipeline.json"
COMPONENT_FOLDERS = {"ethd": "ethd", "projector": "projector", "dicte": "dicte",
                     "encoders": "encoders", "audio_encoder": "wav2vec2",
                     "codebook": "codebook.json"}
OPTIONAL_FOLDERS = {"wavlm": "wavlm", "ser": "ser", "vae": "vae"}
REQUIRED_FIELDS = ("resolution", "codec", "components", "audio_features", "sampler", "windows")
MISMATCH = "a checkpoint that does not match the config"


# ----------------------------------------------------------------------------------------------
# Consistency of the components
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


def raise_mismatches(subject: str, problems: list[str]) -> None:
  """One UserError listing every mismatch: "<subject> a checkpoint that does not match..."."""
  if problems:
    raise UserError(f"{subject} {MISMATCH}: " + "; ".join(problems) + ". Export components "
                    "trained together (the same encoders, audio encoder and sizes).")


def default_windows(resolution: int) -> WindowConfig:
  """ETHD's sampling windows for a resolution when pipeline.json names none."""
  return WINDOWS_1024 if resolution >= 1024 else WINDOWS_512


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
  feature_config = FeatureConfig() if feature_config is None else feature_config
  windows = default_windows(resolution) if windows is None else windows
  if (ser is None) != (wavlm is None):
    raise UserError("save_pipeline: emotional-speech control needs both `wavlm` and `ser`; "
                    "give both or neither.")
  raise_mismatches("save_pipeline: these components would make", component_mismatches(
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
      components.update(wavlm=OPTIONAL_FOLDERS["wavlm"], ser=OPTIONAL_FOLDERS["ser"])
      audio_params.save_speech_encoder(wavlm, tmp / components["wavlm"])
      save_ser(ser, tmp / components["ser"])
    if isinstance(codec, VAECodec):
      components["vae"] = OPTIONAL_FOLDERS["vae"]
      svd_params.save_svd_model(codec.vae, tmp / components["vae"])
    record = {
        "format": FORMAT, "version": VERSION, "resolution": int(resolution),
        "codec": codec.spec(), "components": components,
        "audio_features": dataclasses.asdict(feature_config),
        "sampler": dataclasses.asdict(sampler), "windows": dataclasses.asdict(windows),
        "dicte_steps": int(dicte.config.sample_steps if dicte_steps is None else dicte_steps)}
    (tmp / PIPELINE_FILE).write_text(json.dumps(record, indent=2) + "\n")
  return folder


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def read_pipeline_record(folder: str | Path) -> dict[str, Any]:
  """pipeline.json of a checkpoint, with its format checked."""
  path = Path(folder) / PIPELINE_FILE
  fix = ("Give the folder save_pipeline of this etalk-jax wrote (`etalk demo` writes one at "
         "demo_out/checkpoint); one of another version needs the etalk-jax that wrote it.")
  record = read_record(path, format=FORMAT, version=VERSION,
                       what="an etalk pipeline checkpoint", fix=fix, required=REQUIRED_FIELDS)
  missing = [f"components.{name}" for name in COMPONENT_FOLDERS
             if name not in record["components"]]
  if missing:
    raise UserError(f"{path} lacks {', '.join(missing)}; the checkpoint is incomplete.")
  return record


def _config(cls, fields: dict, what: str):
  try:
    return cls(**fields)
  except TypeError as error:
    raise UserError(f"pipeline.json's {what} is not understood ({error}).") from None


def load_components(folder: str | Path, compute: Compute = FP32) -> dict[str, Any]:
  """A checkpoint folder written by `save_pipeline` -> `EmotiveTalkPipeline`'s constructor
  arguments: every component loaded to compute as `compute` says, and the settings."""
  folder = Path(folder)
  record = read_pipeline_record(folder)
  parts = record["components"]
  path = lambda name: folder / parts[name]
  wavlm = ser = None
  if parts.get("wavlm") and parts.get("ser"):
    wavlm, ser = audio_params.load_wavlm(path("wavlm"), compute), load_ser(path("ser"), compute)
  codec = codec_from_spec(record["codec"], folder, compute)  # a VAE loads from folder/vae
  feature_fields = dict(record["audio_features"])
  if "bucket_frames" in feature_fields:
    feature_fields["bucket_frames"] = tuple(feature_fields["bucket_frames"])
  return dict(
      ethd=load_ethd(path("ethd"), compute),
      projector=load_projector(path("projector"), compute),
      dicte=load_dicte(path("dicte"), compute), encoders=load_encoders(path("encoders"), compute),
      audio_encoder=audio_params.load_wav2vec2(path("audio_encoder"), compute),
      codebook=Codebook.load(path("codebook")), codec=codec,
      resolution=int(record["resolution"]),
      feature_config=_config(FeatureConfig, feature_fields, "audio_features"),
      sampler=_config(SamplerConfig, record["sampler"], "sampler"),
      windows=_config(WindowConfig, record["windows"], "windows"),
      dicte_steps=record.get("dicte_steps"), wavlm=wavlm, ser=ser, name=str(folder))
