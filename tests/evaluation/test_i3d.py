"""FVD's I3D: parity with a PyTorch reference of `InceptionI3d` saved as TorchScript (the form of
`i3d_torchscript.pt`), both preprocessing conventions, strict conversion, refusal of files that
are not TorchScript archives or plain state dicts, our saved format and `etalk convert i3d`."""

import dataclasses
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from flax import nnx

from etalk_jax import model_io
from etalk_jax.cli import main
from etalk_jax.errors import UserError
from etalk_jax.evaluation import i3d_params as params
from etalk_jax.evaluation.i3d import (
  I3D,
  I3D_FULL,
  I3D_SMALL,
  I3DConfig,
  feature_map_size,
  preprocess_videos,
)
from etalk_jax.parallel import logical
from etalk_jax.weights import ConversionError
from tests.helpers.i3d_reference import InceptionI3d, center_crop_reference, random_i3d

# Odd sizes after the first strides: time 9 -> 5 -> 3 -> 2, space 40x48 -> 20x24 -> 10x12 ->
# 5x6 -> 3x3 -> 2x2, so every SAME padding is asymmetric somewhere.
SMALL_SIZE = (40, 48)
# torch 2.10+ deprecates TorchScript; `i3d_torchscript.pt` is TorchScript, so the tests make one.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
VIDEOS = np.random.default_rng(0).uniform(-1, 1, (2, 9, *SMALL_SIZE, 3)).astype(np.float32)
FRAMES = np.random.default_rng(1).integers(0, 256, (2, 9, 30, 37, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference():
  return random_i3d(I3D_SMALL, SMALL_SIZE)


@pytest.fixture(scope="module")
def torchscript_file(reference, tmp_path_factory):
  """The reference scripted and saved as `i3d_torchscript.pt` is: the converter reads THAT."""
  path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
  torch.jit.save(torch.jit.script(reference), str(path))
  return path


@pytest.fixture(scope="module")
def converted(torchscript_file):
  return params.i3d_from_torch(torchscript_file, I3D_SMALL)


@pytest.fixture(scope="module")
def features():
  """One jitted forward for every test (recompiled only for a new input shape)."""
  return nnx.jit(lambda model, videos: model(videos))


def _reference(model, videos_nthwc, **flags) -> np.ndarray:
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(videos_nthwc)).permute(0, 4, 1, 2, 3)
    return model(x.contiguous(), **flags).numpy()


def _close(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def test_torchscript_parity(torchscript_file, converted, features):
  scripted = torch.jit.load(str(torchscript_file))
  theirs = _reference(scripted, VIDEOS, return_features=True)
  ours = np.asarray(features(converted, VIDEOS))
  assert ours.shape == (2, 400)
  _close(ours, theirs)
  # Without return_features upstream gives the softmax.
  _close(np.asarray(converted.probabilities(VIDEOS)),
         _reference(scripted, VIDEOS, return_features=False))


def test_parity_other_odd_sizes(reference, converted, features):
  # 11 frames of 37x45: SAME pads differ from 9x40x48 at every stride (t 11 -> 6 -> 3 -> 2).
  videos = np.random.default_rng(2).uniform(-1, 1, (1, 11, 37, 45, 3)).astype(np.float32)
  assert feature_map_size(I3D_SMALL, 11, 37, 45) == (2, 2, 2)
  _close(np.asarray(features(converted, videos)),
         _reference(reference, videos, return_features=True))


def test_stylegan_v_preprocessing(reference, converted, features):
  """uint8 frames through our preprocessing == the detector's own rescale=True, resize=True."""
  theirs = _reference(reference, FRAMES.astype(np.float32), rescale=True, resize=True,
                      return_features=True)
  videos = preprocess_videos(FRAMES, "stylegan_v", size=SMALL_SIZE)
  assert videos.shape == (2, 9, *SMALL_SIZE, 3) and videos.dtype == np.float32
  _close(np.asarray(features(converted, videos)), theirs)
  # At the network's size nothing is resized: exactly x / 255 * 2 - 1.
  same = preprocess_videos(FRAMES, "stylegan_v", size=FRAMES.shape[2:4])
  np.testing.assert_allclose(np.asarray(same), FRAMES / 255.0 * 2 - 1, atol=1e-6)
  gray = preprocess_videos(FRAMES[..., :1], "stylegan_v", size=16)
  assert gray.shape == (2, 9, 16, 16, 3)
  np.testing.assert_array_equal(np.asarray(gray[..., 0]), np.asarray(gray[..., 2]))


def test_center_crop_preprocessing():
  for frames in (FRAMES, FRAMES.transpose(0, 1, 3, 2, 4)):  # wide and tall
    theirs = center_crop_reference(torch.from_numpy(frames), 24).permute(0, 2, 3, 4, 1)
    ours = preprocess_videos(frames, "center_crop_224", size=24)
    assert ours.shape == (2, 9, 24, 24, 3)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)
  with pytest.raises(UserError, match="stylegan_v, center_crop_224"):
    preprocess_videos(FRAMES, "bilinear")
  with pytest.raises(ValueError, match=r"\(batch, frames, height, width, 3\)"):
    preprocess_videos(FRAMES[0], "stylegan_v")


def test_wrong_video_shape(converted):
  with pytest.raises(ValueError, match="at least 9 frames of 224x224"):
    converted(VIDEOS[:, :8])   # 8 frames pool to 1 position, below the 2-frame window
  with pytest.raises(ValueError, match=r"\(batch, frames, height, width, 3\)"):
    converted(VIDEOS[..., :2])


def test_export_loads_strict(reference, converted):
  fresh = InceptionI3d(I3D_SMALL, SMALL_SIZE)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in params.to_torch(converted).items()}, strict=True)
  for key, value in reference.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def test_plain_state_dict_and_prefix(tmp_path, reference, converted):
  """A torch.save state dict (VideoGPT's i3d_pretrained_400.pt form) goes through
  weights.open_source; a DataParallel prefix is stripped; the widths are read from it."""
  path = tmp_path / "i3d_pretrained_400.pt"
  torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
  source = params.open_i3d_source(path)
  assert params.config_from_checkpoint(source, I3D_SMALL.pool_window) == I3D_SMALL
  loaded = params.i3d_from_torch(path, I3D_SMALL)
  np.testing.assert_array_equal(np.asarray(loaded(VIDEOS)), np.asarray(converted(VIDEOS)))
  with torch.device("meta"):
    full = InceptionI3d(I3D_FULL).state_dict()
  assert params.config_from_checkpoint(params.open_i3d_source(full)) == I3D_FULL


def test_strict_errors_list_every_problem(reference):
  state = dict(reference.state_dict())
  del state["Mixed_4d.b2b.bn.running_var"]
  state["Mixed_6a.b0.conv3d.weight"] = torch.zeros(3)
  state["logits.conv3d.bias"] = torch.zeros(7)
  with pytest.raises(ConversionError) as error:
    params.i3d_from_torch(state, I3D_SMALL)
  message = str(error.value)
  assert "1 missing, 1 unexpected, 1 with the wrong shape" in message
  for key in ("Mixed_4d.b2b.bn.running_var", "Mixed_6a.b0.conv3d.weight", "logits.conv3d.bias"):
    assert key in message
  with pytest.raises(ConversionError, match="not a Kinetics I3D in the InceptionI3d layout"):
    params.i3d_from_torch({"conv3d_1a_7x7.conv3d.weight": torch.zeros(2)})


class _RunsCode:
  """A pickle that would call a function when loaded (here: write a marker file)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_refuses_what_is_not_torchscript_or_a_state_dict(tmp_path):
  marker = tmp_path / "pickle-ran"
  for name in ("evil.pt", "evil.pth"):
    path = tmp_path / name
    torch.save({"Conv3d_1a_7x7.conv3d.weight": _RunsCode(marker)}, path)  # a torch zip
    with pytest.raises(ConversionError, match="weights_only=True"):
      params.i3d_from_torch(path)
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))  # a bare pickle
  with pytest.raises(ConversionError):
    params.i3d_from_torch(legacy)
  assert not marker.exists()
  other = tmp_path / "i3d.pkl"
  other.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ConversionError, match="neither a TorchScript archive"):
    params.i3d_from_torch(other)
  # A zip with TorchScript's layout but not TorchScript inside: torch.jit.load's error, ours.
  fake = tmp_path / "fake.pt"
  with zipfile.ZipFile(fake, "w") as archive:
    archive.writestr("fake/constants.pkl", b"junk")
    archive.writestr("fake/code/__torch__/m.py", "junk")
  assert params.is_torchscript_archive(fake)
  with pytest.raises(ConversionError, match="torch.jit.load"):
    params.i3d_from_torch(fake)
  with pytest.raises(ConversionError, match="not a file"):
    params.i3d_from_torch(tmp_path / "absent.pt")


def test_convert_command_and_load(tmp_path, torchscript_file, reference, converted):
  dst = tmp_path / "i3d"
  summary = params.convert_i3d_command(str(torchscript_file), str(dst))
  assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
  assert summary["tensors"] == sum(1 for k in reference.state_dict()
                                   if not k.endswith("num_batches_tracked"))
  assert summary["bytes"] > 0 and summary["dst"] == str(dst) and summary["seconds"] >= 0
  loaded = params.load_i3d(dst)
  # No file records the final pool's window: the command builds the real network's.
  assert loaded.config == dataclasses.replace(I3D_SMALL, pool_window=I3D_FULL.pool_window)
  for (path, ours), (_, theirs) in zip(nnx.to_flat_state(nnx.state(loaded)),
                                       nnx.to_flat_state(nnx.state(converted))):
    np.testing.assert_array_equal(np.asarray(ours.get_value()), np.asarray(theirs.get_value()),
                                  err_msg=str(path))
  with pytest.raises(FileExistsError):
    params.convert_i3d_command(str(torchscript_file), str(dst))
  assert main(["convert", "i3d", "--src", str(torchscript_file), "--dst", str(dst),
               "--overwrite"]) == 0
  bad = tmp_path / "bad.pt"
  bad.write_bytes(b"not a checkpoint")
  assert main(["convert", "i3d", "--src", str(bad), "--dst", str(tmp_path / "out")]) != 0
  assert not (tmp_path / "out").exists()
  with pytest.raises(ConversionError, match="not a file"):
    params.convert_i3d_command(str(tmp_path / "absent.pt"), str(tmp_path / "out"))
  with pytest.raises(ConversionError, match="etalk convert i3d"):
    params.load_i3d(tmp_path)


def test_configs_and_full_parameter_count():
  for config in (I3D_FULL, I3D_SMALL):
    assert I3DConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  assert I3D_FULL.feature_channels == 1024
  assert feature_map_size(I3D_FULL, 16, 224, 224) == (2, 7, 7)
  with pytest.raises(UserError, match="6 positive widths"):
    I3DConfig(mixed_channels=((1, 2, 3),) * 9)
  for name, config in (("full", I3D_FULL), ("small", I3D_SMALL)):
    model = model_io.abstract(lambda rngs, c=config: I3D(c, rngs=rngs))
    logical.model_axes(model)  # every parameter matches exactly one rule of the i3d family
    ours = model_io.parameter_count(model)
    with torch.device("meta"):
      theirs = sum(p.numel() for p in InceptionI3d(config).parameters())
    assert ours == theirs
    print(f"I3D {name}: {ours:,} parameters")


@pytest.mark.slow
def test_full_size_parity(tmp_path):
  """The real network's sizes at the real input: 16 frames of 224x224, converted from a
  TorchScript archive of a random full-width reference (config read from the file)."""
  reference = random_i3d(I3D_FULL)
  path = tmp_path / "i3d_torchscript.pt"
  torch.jit.save(torch.jit.script(reference), str(path))
  videos = np.random.default_rng(3).uniform(-1, 1, (1, 16, 224, 224, 3)).astype(np.float32)
  theirs = _reference(reference, videos, return_features=True)
  ours = params.i3d_from_torch(path)
  assert ours.config == I3D_FULL
  _close(np.asarray(nnx.jit(lambda m, v: m(v))(ours, videos)), theirs)
