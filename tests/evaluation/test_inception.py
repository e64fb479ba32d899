"""FID's Inception-v3: pool3 parity with a PyTorch reference of pytorch-fid's InceptionV3, its
preprocessing, strict conversion of the .pth, our saved format and `etalk convert inception`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from etalk_jax import model_io
from etalk_jax.cli import main
from etalk_jax.evaluation import inception_params as params
from etalk_jax.evaluation.inception import (
  INCEPTION_FULL,
  INCEPTION_SMALL,
  InceptionConfig,
  inception_inputs,
  resize_and_normalize,
)
from etalk_jax.weights import ConversionError
from tests.helpers.inception_reference import Inception3, InceptionV3, random_inception

# Two frames of a non-square, non-299 size: the network resizes them to 299x299 itself.
FRAMES = np.random.default_rng(0).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference():
  return random_inception(INCEPTION_SMALL)


@pytest.fixture(scope="module")
def converted(reference):
  return params.inception_from_torch(reference)


@pytest.fixture(scope="module")
def pool3(converted):
  """One jitted forward for every model of the small config (converted, restored)."""
  graphdef = nnx.graphdef(converted)
  forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
  return lambda model, images: np.asarray(forward(nnx.state(model), images))


def _reference_pool3(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    (features,) = InceptionV3(model)(torch.from_numpy(images).permute(0, 3, 1, 2))
  return features[:, :, 0, 0].numpy()


def _close(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def test_parity_with_reference(reference, converted, pool3):
  images = inception_inputs(FRAMES)
  theirs = _reference_pool3(reference, images)
  ours = pool3(converted, images)
  assert ours.shape == (2, INCEPTION_SMALL.feature_dim) == theirs.shape
  _close(ours, theirs)
  # The features depend on the image (random BatchNorm statistics could wash the input out).
  assert np.abs(theirs[0] - theirs[1]).max() > 0.1 * np.abs(theirs).max()
  with torch.no_grad():
    their_logits = reference.fc(torch.from_numpy(theirs)).numpy()
  _close(np.asarray(converted.logits(ours)), their_logits)


def test_preprocessing_matches_pytorch_fid():
  # ToTensor: uint8 / 255 in float32, bit for bit.
  their_inputs = torch.from_numpy(FRAMES).permute(0, 3, 1, 2).float().div(255)
  np.testing.assert_array_equal(inception_inputs(FRAMES),
                                their_inputs.permute(0, 2, 3, 1).numpy())
  # F.interpolate(bilinear, align_corners=False) then 2x - 1, up- and downsampling.
  images = np.random.default_rng(1).uniform(0, 1, (1, 9, 30, 3)).astype(np.float32)
  for size in (13, 16):  # 9 -> 13 up, 30 -> 13 down; 9 -> 16 up, 30 -> 16 down
    theirs = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2),
                                             size=(size, size), mode="bilinear",
                                             align_corners=False)
    theirs = (2 * theirs - 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(resize_and_normalize(images, size)), theirs,
                               rtol=0, atol=1e-6)
    # jax.image.resize's default antialiasing would not match torch when downsampling.
    antialiased = jax.image.resize(images, (1, size, size, 3), "linear")
    assert np.abs(2 * np.asarray(antialiased) - 1 - theirs).max() > 1e-2


def test_export_loads_strict(reference, converted):
  fresh = Inception3(INCEPTION_SMALL)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v))
                         for k, v in params.to_torch(converted).items()}, strict=True)
  for key, value in reference.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def _meta_state(config):
  with torch.device("meta"):
    return Inception3(config).state_dict()


def test_released_file_names_and_config():
  """The full reference's keys are the released file's: torchvision names, no AuxLogits."""
  state = _meta_state(INCEPTION_FULL)
  assert tuple(state["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
  assert tuple(state["fc.weight"].shape) == (1008, 2048)
  for key in ("Conv2d_1a_3x3.bn.running_mean", "Mixed_5b.branch1x1.conv.weight",
              "Mixed_7c.branch3x3dbl_3b.bn.running_var", "Mixed_7c.branch_pool.conv.weight",
              "fc.bias"):
    assert key in state
  assert not any(k.startswith("AuxLogits") for k in state)
  assert params.config_from_checkpoint(params.open_source(state)) == INCEPTION_FULL
  small = params.open_source(_meta_state(INCEPTION_SMALL))
  assert params.config_from_checkpoint(small) == INCEPTION_SMALL
  # Every key but num_batches_tracked is one leaf of ours, fc included.
  table = params.conversion_table(params.abstract_inception(INCEPTION_FULL))
  assert set(table.entries) == {k for k in state if not k.endswith("num_batches_tracked")}


def test_strict_errors_list_every_problem(reference):
  state = dict(reference.state_dict())
  del state["Mixed_7c.branch_pool.bn.running_var"]
  state["AuxLogits.fc.weight"] = torch.zeros(3, 4)
  state["Mixed_6b.branch7x7_2.conv.weight"] = torch.zeros(16, 16, 7, 1)  # 7x1 for 1x7
  with pytest.raises(ConversionError) as error:
    params.inception_from_torch(state, INCEPTION_SMALL)
  message = str(error.value)
  assert "1 missing, 1 unexpected, 1 with the wrong shape" in message
  for key in ("Mixed_7c.branch_pool.bn.running_var", "AuxLogits.fc.weight",
              "Mixed_6b.branch7x7_2.conv.weight"):
    assert key in message
  # Without num_batches_tracked (older torch saves) the file still loads.
  bare = {k: v for k, v in reference.state_dict().items()
          if not k.endswith("num_batches_tracked")}
  params.inception_from_torch(bare, INCEPTION_SMALL)


def test_not_an_inception_checkpoint():
  with pytest.raises(ConversionError, match="not an Inception-v3 checkpoint"):
    params.inception_from_torch({"weight": torch.zeros(2)})


def test_convert_command_and_load(tmp_path, reference, converted, pool3):
  src = tmp_path / "pt_inception.pth"
  torch.save(reference.state_dict(), src)
  dst = tmp_path / "inception"
  summary = params.convert_inception_command(str(src), str(dst))
  assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
  assert summary["tensors"] == sum(1 for k in reference.state_dict()
                                   if not k.endswith("num_batches_tracked"))
  assert summary["bytes"] > 0 and summary["dst"] == str(dst) and summary["seconds"] >= 0
  loaded = params.load_inception(dst)
  assert loaded.config == INCEPTION_SMALL
  images = inception_inputs(FRAMES)
  np.testing.assert_array_equal(pool3(loaded, images), pool3(converted, images))
  with pytest.raises(FileExistsError):
    params.convert_inception_command(str(src), str(dst))
  assert main(["convert", "inception", "--src", str(src), "--dst", str(dst), "--overwrite"]) == 0
  # A file in torch's legacy (pre-1.6, not zip) format, which cannot be memory-mapped.
  legacy = tmp_path / "legacy.pth"
  torch.save(reference.state_dict(), legacy, _use_new_zipfile_serialization=False)
  params.convert_inception_command(str(legacy), str(tmp_path / "from_legacy"))
  np.testing.assert_array_equal(pool3(params.load_inception(tmp_path / "from_legacy"), images),
                                pool3(converted, images))
  with pytest.raises(ConversionError, match="not a file"):
    params.convert_inception_command(str(tmp_path / "absent.pth"), str(tmp_path / "out"))
  with pytest.raises(ConversionError, match="etalk convert inception"):
    params.load_inception(tmp_path)


def test_convert_bad_input_leaves_nothing(tmp_path):
  not_inception = tmp_path / "other.pth"
  torch.save({"conv.weight": torch.zeros(2, 3)}, not_inception)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a pickle")
  dst = tmp_path / "out"
  for src in (not_inception, garbage, tmp_path):
    assert main(["convert", "inception", "--src", str(src), "--dst", str(dst)]) == 2
    assert not dst.exists()


def test_bad_images(converted):
  with pytest.raises(ValueError, match=r"\(batch, height, width, 3\)"):
    converted(jnp.zeros((2, 64, 80, 4)))
  with pytest.raises(ValueError, match="inception_inputs"):
    converted(jnp.asarray(FRAMES))
  with pytest.raises(ValueError, match="uint8"):
    inception_inputs(FRAMES.astype(np.float32))
  with pytest.raises(ValueError, match=r"\(N, height, width, 3\)"):
    inception_inputs(FRAMES[0])


def test_configs_and_full_parameter_count():
  assert InceptionConfig.from_dict(INCEPTION_FULL.to_dict()) == INCEPTION_FULL
  assert INCEPTION_FULL.feature_dim == 2048 and INCEPTION_SMALL.feature_dim == 256
  with pytest.raises(ValueError, match="must divide 16"):
    InceptionConfig(width_divisor=3)
  with pytest.raises(ValueError, match="below 75"):
    InceptionConfig(image_size=64)
  for name, config in (("full", INCEPTION_FULL), ("small", INCEPTION_SMALL)):
    model = params.abstract_inception(config)
    with torch.device("meta"):
      torch_count = sum(p.numel() for p in Inception3(config).parameters())
    assert model_io.parameter_count(model) == torch_count
    print(f"FID Inception {name}: {torch_count:,} parameters")
