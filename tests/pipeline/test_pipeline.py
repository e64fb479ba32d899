"""The inference pipeline and `etalk sample` on a tiny random checkpoint (docs/ARCHITECTURE.md §1).

One module-scoped checkpoint of tiny random components (one-level ETHD on 16x16x48 pixel-shuffle
latents of 64 px crops, tiny projector / Di-CTE / wav2vec2, PD-FGC small, a random 8-keyword
codebook) is saved with `save_pipeline` and loaded back; a synthetic portrait with its known
landmarks (no MediaPipe) and its speech drive it. Checked: shapes and dtypes, the mp4, seed
determinism, emotion keyword vs none, the errors users meet, the CLI, and that a second length
in the same window bucket compiles no new ETHD sampler.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_pipeline import EMOTIONS, faces, synthetic
from data_pipeline.media import probe, write_audio_file, write_video_file
from etalk_jax import cli, model_io, pipeline as pipeline_module
from etalk_jax.audio import Wav2Vec2, WavLM, WavLMConfig
from etalk_jax.codecs import PixelShuffleCodec
from etalk_jax.diffusion import sampling
from etalk_jax.diffusion.sampling import SamplerConfig, WindowConfig
from etalk_jax.emotion.codebook import Codebook
from etalk_jax.emotion.ser import SERConfig, SpeechEmotionHead
from etalk_jax.ethd import ETHD, ETHDConfig
from etalk_jax.layers.compute import Compute
from etalk_jax.pipeline import (
  EmotiveTalkPipeline,
  command as sample_module,
  inputs as pipeline_inputs,
  save_pipeline,
)
from etalk_jax.vaid import dicte as dicte_module
from etalk_jax.vaid.dicte import DiCTE, DiCTEConfig
from etalk_jax.vaid.projector import AudioLipProjector, ProjectorConfig
from etalk_jax.vaid.storage import save_vaid_model
from etalk_jax.vision.alignment import pdfgc_inputs
from etalk_jax.vision.params import load_encoders
from etalk_jax.vision.pdfgc import PDFGC_SMALL, AdaptedPDFGC
from tests.ethd.test_training import TINY_UNET
from tests.vaid.test_learning import TINY_FEATURES, TINY_WAV2VEC2

RESOLUTION = 64
CODEC = PixelShuffleCodec(4)  # 64 px -> 16 x 16 x 48
# Two 16-frame windows cover 17..28 frames: 1 s (25 frames) and 0.8 s (20) share one bucket.
WINDOWS = WindowConfig(frames=16, overlap=4, min_window_groups=2)
STEPS = 2


def random_model(build, seed: int) -> nnx.Module:
  """`build(rngs)` with weights drawn by NumPy: nnx's eager initialisers compile one program per
  shape (about a minute for these five models on a shared 2-core machine). Every weight is
  random, including layers the real initialisers zero (Di-CTE's AdaLN-zero modulation, ETHD's
  EDI output, the encoders' adapters), so each condition reaches the output; norm scales and
  BatchNorm variances are positive, BatchNorm means 0."""
  graphdef, state = nnx.split(model_io.abstract(build))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-2], "key", path[-2]))
    if not np.issubdtype(leaf.dtype, np.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    if name == "mean":
      return np.zeros(leaf.shape, leaf.dtype)
    if name in ("var", "scale", "weight_g"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def tiny_components(lip_dim: int = PDFGC_SMALL.feature_dim) -> dict:
  unet = dataclasses.replace(TINY_UNET, sample_size=16, in_channels=2 * CODEC.latent_channels,
                             out_channels=CODEC.latent_channels, num_frames=WINDOWS.frames)
  ethd_config = ETHDConfig(unet=unet, lip_dim=PDFGC_SMALL.feature_dim,
                           expression_dim=PDFGC_SMALL.expression_dim)
  projector_config = dataclasses.replace(ProjectorConfig.tiny(), output_dim=lip_dim)
  dicte_config = dataclasses.replace(DiCTEConfig.tiny(), window_frames=24, prefix_frames=4,
                                     sample_steps=2)
  rng = np.random.default_rng(0)
  return dict(
      ethd=random_model(lambda rngs: ETHD(ethd_config, rngs=rngs), 0),
      projector=random_model(lambda rngs: AudioLipProjector(projector_config, rngs=rngs), 1),
      dicte=random_model(lambda rngs: DiCTE(dicte_config, rngs=rngs), 2),
      encoders=random_model(lambda rngs: AdaptedPDFGC(PDFGC_SMALL, rngs=rngs), 3),
      audio_encoder=random_model(lambda rngs: Wav2Vec2(TINY_WAV2VEC2, rngs=rngs), 4),
      codebook=Codebook(EMOTIONS, rng.normal(size=(len(EMOTIONS), 30)).astype(np.float32),
                        np.ones(len(EMOTIONS), np.int64)),
      codec=CODEC, resolution=RESOLUTION, feature_config=TINY_FEATURES,
      sampler=SamplerConfig(steps=STEPS), windows=WINDOWS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return save_pipeline(tmp_path_factory.mktemp("pipeline") / "ckpt", **tiny_components())


@pytest.fixture(scope="module")
def pipe(checkpoint):
  return EmotiveTalkPipeline.load(checkpoint)


@pytest.fixture(scope="module")
def portrait(tmp_path_factory):
  """(portrait frame, pixel landmarks, speech wav path, speech samples) of a synthetic clip."""
  clip = synthetic.make_clip(synthetic.make_identity(0), "neutral", 1, num_frames=25,
                             resolution=RESOLUTION)
  wav = tmp_path_factory.mktemp("speech") / "speech.wav"
  write_audio_file(wav, clip.audio)
  return clip.frames[0], clip.landmarks[0] * RESOLUTION, wav, clip.audio.astype(np.float32) / 32768


@pytest.fixture(scope="module")
def neutral(pipe, portrait):
  frame, landmarks, wav, _ = portrait
  return pipe(frame, wav, landmarks=landmarks, seed=0, progress=False)


def test_outputs_have_the_video_shapes_and_write_an_mp4(neutral, pipe, tmp_path):
  frames = neutral.frames
  assert frames.dtype == np.uint8 and frames.shape == (25, RESOLUTION, RESOLUTION, 3)
  assert neutral.expressions.shape == (25, 30) and neutral.lip_latents.shape == (25, 32)
  assert neutral.fps == 25 and neutral.emotion is None and neutral.audio.dtype == np.float32
  out = neutral.write(tmp_path / "out.mp4")
  info = probe(out)
  assert (info.width, info.height, info.has_audio) == (RESOLUTION, RESOLUTION, True)
  assert abs(info.duration - 1.0) < 0.1


def test_same_seed_same_video_and_an_emotion_changes_the_expressions(neutral, pipe, portrait):
  frame, landmarks, wav, _ = portrait
  again = pipe(frame, wav, landmarks=landmarks, seed=0, progress=False)
  np.testing.assert_array_equal(again.frames, neutral.frames)
  happy = pipe(frame, wav, landmarks=landmarks, seed=0, emotion="Happy", progress=False)
  assert happy.emotion == "happy"
  assert np.abs(happy.expressions - neutral.expressions).max() > 1e-3
  np.testing.assert_array_equal(happy.lip_latents, neutral.lip_latents)


def test_text_and_image_sources(pipe, portrait, monkeypatch):
  frame, landmarks, _, samples = portrait
  speech = samples[:int(0.8 * 16000)]
  from_text = pipe(frame, speech, landmarks=landmarks, emotion_text="she is not happy at all, "
                   "rather furious", progress=False)
  assert from_text.emotion == "angry"
  monkeypatch.setattr(pipeline_inputs, "detect_face", lambda image, name: landmarks)
  from_image = pipe(frame, speech, landmarks=landmarks, emotion_image=frame, intensity=0.5,
                    progress=False)
  assert from_image.emotion == "image" and from_image.frames.shape == (20, 64, 64, 3)


def test_expressions_are_pd_fgcs_on_the_aligned_crops(checkpoint, pipe, portrait, monkeypatch):
  """e_ref of the portrait and e_v of an emotion image are the encoders' outputs on PD-FGC's
  aligned crop of the training crop (`pdfgc_inputs` on its landmarks), as in training."""
  frame, landmarks, _, samples = portrait
  face = pipeline_module.crop_face(frame, landmarks, RESOLUTION)
  parts = pipeline_module.read_pipeline_record(checkpoint)["components"]
  encoders = load_encoders(checkpoint / parts["encoders"])
  aligned = pdfgc_inputs(face.crop[None], face.landmarks[None], PDFGC_SMALL.image_size)
  want = np.asarray(nnx.jit(lambda model, images: model(images).expression)(encoders, aligned))[0]
  close = lambda got: np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
  # The image source at intensity 1 is its e_v itself.
  monkeypatch.setattr(pipeline_inputs, "detect_face", lambda image, name: landmarks)
  close(pipe.image_condition(frame, 1.0))
  # No emotion source: Di-CTE's condition is the portrait's e_ref.
  seen, generate = {}, dicte_module.generate_expressions

  def spy(model, key, audio_windows, reference, condition, **options):
    seen["condition"] = np.asarray(condition)[0]
    return generate(model, key, audio_windows, reference, condition, **options)

  monkeypatch.setattr(dicte_module, "generate_expressions", spy)
  pipe(frame, samples[:int(0.8 * 16000)], landmarks=landmarks, progress=False)
  close(seen["condition"])


class FakeLandmarker:
  """Stands in for MediaPipe on synthetic faces: the same known landmarks for every frame."""

  def __init__(self, landmarks):
    self.landmarks, self.faces_seen_max = landmarks, 1

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return None

  def __call__(self, frame):
    return self.landmarks


def test_driving_video_expressions_drive_the_face_directly(pipe, portrait, monkeypatch,
                                                          tmp_path):
  frame, landmarks, _, samples = portrait
  clip = synthetic.make_clip(synthetic.make_identity(1), "happy", 3, num_frames=13,
                             resolution=RESOLUTION)
  video = tmp_path / "driving.mp4"
  write_video_file(video, clip.frames)
  monkeypatch.setattr(faces, "FaceLandmarker", lambda: FakeLandmarker(landmarks))
  result = pipe(frame, samples[:int(0.8 * 16000)], landmarks=landmarks, emotion_video=video,
                progress=False)
  assert result.emotion == "video" and result.expressions.shape == (20, 30)
  # 13 video frames stretched over 20 speech frames: some expressions are held twice.
  assert len(np.unique(result.expressions[:, 0])) <= 13


def test_emotional_speech_picks_a_keyword(checkpoint, portrait, tmp_path):
  frame, landmarks, wav, samples = portrait
  wavlm_config = WavLMConfig(**{f.name: getattr(TINY_WAV2VEC2, f.name)
                                for f in dataclasses.fields(TINY_WAV2VEC2)})
  components = tiny_components()
  # A head whose answer is known by construction: zero output weights and a bias that favours
  # "fearful" (not the first keyword, so an index bug or a default shows), whatever WavLM says.
  ser = random_model(lambda rngs: SpeechEmotionHead(SERConfig.tiny(), rngs=rngs), 6)
  ser.classifier_out.kernel[...] = jnp.zeros_like(ser.classifier_out.kernel[...])
  ser.classifier_out.bias[...] = 5.0 * jax.nn.one_hot(EMOTIONS.index("fearful"), len(EMOTIONS))
  components.update(wavlm=random_model(lambda rngs: WavLM(wavlm_config, rngs=rngs), 5), ser=ser)
  with_ser = EmotiveTalkPipeline.load(save_pipeline(tmp_path / "ser", **components))
  speech = samples[:int(0.8 * 16000)]
  result = with_ser(frame, speech, landmarks=landmarks, emotion_audio=wav, progress=False)
  assert result.emotion == "fearful"
  # The keyword drives the expressions exactly as `emotion="fearful"` does.
  keyword = with_ser(frame, speech, landmarks=landmarks, emotion="fearful", progress=False)
  np.testing.assert_array_equal(result.expressions, keyword.expressions)


def test_another_length_in_the_same_bucket_compiles_no_new_sampler(neutral, pipe, portrait):
  frame, landmarks, _, samples = portrait
  compiled = sampling._sample_windows._cache_size()
  shorter = pipe(frame, samples[:int(0.8 * 16000)], landmarks=landmarks, progress=False)
  assert shorter.frames.shape[0] == 20
  assert sampling._sample_windows._cache_size() == compiled


def test_reference_relative_ethd_adds_the_portrait_back(portrait):
  """An ETHD denoising reference-relative latents that predicts no motion (a zero output layer:
  the sampler shrinks the noise to ~0) gives the portrait's crop in every frame, not the codec's
  decoding of zero latents."""
  frame, landmarks, _, samples = portrait
  components = tiny_components()
  ethd = components["ethd"]
  ethd.ethd_config = dataclasses.replace(ethd.ethd_config, latent_target="reference_relative",
                                         target_scale=3.0)
  for variable in (ethd.conv_out.kernel, ethd.conv_out.bias):
    variable.set_value(np.zeros(variable.shape, np.float32))
  relative = EmotiveTalkPipeline(**components)
  result = relative(frame, samples[:int(0.8 * 16000)], landmarks=landmarks, progress=False)
  crop = pipeline_module.crop_face(frame, landmarks, RESOLUTION).crop
  difference = np.abs(result.frames.astype(np.int16) - crop[None].astype(np.int16))
  assert difference.max() <= 1


def test_speech_guidance_contrasts_with_zeroed_lip_latents_only(pipe, portrait, monkeypatch):
  """Guidance's unconditional branch differs from the conditional one in the lip latents alone:
  with l_a zero already, guided sampling gives the unguided video; with speech it changes it."""
  frame, landmarks, _, samples = portrait
  speech = samples[:int(0.8 * 16000)]
  run = lambda **kw: pipe(frame, speech, landmarks=landmarks, seed=0, progress=False, **kw)
  with pytest.raises(ValueError, match="guidance must be"):
    run(guidance=0.5)
  spoken = run().frames
  assert np.abs(run(guidance=3.0).frames.astype(np.int16) - spoken).max() > 8
  real_projection = pipe.project_lips
  monkeypatch.setattr(pipe, "project_lips", lambda *a: np.zeros_like(real_projection(*a)))
  silent = run().frames
  assert np.abs(run(guidance=3.0).frames.astype(np.int16) - silent).max() <= 1


def test_paste_back_gives_the_portrait_frame_size(pipe, portrait):
  frame, landmarks, _, samples = portrait
  big = np.pad(frame, ((10, 6), (4, 20), (0, 0)), mode="edge")
  result = pipe(big, samples[:int(0.8 * 16000)], landmarks=landmarks + np.array([4, 10]),
                paste_back=True, progress=False)
  assert result.frames.shape == (20,) + big.shape


def test_user_errors_are_clear(pipe, portrait):
  frame, landmarks, wav, samples = portrait
  with pytest.raises(ValueError, match="unknown emotion 'elated'; use one of happy, angry, sad, "
                                       "surprised, fearful, disgusted, worried, neutral"):
    pipe(frame, wav, landmarks=landmarks, emotion="elated", progress=False)
  with pytest.raises(ValueError, match="at least 0.2 s"):
    pipe(frame, samples[:1600], landmarks=landmarks, progress=False)
  with pytest.raises(ValueError, match="at most one emotion source; got emotion, emotion_text"):
    pipe(frame, wav, landmarks=landmarks, emotion="sad", emotion_text="so sad", progress=False)
  with pytest.raises(ValueError, match="intensity 2.0 is out of range"):
    pipe(frame, wav, landmarks=landmarks, emotion="sad", intensity=2.0, progress=False)
  with pytest.raises(ValueError, match="no speech-emotion model"):
    pipe(frame, wav, landmarks=landmarks, emotion_audio=wav, progress=False)


def test_checkpoint_errors(checkpoint, tmp_path):
  with pytest.raises(FileNotFoundError, match="is not an etalk pipeline checkpoint"):
    EmotiveTalkPipeline.load(tmp_path)
  with pytest.raises(ValueError, match="does not match the config: ethd lip_dim = 32 but "
                                       "projector output_dim = 8"):
    save_pipeline(tmp_path / "bad", **tiny_components(lip_dim=8))
  assert not (tmp_path / "bad").exists()
  mismatched = shutil.copytree(checkpoint, tmp_path / "mismatched")
  save_vaid_model(tiny_components(lip_dim=8)["projector"], mismatched / "projector",
                  overwrite=True)
  with pytest.raises(ValueError, match="a checkpoint that does not match the config"):
    EmotiveTalkPipeline.load(mismatched)


def test_sample_command(checkpoint, portrait, tmp_path, monkeypatch, capsys):
  frame, landmarks, wav, _ = portrait
  image = tmp_path / "portrait.png"
  Image.fromarray(frame).save(image)
  # The synthetic face is not a photo MediaPipe is sure to find: give the renderer's landmarks.
  monkeypatch.setattr(pipeline_inputs, "detect_face", lambda image, name: landmarks)
  out, bad = tmp_path / "talk.mp4", tmp_path / "bad.mp4"
  base = ["sample", "--portrait", str(image), "--audio", str(wav), "--checkpoint",
          str(checkpoint), "--no-progress"]
  assert cli.main(base + ["--out", str(out), "--emotion", "sad"]) == 0
  assert probe(out).width == RESOLUTION and "25 frames" in capsys.readouterr().out
  # An existing --out is kept unless --overwrite says otherwise; a blend is an --emotion.
  written = out.stat().st_mtime_ns
  assert cli.main(base + ["--out", str(out), "--emotion", "sad"]) == 2
  assert "--overwrite" in capsys.readouterr().err and out.stat().st_mtime_ns == written
  assert cli.main(base + ["--out", str(out), "--emotion", "happy:0.7,sad:0.3",
                          "--overwrite"]) == 0
  assert "emotion: happy:0.70,sad:0.30" in capsys.readouterr().out
  assert out.stat().st_mtime_ns != written
  for wrong in (["--emotion", "elated"], ["--resolution", "512"], ["--audio", "missing.wav"]):
    assert cli.main(base + ["--out", str(bad)] + wrong) == 2
    assert "etalk sample: error:" in capsys.readouterr().err
  assert not bad.exists() and not list(tmp_path.glob(".bad.mp4*"))


def test_bf16_compute_runs_ethd_in_bf16_over_fp32_weights(checkpoint, pipe, portrait):
  frame, landmarks, _, samples = portrait
  bf16 = EmotiveTalkPipeline.load(checkpoint, compute=Compute.bf16())
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16.ethd_params)} == {np.dtype(np.float32)}
  # An activation: ETHD's output on the sampler's window, traced (nothing compiled).
  window = (1, WINDOWS.frames, 16, 16, CODEC.latent_channels)
  inputs = (jax.ShapeDtypeStruct(window, np.float32), np.float32(0.5),
            {"lip_latents": np.zeros((1, WINDOWS.frames, 32), np.float32),
             "expression": np.zeros((1, WINDOWS.frames, 30), np.float32)},
            {"reference_latent": np.zeros(window[:1] + window[2:], np.float32),
             "reference_expression": np.zeros((1, 30), np.float32),
             "face_mask": np.ones((1, RESOLUTION, RESOLUTION), np.float32)})
  assert jax.eval_shape(bf16.denoiser, bf16.ethd_params, *inputs).dtype == jnp.bfloat16
  assert jax.eval_shape(pipe.denoiser, pipe.ethd_params, *inputs).dtype == jnp.float32
  speech = samples[:int(0.8 * 16000)]
  fast = bf16(frame, speech, landmarks=landmarks, seed=0, progress=False)
  exact = pipe(frame, speech, landmarks=landmarks, seed=0, progress=False)
  assert fast.frames.shape == exact.frames.shape == (20, RESOLUTION, RESOLUTION, 3)
  assert fast.expressions.dtype == fast.lip_latents.dtype == np.float32
  assert np.isfinite(fast.expressions).all() and np.isfinite(fast.lip_latents).all()
  difference = np.abs(fast.frames.astype(np.int16) - exact.frames)
  print(f"bf16 vs fp32 video: mean {difference.mean():.2f}, max {difference.max()} levels")
  # bf16 really ran (its rounding moves pixels), and gave the fp32 video up to that rounding:
  # NaN or diverged latents would decode to black or saturated frames, far from fp32's.
  assert difference.max() > 0 and difference.mean() < 3


def test_sample_command_dtype_and_attention(checkpoint, portrait, tmp_path, monkeypatch, capsys):
  frame, landmarks, wav, _ = portrait
  image = tmp_path / "portrait.png"
  Image.fromarray(frame).save(image)
  monkeypatch.setattr(pipeline_inputs, "detect_face", lambda image, name: landmarks)
  base = ["sample", "--portrait", str(image), "--audio", str(wav), "--checkpoint",
          str(checkpoint), "--no-progress", "--out", str(tmp_path / "talk.mp4")]
  args = cli.build_parser().parse_args(base + ["--dtype", "bfloat16", "--attention", "xla"])
  assert (args.dtype, args.attention) == ("bfloat16", "xla")
  assert sample_module.compute_for("bfloat16", "xla") == Compute.bf16("xla")
  # The CPU's default is fp32, the accelerators' bf16.
  assert cli.build_parser().parse_args(base).dtype is None
  assert sample_module.default_dtype() == "float32"
  assert sample_module.compute_for(None) == Compute()
  assert cli.main(base + ["--dtype", "bfloat16", "--attention", "xla"]) == 0
  assert "25 frames" in (out := capsys.readouterr().out) and "bfloat16 on 1 device" in out
  assert probe(tmp_path / "talk.mp4").width == RESOLUTION
  for wrong in (["--dtype", "float16"], ["--attention", "flash"]):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(base + wrong)
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
