"""Speech files -> 16 kHz mono -> frame-aligned windows A_w: formats, bad input, parity with a
Hallo-style transformers reference, padding buckets, long-audio chunks, compile counts."""

import contextlib
import math

import av
import jax
import numpy as np
import pytest
import torch
import transformers

from etalk_jax.audio import params
from etalk_jax.audio.features import (
  AudioError,
  AudioFeatures,
  FeatureConfig,
  frame_windows,
  load_speech,
  normalize,
  pad_edges,
  plan_chunks,
)

RATE = 16000
# The real conv stack (hop 320, receptive field 400: two features per 25 fps frame), tiny widths.
TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
CHUNKS = FeatureConfig(chunk_frames=40, context_frames=8, bucket_frames=(10, 20, 40))


def _write(path, samples: np.ndarray, rate: int, codec: str):
  """Encodes (channels, n) float samples with PyAV."""
  channels = samples.shape[0]
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=rate, layout="stereo" if channels == 2 else "mono")
    frame = av.AudioFrame.from_ndarray(samples.astype(np.float32), format="fltp",
                                       layout=stream.layout.name)
    frame.sample_rate = rate
    resampler = av.AudioResampler(format=stream.codec_context.format.name,
                                  layout=stream.layout.name, rate=rate,
                                  frame_size=stream.codec_context.frame_size or None)
    for out in resampler.resample(frame) + resampler.resample(None):
      for packet in stream.encode(out):
        container.mux(packet)
    for packet in stream.encode(None):
      container.mux(packet)


def _tone(seconds: float, rate: int, freq: float = 220.0) -> np.ndarray:
  t = np.arange(int(seconds * rate)) / rate
  return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY)).eval()


@pytest.fixture(scope="module")
def featurizer(torch_model):
  return AudioFeatures(params.wav2vec2_from_transformers(torch_model), CHUNKS)


# ----------------------------------------------------------------------------------------------
# Reading speech
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,codec", [("speech.wav", "pcm_s16le"), ("speech.flac", "flac"),
                                        ("speech.mp3", "libmp3lame"), ("speech.m4a", "aac"),
                                        ("speech.mp4", "aac")])
def test_reads_every_format(tmp_path, name, codec):
  tone = _tone(1.0, RATE)
  _write(tmp_path / name, tone[None], RATE, codec)
  samples = load_speech(tmp_path / name)
  assert samples.dtype == np.float32 and samples.ndim == 1
  # Lossy codecs add encoder delay / frame padding: up to ~0.1 s here.
  assert abs(samples.shape[0] - RATE) < 0.1 * RATE
  if codec in ("pcm_s16le", "flac"):
    np.testing.assert_allclose(samples, tone, atol=1e-4)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_stereo_and_other_rates_are_downmixed_and_resampled(tmp_path, rate):
  left, right = _tone(1.0, rate, 300.0), _tone(1.0, rate, 300.0) * 0.5
  _write(tmp_path / "stereo.wav", np.stack([left, right]), rate, "pcm_s16le")
  samples = load_speech(tmp_path / "stereo.wav")
  assert samples.shape[0] == RATE
  expected = 0.75 * _tone(1.0, RATE, 300.0)
  middle = slice(800, -800)  # away from the resampling filter's edges
  np.testing.assert_allclose(samples[middle], expected[middle], atol=5e-3)


def test_array_input_and_normalisation():
  stereo = np.stack([_tone(0.5, 8000), _tone(0.5, 8000)])
  samples = load_speech((stereo, 8000))
  assert samples.shape == (RATE // 2,)
  normed = normalize(samples)
  feature_extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
  expected = feature_extractor(samples, sampling_rate=RATE).input_values[0]
  np.testing.assert_allclose(normed, expected, atol=1e-5)


def test_bad_input_gets_clear_errors(tmp_path, featurizer):
  (tmp_path / "empty.wav").write_bytes(b"")
  with pytest.raises(AudioError, match="empty.wav is empty"):
    load_speech(tmp_path / "empty.wav")
  (tmp_path / "noise.mp3").write_bytes(b"this is not audio at all" * 40)
  with pytest.raises(AudioError, match="noise.mp3 could not be decoded"):
    load_speech(tmp_path / "noise.mp3")
  with pytest.raises(AudioError, match="does not exist"):
    load_speech(tmp_path / "missing.wav")
  broken = _tone(0.5, RATE)
  broken[100] = np.nan
  with pytest.raises(AudioError, match="NaN"):
    load_speech((broken, RATE))
  with pytest.raises(AudioError, match="holds no samples"):
    load_speech((np.zeros(0, np.float32), RATE))
  with pytest.raises(AudioError, match="shorter than one video frame"):
    featurizer(((np.ones(500, np.float32)), RATE))
  with pytest.raises(AudioError, match="not understood"):
    load_speech(12)


# ----------------------------------------------------------------------------------------------
# Frame alignment and windows
# ----------------------------------------------------------------------------------------------


def _hallo_reference(torch_model, samples: np.ndarray, frames: int) -> np.ndarray:
  """transformers' modules with Hallo's alignment: conv features linearly interpolated
  (align_corners) to the frame count before the transformer; every layer's output kept."""
  outputs = []
  hooks = [layer.register_forward_hook(
      lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
      for layer in torch_model.encoder.layers]
  try:
    with torch.no_grad():
      features = torch_model.feature_extractor(torch.from_numpy(samples)[None])
      features = torch.nn.functional.interpolate(features, size=frames, mode="linear",
                                                 align_corners=True).transpose(1, 2)
      hidden, _ = torch_model.feature_projection(features)
      torch_model.encoder(hidden)
  finally:
    for hook in hooks:
      hook.remove()
  return torch.stack(outputs, dim=2)[0].numpy()  # (frames, layers, hidden)


def _relative_error(ours, theirs) -> float:
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("frames", [1, 7, 20])
def test_frame_states_match_hallo_reference_in_any_bucket(featurizer, torch_model, frames):
  """1 and 7 frames are padded into buckets 10 and 20; the padding must not show."""
  samples = normalize(np.random.default_rng(frames).standard_normal(frames * 640))
  states = featurizer.frame_states(samples, frames)
  assert states.shape == (frames, 2, 16)
  assert _relative_error(states, _hallo_reference(torch_model, samples, frames)) < 1e-4


def test_windows_are_edge_clamped_views(featurizer):
  samples = normalize(np.random.default_rng(3).standard_normal(12 * 640))
  a_w = featurizer.windows(samples)
  states = featurizer.frame_states(samples)
  assert a_w.shape == (12, 5, 2, 16)
  assert not a_w.flags.writeable
  for i in range(12):
    for j, offset in enumerate(range(-2, 3)):
      np.testing.assert_array_equal(a_w[i, j], states[min(max(i + offset, 0), 11)])
  np.testing.assert_array_equal(frame_windows(pad_edges(states, 5), 5), a_w)


def test_num_frames_cuts_or_pads_the_audio(featurizer):
  samples = normalize(np.random.default_rng(4).standard_normal(10 * 640))
  assert featurizer((samples, RATE)).shape[0] == 10
  longer = featurizer.frame_states(samples, 13)
  shorter = featurizer.frame_states(samples, 8)
  assert longer.shape[0] == 13 and shorter.shape[0] == 8
  padded = np.concatenate([samples, np.zeros(3 * 640, np.float32)])
  np.testing.assert_allclose(longer, featurizer.frame_states(padded, 13), atol=1e-6)


def test_plan_chunks_covers_every_frame_once_with_context():
  for n in [1, 39, 40, 41, 63, 64, 65, 200, 1001]:
    chunks = plan_chunks(n, 40, 8, (10, 20, 40))
    kept = np.concatenate([np.arange(c.keep_from, c.keep_to) for c in chunks])
    np.testing.assert_array_equal(kept, np.arange(n))
    for c in chunks:
      assert c.start >= 0 and c.start + c.frames <= n and c.frames <= c.bucket
      assert c.keep_from - c.start >= 8 or c.start == 0
      assert c.start + c.frames - c.keep_to >= 8 or c.start + c.frames == n


@contextlib.contextmanager
def _count_compiles():
  """Counts XLA backend compilations of anything (jitted or eager) inside the block."""
  count = [0]

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_long_audio_runs_in_chunks_without_recompiling(torch_model):
  featurizer = AudioFeatures(params.wav2vec2_from_transformers(torch_model), CHUNKS)
  rng = np.random.default_rng(5)
  long = normalize(rng.standard_normal(100 * 640))
  states = featurizer.frame_states(long)
  assert states.shape == (100, 2, 16)
  # The first chunk is frames [0, 40); it keeps [0, 32): exactly the model on that audio alone.
  first = featurizer.frame_states(long[:40 * 640], 40)
  np.testing.assert_allclose(states[:32], first[:32], atol=1e-5)
  assert featurizer.compiled_shapes() == 1  # only the 40-frame chunk shape so far
  with _count_compiles() as compiles:
    for frames in (130, 77, 251):
      featurizer.frame_states(normalize(rng.standard_normal(frames * 640)))
  assert compiles[0] == 0 and featurizer.compiled_shapes() == 1  # new lengths, no new program
  featurizer.frame_states(normalize(rng.standard_normal(3 * 640)))
  with _count_compiles() as compiles:
    for frames in (4, 9, 10):
      featurizer.frame_states(normalize(rng.standard_normal(frames * 640)))
  assert compiles[0] == 0 and featurizer.compiled_shapes() == 2  # all in the 10-frame bucket
  assert math.isclose(CHUNKS.samples_per_frame, 640)


def test_wavlm_features_do_not_depend_on_the_bucket():
  """WavLM's relative position bias sees the padded length; the valid frames must not."""
  torch.manual_seed(0)
  config = transformers.WavLMConfig(**TINY, num_buckets=8, max_bucket_distance=20)
  model = params.wavlm_from_transformers(transformers.WavLMModel(config).eval())
  exact = AudioFeatures(model, FeatureConfig(chunk_frames=40, context_frames=8,
                                             bucket_frames=(7, 40)))
  samples = normalize(np.random.default_rng(6).standard_normal(7 * 640))
  np.testing.assert_allclose(AudioFeatures(model, CHUNKS).frame_states(samples),
                             exact.frame_states(samples), rtol=0, atol=1e-5)


def test_video_without_audio_track(tmp_path):
  with av.open(str(tmp_path / "silent.mp4"), "w") as container:
    stream = container.add_stream("mpeg4", rate=25)
    stream.width = stream.height = 16
    stream.pix_fmt = "yuv420p"
    frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
    for packet in list(stream.encode(frame)) + list(stream.encode(None)):
      container.mux(packet)
  with pytest.raises(AudioError, match="silent.mp4 has no audio track"):
    load_speech(tmp_path / "silent.mp4")
