"""SyncNet v2 (Sync-C / Sync-D): parity with a PyTorch reference of syncnet_python's `S`, the MFCC
front end against python_speech_features, the offset search against evaluate's arithmetic, an
end-to-end offset test, face crops against crop_video, strict conversion of `syncnet_v2.model`,
our saved format and `etalk convert syncnet`."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import python_speech_features
import torch
from flax import nnx

from data_pipeline.faces import FACE_OVAL
from etalk_jax import model_io
from etalk_jax.cli import main
from etalk_jax.errors import UserError
from etalk_jax.evaluation import syncnet_params as params
from etalk_jax.evaluation.syncnet import (
  SYNCNET_FULL,
  SYNCNET_SMALL,
  SyncInputs,
  SyncNetConfig,
  SyncNetScorer,
  crop_faces,
  face_boxes,
  mel_filterbank,
  mfcc,
  resize_linear,
  sync_scores,
  syncnet_inputs,
  to_int16,
  window_count,
)
from etalk_jax.weights import ConversionError
from tests.helpers import syncnet_reference as reference_code
from tests.helpers.syncnet_reference import S, random_syncnet

SIZE = SYNCNET_SMALL.image_size
RNG = np.random.default_rng(0)
LIP_WINDOWS = RNG.uniform(0, 255, (3, 5, SIZE, SIZE, 3)).astype(np.float32)
MFCC_WINDOWS = RNG.normal(0, 30, (3, 13, 20, 1)).astype(np.float32)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
  """Float audio in [-1, 1): a voiced stretch (harmonics of a gliding pitch under a syllable
  envelope), a noise burst (a fricative) and exact digital silence (the log's eps path)."""
  rng = np.random.default_rng(seed)
  n = int(seconds * 16000)
  t = np.arange(n) / 16000
  pitch = 110 + 60 * np.sin(2 * np.pi * 0.7 * t)
  phase = 2 * np.pi * np.cumsum(pitch) / 16000
  voiced = sum(np.sin(h * phase) / h for h in range(1, 12))
  voiced *= 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * 0.3
  audio = voiced + 0.01 * rng.standard_normal(n)
  burst = slice(n // 2, n // 2 + 2400)
  audio[burst] = 0.2 * rng.standard_normal(2400)
  audio[int(0.75 * n):int(0.75 * n) + 1200] = 0.0
  return np.clip(audio, -1, 0.999).astype(np.float32)


@pytest.fixture(scope="module")
def reference():
  return random_syncnet(SYNCNET_SMALL)


@pytest.fixture(scope="module")
def converted(reference):
  return params.syncnet_from_torch(reference)


@pytest.fixture(scope="module")
def scorer(converted):
  # 8 windows a batch: the end-to-end clip needs several batches and a padded last one.
  return SyncNetScorer(converted, batch_size=8)


def _reference_outputs(model):
  with torch.no_grad():
    lips = model.forward_lip(torch.from_numpy(LIP_WINDOWS).permute(0, 4, 1, 2, 3))
    audio = model.forward_aud(torch.from_numpy(MFCC_WINDOWS).permute(0, 3, 1, 2))
  return lips.numpy(), audio.numpy()


def _outputs(model):
  lips, audio = model(LIP_WINDOWS, MFCC_WINDOWS)
  return np.asarray(lips), np.asarray(audio)


def _close(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def test_parity_with_reference(reference, converted):
  (their_lips, their_audio), (lips, audio) = _reference_outputs(reference), _outputs(converted)
  assert lips.shape == audio.shape == (3, SYNCNET_SMALL.embed_dim)
  _close(lips, their_lips)
  _close(audio, their_audio)


@pytest.mark.slow
def test_full_size_parity():
  reference = random_syncnet(SYNCNET_FULL, seed=1)
  lips = RNG.uniform(0, 255, (2, 5, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    their_lips = reference.forward_lip(torch.from_numpy(lips).permute(0, 4, 1, 2, 3)).numpy()
    their_audio = reference.forward_aud(torch.from_numpy(MFCC_WINDOWS).permute(0, 3, 1, 2))
  ours = params.syncnet_from_torch(reference)
  assert ours.config == SYNCNET_FULL
  _close(np.asarray(ours.lip_embedding(lips)), their_lips)
  _close(np.asarray(ours.audio_embedding(MFCC_WINDOWS)), their_audio.numpy())


def test_export_loads_strict(reference, converted):
  fresh = S(SYNCNET_SMALL)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in params.to_torch(converted).items()}, strict=True)
  for key, value in reference.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def _meta_state(config):
  with torch.device("meta"):
    return S(config).state_dict()


def test_configs_from_checkpoint_and_parameter_counts(reference):
  assert params.config_from_checkpoint(params.open_source(reference.state_dict())) == SYNCNET_SMALL
  full = params.open_source(_meta_state(SYNCNET_FULL))
  assert params.config_from_checkpoint(full) == SYNCNET_FULL
  assert SYNCNET_FULL.lip_final_kernel == 6 and SYNCNET_SMALL.lip_final_kernel == 2
  assert SyncNetConfig.from_dict(SYNCNET_FULL.to_dict()) == SYNCNET_FULL
  with pytest.raises(UserError, match="too small"):
    SyncNetConfig(image_size=48)
  for config in (SYNCNET_FULL, SYNCNET_SMALL):
    with torch.device("meta"):
      torch_count = sum(p.numel() for p in S(config).parameters())
    assert model_io.parameter_count(params.abstract_syncnet(config)) == torch_count
  # S() with upstream's widths: 13,631,616 parameters (52 MiB in float32).
  assert model_io.parameter_count(params.abstract_syncnet(SYNCNET_FULL)) == 13_631_616


def test_strict_errors_list_every_problem(reference):
  state = dict(reference.state_dict())
  del state["netcnnlip.12.running_var"]
  state["netcnnaud.2.weight"] = torch.zeros(3)  # a ReLU holds nothing
  state["netfclip.3.bias"] = torch.zeros(7)
  with pytest.raises(ConversionError) as error:
    params.syncnet_from_torch(state, SYNCNET_SMALL)
  message = str(error.value)
  assert "1 missing, 1 unexpected, 1 with the wrong shape" in message
  for key in ("netcnnlip.12.running_var", "netcnnaud.2.weight", "netfclip.3.bias"):
    assert key in message
  with pytest.raises(ConversionError, match="not a SyncNet checkpoint"):
    params.syncnet_from_torch({"weight": torch.zeros(2)})


def test_data_parallel_prefix_is_stripped(reference, converted):
  loaded = params.syncnet_from_torch({f"module.{k}": v for k, v in reference.state_dict().items()})
  for ours, theirs in zip(_outputs(loaded), _outputs(converted)):
    np.testing.assert_array_equal(ours, theirs)


def test_wrong_input_shapes(converted):
  with pytest.raises(ValueError, match=rf"\(batch, 5, {SIZE}, {SIZE}, 3\)"):
    converted.lip_embedding(LIP_WINDOWS[:, :, :64, :64])
  with pytest.raises(ValueError, match=r"\(batch, 13, 20, 1\)"):
    converted.audio_embedding(MFCC_WINDOWS[:, :, :16])


# ----------------------------------------------------------------------------------------------
# MFCC and input conventions
# ----------------------------------------------------------------------------------------------


def test_mfcc_matches_python_speech_features():
  np.testing.assert_array_equal(mel_filterbank(),
                                python_speech_features.get_filterbanks(26, 512, 16000))
  speech = to_int16(speech_like(1.3))
  for samples in (speech, speech[:399], speech[:400], speech[:401], speech[:640 * 7 + 3]):
    theirs = python_speech_features.mfcc(samples, 16000)
    ours = mfcc(samples)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9 * np.abs(theirs).max())
  # The silent stretch reached the log's eps path in both.
  assert np.isclose(mfcc(speech)[:, 0].min(), np.log(np.finfo(float).eps))


def test_inputs_follow_upstream_conventions():
  frames = RNG.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  audio = speech_like(0.5)  # 8000 samples: 12 frames of audio + 320 samples
  inputs = syncnet_inputs(frames, audio)
  np.testing.assert_array_equal(inputs.video, frames[..., ::-1].astype(np.float32))  # BGR
  assert inputs.video.dtype == np.float32 and inputs.video.max() > 1  # 0..255, not normalised
  samples = to_int16(audio)
  np.testing.assert_array_equal(samples, np.clip(np.round(audio * 32768), -32768, 32767))
  np.testing.assert_allclose(inputs.mfcc, python_speech_features.mfcc(samples, 16000).astype(
      np.float32), rtol=1e-6, atol=1e-4)
  assert inputs.num_windows == window_count(12, 8000) == 12 - 5
  assert window_count(30, 640 * 20 + 639) == 20 - 5  # audio / 640, floored, bounds it too
  assert to_int16(np.array([1.0, -1.0, 0.5 / 32768, 1.5 / 32768])).tolist() == [32767, -32768,
                                                                                0, 2]
  with pytest.raises(UserError, match="at least 6 frames"):
    syncnet_inputs(frames[:5], audio)


# ----------------------------------------------------------------------------------------------
# Offsets and scores
# ----------------------------------------------------------------------------------------------


def _features_with_offset(count: int, offset: int, dim: int = 16, seed: int = 1):
  rng = np.random.default_rng(seed)
  audio = rng.standard_normal((count, dim)).astype(np.float32)
  # Lip window i looks like audio window i - offset (+ noise): the best offset is `offset`.
  lips = np.roll(audio, offset, axis=0) + 0.3 * rng.standard_normal((count, dim))
  return lips.astype(np.float32), audio


def test_offset_and_scores_match_evaluate():
  for count, offset, vshift in ((40, 3, 15), (25, -7, 15), (12, 2, 5)):
    lips, audio = _features_with_offset(count, offset)
    expected = reference_code.offset_and_confidence(torch.from_numpy(lips),
                                                    torch.from_numpy(audio), vshift)
    ours = sync_scores(lips, audio, vshift=vshift)
    assert int(ours.offset) == expected[0] == offset
    np.testing.assert_allclose(float(ours.confidence), expected[1], rtol=1e-5)
    np.testing.assert_allclose(float(ours.min_distance), expected[2], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.distances), expected[3], rtol=1e-5)


def test_batched_scores_with_lengths():
  (lips_a, audio_a), (lips_b, audio_b) = _features_with_offset(30, 4), _features_with_offset(
      22, -2, seed=2)
  pad = ((0, 8), (0, 0))
  lips = np.stack([lips_a, np.pad(lips_b, pad, constant_values=9.0)])
  audio = np.stack([audio_a, np.pad(audio_b, pad, constant_values=-9.0)])
  batched = sync_scores(lips, audio, jnp.array([30, 22]))
  for index, (one_lips, one_audio) in enumerate(((lips_a, audio_a), (lips_b, audio_b))):
    single = sync_scores(one_lips, one_audio)
    assert int(batched.offset[index]) == int(single.offset)
    np.testing.assert_allclose(batched.mean_distances[index], single.mean_distances, rtol=1e-6)
    np.testing.assert_allclose(float(batched.confidence[index]), float(single.confidence),
                               rtol=1e-5)
  assert np.isnan(np.asarray(batched.distances[1, 22:])).all()
  assert batched.offset.tolist() == [4, -2]


def test_end_to_end_matches_evaluate(reference, scorer):
  # 31 frames against 29 frames of audio + 200 samples: 29 - 5 = 24 windows, in 3 batches of 8.
  frames = RNG.integers(0, 256, (31, SIZE, SIZE, 3), dtype=np.uint8)
  audio = speech_like((29 * 640 + 200) / 16000, seed=3)
  ours = scorer(frames, audio)
  (offset, conf, minval, dists), im_feat, cc_feat = reference_code.evaluate(
      reference, list(frames[..., ::-1]), to_int16(audio))
  lips, speech = scorer.features(syncnet_inputs(frames, audio))
  assert lips.shape == (24, SYNCNET_SMALL.embed_dim)
  _close(lips, im_feat)
  _close(speech, cc_feat)
  np.testing.assert_allclose(np.asarray(ours.distances), dists, rtol=0,
                             atol=1e-4 * np.abs(dists).max())
  np.testing.assert_allclose(float(ours.min_distance), minval, rtol=1e-4)
  np.testing.assert_allclose(float(ours.confidence), conf, rtol=0, atol=1e-4 * minval)
  assert int(ours.offset) == offset


class EnvelopeProbe(nnx.Module):
  """Stands in for SyncNet's towers with embeddings that agree exactly when frames and speech
  are in sync: a window's per-frame brightness, and its per-frame log energy (MFCC c0, four
  MFCC frames a video frame), each standardised over the window's five frames."""

  @staticmethod
  def _standardise(x):
    x = x - x.mean(axis=-1, keepdims=True)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def lip_embedding(self, windows):
    return self._standardise(windows.mean(axis=(2, 3, 4)))

  def audio_embedding(self, mfcc_windows):
    energy = mfcc_windows[:, 0, :, 0].reshape(-1, 5, 4).mean(axis=-1)
    return self._standardise(energy)


def _talking_clip(num_frames: int, seed: int = 4):
  """Frames whose brightness follows the loudness of their 40 ms of audio, both random."""
  rng = np.random.default_rng(seed)
  loudness = rng.uniform(np.log(0.005), np.log(0.5), num_frames)
  audio = (np.exp(np.repeat(loudness, 640)) * rng.standard_normal(640 * num_frames))
  brightness = 20 + 200 * (loudness - loudness.min()) / np.ptp(loudness)
  frames = np.broadcast_to(brightness[:, None, None, None], (num_frames, 4, 4, 3))
  return np.round(frames).astype(np.uint8), np.clip(audio, -1, 0.999).astype(np.float32)


def test_shifting_the_audio_moves_the_offset():
  score = SyncNetScorer(EnvelopeProbe(), batch_size=16)
  frames, audio = _talking_clip(48)
  quiet = 0.002 * np.random.default_rng(5).standard_normal(640 * 8).astype(np.float32)
  in_sync = score(frames, audio)
  # The embeddings are unit vectors: out of sync they lie ~1.4 apart (1 from a zero pad).
  assert int(in_sync.offset) == 0 and float(in_sync.confidence) > 0.5
  for shift in (3, -2, 7):
    if shift > 0:  # the sound comes `shift` frames late
      moved = np.concatenate([quiet[:640 * shift], audio[:len(audio) - 640 * shift]])
    else:  # the sound comes early
      moved = np.concatenate([audio[640 * -shift:], quiet[:640 * -shift]])
    result = score(frames, moved)
    assert int(result.offset) == int(in_sync.offset) - shift
    assert float(result.confidence) > 0.5


# ----------------------------------------------------------------------------------------------
# Face crops
# ----------------------------------------------------------------------------------------------


def _oval_track(num_frames: int, seed: int = 6):
  """Landmarks whose FACE_OVAL points lie on a moving ellipse (the others inside it), its box,
  and frames; the face runs off the frame's left edge at the end of the track."""
  rng = np.random.default_rng(seed)
  centres = np.stack([np.linspace(80, 30, num_frames), np.full(num_frames, 60.0)], axis=1)
  centres += rng.normal(0, 1.5, centres.shape)
  radii = np.stack([np.full(num_frames, 28.0), np.full(num_frames, 36.0)], axis=1)
  radii += rng.normal(0, 1.0, radii.shape)
  angles = np.linspace(0, 2 * np.pi, len(FACE_OVAL), endpoint=False)
  circle = np.stack([np.sin(angles), -np.cos(angles)], axis=1)
  landmarks = np.repeat(centres[:, None], 478, axis=1)
  landmarks[:, list(FACE_OVAL)] = centres[:, None] + radii[:, None] * circle[None]
  oval = landmarks[:, list(FACE_OVAL)]
  boxes = np.concatenate([oval.min(axis=1), oval.max(axis=1)], axis=1)
  frames = rng.integers(0, 256, (num_frames, 120, 160, 3), dtype=np.uint8)
  return landmarks, boxes, frames


def test_crops_follow_crop_video():
  cv2 = pytest.importorskip("cv2")
  landmarks, boxes, frames = _oval_track(20)
  landmarks[7] = np.nan  # a frame without a face: its box is interpolated
  boxes[7] = (boxes[6] + boxes[8]) / 2
  theirs, dets = reference_code.crop_video_frames(frames, boxes)
  ours = face_boxes(landmarks)
  np.testing.assert_allclose(ours, np.stack([dets["s"], dets["x"], dets["y"]], axis=1),
                             rtol=1e-12)
  crops = crop_faces(frames, landmarks)
  assert crops.shape == (20, 224, 224, 3) and crops.dtype == np.uint8
  difference = np.abs(crops.astype(int) - theirs.astype(int))
  assert difference.max() <= 1 and difference.mean() < 0.005
  assert (crops[-1, :, :20] == 110).all()  # the padding grey, left of the frame
  # The resize alone, up and down, against cv2.resize.
  image = frames[0, :37, :53]
  for size in (16, 224):
    difference = np.abs(resize_linear(image, size).astype(int)
                        - cv2.resize(image, (size, size)).astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.005
  scaled = face_boxes(landmarks, box_scale=1.2)
  np.testing.assert_allclose(scaled[6:-6, 0], 1.2 * ours[6:-6, 0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Files, our format and the CLI
# ----------------------------------------------------------------------------------------------


def test_convert_command_and_load(tmp_path, reference, converted):
  dst = tmp_path / "syncnet"
  for name, zip_format in (("syncnet_v2.model", False), ("syncnet_zip.model", True)):
    src = tmp_path / name
    # False: the pre-1.6 layout the released file may have (it cannot be memory-mapped).
    torch.save(reference.state_dict(), src, _use_new_zipfile_serialization=zip_format)
    summary = params.convert_syncnet_command(str(src), str(dst), overwrite=True)
    assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
    assert summary["tensors"] == sum(1 for k in reference.state_dict()
                                     if not k.endswith("num_batches_tracked"))
    assert summary["bytes"] > 0 and summary["dst"] == str(dst) and summary["seconds"] >= 0
    loaded = params.load_syncnet(dst)
    assert loaded.config == SYNCNET_SMALL
    for ours, theirs in zip(_outputs(loaded), _outputs(converted)):
      np.testing.assert_array_equal(ours, theirs)
  with pytest.raises(FileExistsError):
    params.convert_syncnet_command(str(src), str(dst))
  assert main(["convert", "syncnet", "--src", str(src), "--dst", str(dst), "--overwrite"]) == 0
  absent_dst = tmp_path / "never"
  assert main(["convert", "syncnet", "--src", str(tmp_path / "absent.model"), "--dst",
               str(absent_dst)]) == 2
  not_syncnet = tmp_path / "other.model"
  torch.save({"weight": torch.zeros(2)}, not_syncnet)
  assert main(["convert", "syncnet", "--src", str(not_syncnet), "--dst", str(absent_dst)]) == 2
  assert not absent_dst.exists()
  with pytest.raises(ConversionError, match="not a file"):
    params.convert_syncnet_command(str(tmp_path / "absent.model"), str(tmp_path / "out"))
  with pytest.raises(ConversionError, match="etalk convert syncnet"):
    params.load_syncnet(tmp_path)


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def test_code_running_pickle_is_refused(tmp_path, reference):
  marker = tmp_path / "code-ran"
  src = tmp_path / "syncnet_v2.model"
  state = dict(reference.state_dict())
  state["extra"] = _RunsCode(str(marker))
  torch.save(state, src)
  with pytest.raises(ConversionError, match="weights_only=True"):
    params.convert_syncnet_command(str(src), str(tmp_path / "out"))
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_features_of_a_short_clip(scorer):
  # SyncInputs passes straight through `features`; a too-short clip is refused before any work.
  inputs = SyncInputs(np.zeros((7, SIZE, SIZE, 3), np.float32), np.zeros((27, 13), np.float32), 2)
  lips, audio = scorer.features(inputs)
  assert lips.shape == audio.shape == (2, SYNCNET_SMALL.embed_dim)
  scores = sync_scores(lips, audio)
  assert scores.mean_distances.shape == (31,) and scores.distances.shape == (2, 31)
