"""PD-FGC motion encoder: parity with a PyTorch reference of upstream's FanEncoder, adapters,
strict conversion of `motion_model.pth`, our saved format and `etalk convert pdfgc`."""

import numpy as np
import pytest
import torch
from flax import nnx

from etalk_jax import model_io
from etalk_jax.cli import main
from etalk_jax.vision import params
from etalk_jax.vision.pdfgc import (
  ADAPTER_PARAMS,
  PDFGC_FULL,
  PDFGC_SMALL,
  AdaptedPDFGC,
  PDFGCConfig,
  PDFGCEncoder,
  resize_bilinear,
)
from etalk_jax.weights import ConversionError
from tests.helpers.pdfgc_reference import FanEncoder, random_fan_encoder

IMAGES = np.random.default_rng(0).uniform(
    -1, 1, (2, PDFGC_SMALL.image_size, PDFGC_SMALL.image_size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference():
  return random_fan_encoder(PDFGC_SMALL)


@pytest.fixture(scope="module")
def converted(reference):
  return params.pdfgc_from_torch(reference)


def _reference_outputs(model) -> dict[str, np.ndarray]:
  with torch.no_grad():
    pose, eye, emotion, mouth = model(torch.from_numpy(IMAGES).permute(0, 3, 1, 2))
    mouth_embed = model.mouth_embed(mouth)
  return {"pose": pose.numpy(), "eye": eye.numpy(), "expression": emotion.numpy(),
          "lip": mouth.numpy(), "mouth_embed": mouth_embed.numpy()}


def _outputs(model) -> dict[str, np.ndarray]:
  # Eager on purpose: the adapter test compares two models bit for bit, and two separately
  # compiled programs may fuse (and round) differently.
  codes = model(IMAGES)
  encoder = model.encoder if isinstance(model, AdaptedPDFGC) else model
  out = {name: np.asarray(value) for name, value in codes._asdict().items()}
  out["mouth_embed"] = np.asarray(encoder.mouth_embedding(codes.lip))
  return out


def _close(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def _torch_state(arrays):
  return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def test_parity_with_reference(reference, converted):
  theirs, ours = _reference_outputs(reference), _outputs(converted)
  assert ours["lip"].shape == (2, PDFGC_SMALL.feature_dim)
  assert ours["expression"].shape == (2, 30)
  assert ours["pose"].shape == ours["eye"].shape == (2, 6)
  for name in theirs:
    _close(ours[name], theirs[name])


def test_bilinear_matches_torch():
  x = np.random.default_rng(1).standard_normal((1, 3, 5, 2)).astype(np.float32)
  for size in ((7, 10), (6, 4), (3, 5)):
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                             mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.asarray(resize_bilinear(x, *size)),
                               theirs.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_untrained_adapters_change_nothing(converted):
  adapted = AdaptedPDFGC(PDFGC_SMALL, encoder=converted, rngs=nnx.Rngs(3))
  plain, with_adapters = _outputs(converted), _outputs(adapted)
  for name in plain:
    np.testing.assert_array_equal(with_adapters[name], plain[name])
  # Training mode reaches the adapters only: the frozen encoder keeps its running statistics.
  adapted.train()
  assert all(m.use_running_average for _, m in nnx.iter_modules(adapted.encoder)
             if isinstance(m, nnx.BatchNorm))
  for name, value in _outputs(adapted).items():
    np.testing.assert_array_equal(value, plain[name])
  # A trained adapter moves only its own branch.
  kernel = adapted.lip_adapter.output.kernel
  kernel[...] = 0.1 * np.ones(kernel.shape, np.float32)
  moved = _outputs(adapted)
  assert not np.allclose(moved["lip"], plain["lip"])
  for name in ("expression", "pose", "eye"):
    np.testing.assert_array_equal(moved[name], plain[name])
  trainable = nnx.state(adapted, ADAPTER_PARAMS)
  assert {path[0] for path, _ in nnx.to_flat_state(trainable)} == {"lip_adapter",
                                                                    "expression_adapter"}


def test_export_loads_strict(reference, converted):
  fresh = FanEncoder(PDFGC_SMALL)
  fresh.load_state_dict(_torch_state(params.to_torch(converted)), strict=True)
  for key, value in reference.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def test_config_read_from_checkpoint(reference):
  source = params.open_source(reference.state_dict())
  assert params.config_from_checkpoint(source) == PDFGC_SMALL
  full = params.open_source(_meta_state(PDFGC_FULL))
  assert params.config_from_checkpoint(full) == PDFGC_FULL


def _meta_state(config):
  with torch.device("meta"):
    return FanEncoder(config).state_dict()


def test_strict_errors_list_every_problem(reference):
  state = dict(reference.state_dict())
  del state["model.m0.b2_plus_1.conv3.weight"]
  state["model.extra.weight"] = torch.zeros(3)
  state["to_emo.0.bias"] = torch.zeros(7)
  with pytest.raises(ConversionError) as error:
    params.pdfgc_from_torch(state, PDFGC_SMALL)
  message = str(error.value)
  assert "1 missing, 1 unexpected, 1 with the wrong shape" in message
  for key in ("model.m0.b2_plus_1.conv3.weight", "model.extra.weight", "to_emo.0.bias"):
    assert key in message


def test_data_parallel_prefix_is_stripped(reference, converted):
  state = {f"module.{k}": v for k, v in reference.state_dict().items()}
  loaded = params.pdfgc_from_torch(state)
  for name, value in _outputs(loaded).items():
    np.testing.assert_array_equal(value, _outputs(converted)[name])


def test_not_a_pdfgc_checkpoint():
  with pytest.raises(ConversionError, match="not a PD-FGC motion encoder checkpoint"):
    params.pdfgc_from_torch({"weight": torch.zeros(2)})


def test_convert_command_and_load(tmp_path, reference, converted):
  src = tmp_path / "motion_model.pth"
  torch.save(reference.state_dict(), src)
  dst = tmp_path / "pdfgc"
  summary = params.convert_pdfgc_command(str(src), str(dst))
  assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
  assert summary["tensors"] == sum(1 for k in reference.state_dict()
                                   if not k.endswith("num_batches_tracked"))
  assert summary["bytes"] > 0 and summary["dst"] == str(dst) and summary["seconds"] >= 0
  loaded = params.load_pdfgc(dst)
  assert loaded.config == PDFGC_SMALL
  for name, value in _outputs(loaded).items():
    np.testing.assert_array_equal(value, _outputs(converted)[name])
  with pytest.raises(FileExistsError):
    params.convert_pdfgc_command(str(src), str(dst))
  assert main(["convert", "pdfgc", "--src", str(src), "--dst", str(dst), "--overwrite"]) == 0
  assert main(["convert", "pdfgc", "--src", str(src), "--dst", str(dst), "--to",
               "transformers"]) == 2
  with pytest.raises(ConversionError, match="not a file"):
    params.convert_pdfgc_command(str(tmp_path / "absent.pth"), str(tmp_path / "out"))
  with pytest.raises(ConversionError, match="etalk convert pdfgc"):
    params.load_pdfgc(tmp_path)


def test_wrong_image_shape(converted):
  with pytest.raises(ValueError, match=r"\(batch, 56, 56, 3\)"):
    converted(IMAGES[:, :48, :48])


def test_configs_and_full_parameter_count():
  assert PDFGCConfig.from_dict(PDFGC_FULL.to_dict()) == PDFGC_FULL
  assert PDFGC_FULL.summary_size == 28 and PDFGC_FULL.mouth_embed_dim == 500
  with pytest.raises(ValueError, match="multiple of 4"):
    PDFGCConfig(stem_channels=6)
  counts = {}
  for name, config in (("full", PDFGC_FULL), ("small", PDFGC_SMALL)):
    encoder = model_io.abstract(lambda rngs, c=config: PDFGCEncoder(c, rngs=rngs))
    adapted = model_io.abstract(lambda rngs, c=config: AdaptedPDFGC(c, rngs=rngs))
    with torch.device("meta"):
      torch_count = sum(p.numel() for p in FanEncoder(config).parameters())
    counts[name] = model_io.parameter_count(encoder)
    assert counts[name] == torch_count
    adapters = model_io.parameter_count(adapted) - counts[name]
    assert adapters == 2 * (2 * config.feature_dim * config.adapter_dim + config.adapter_dim
                            + config.feature_dim)
    print(f"PD-FGC {name}: {counts[name]:,} encoder parameters, {adapters:,} adapter parameters")
