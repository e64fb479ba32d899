"""Deep3DFaceRecon (E-FID): parity with a PyTorch reference of upstream's ReconNetWrapper, the
5-point alignment against upstream's align_img, strict conversion of `epoch_20.pth` (its
"net_recon" entry), our saved format and `etalk convert face3d`."""

import copy
import dataclasses
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from data_pipeline.synthetic.face_mesh import template_landmarks
from etalk_jax import model_io
from etalk_jax.cli import main
from etalk_jax.evaluation import face3d_params as params
from etalk_jax.evaluation.face3d import (
  FACE3D_FULL,
  FACE3D_SMALL,
  FIVE_POINTS,
  NOSE_TIP,
  STANDARD_POINTS_3D,
  Face3DConfig,
  Face3DRecon,
  align_face,
  expression_coefficients,
  face3d_inputs,
  fit_translation_scale,
  five_points,
)
from etalk_jax.weights import ConversionError
from tests.helpers.face3d_reference import (
  LM3D_STD,
  ReconNetWrapper,
  random_recon_net,
  read_data,
)

IMAGES = np.random.default_rng(0).uniform(
    0, 1, (2, FACE3D_SMALL.image_size, FACE3D_SMALL.image_size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference():
  return random_recon_net(FACE3D_SMALL)


@pytest.fixture(scope="module")
def converted(reference):
  return params.face3d_from_torch(reference, FACE3D_SMALL)


@pytest.fixture(scope="module")
def run():
  """One compiled forward for every small model: (model, images) -> (coefficients, expression)."""
  @jax.jit
  def forward(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    return model(images), expression_coefficients(model, images)

  def call(model, images=IMAGES):
    graphdef, state = nnx.split(model)
    coefficients, expression = forward(graphdef, state, images)
    return np.asarray(coefficients), np.asarray(expression)
  return call


def _reference_coefficients(model, images=IMAGES) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def _close(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def _torch_state(arrays):
  return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def _meta_state(config):
  with torch.device("meta"):
    return ReconNetWrapper(config).state_dict()


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


def test_parity_with_reference(reference, converted, run):
  theirs = _reference_coefficients(reference)
  ours, expression = run(converted)
  assert ours.shape == (2, 257) and expression.shape == (2, 64)
  _close(ours, theirs)
  _close(expression, theirs[:, 80:144])
  assert FACE3D_SMALL.expression_slice == slice(80, 144)


def test_full_size_structure():
  """ResNet-50 + the 257-d head: our tree holds exactly the real checkpoint's keys and shapes."""
  state = _meta_state(FACE3D_FULL)
  assert params.config_from_checkpoint(params.open_source(state)) == FACE3D_FULL
  model = params.abstract_model(FACE3D_FULL)
  table = params.conversion_table(model)
  table.check(params.open_source(state), "ReconNetWrapper(resnet50)")
  assert set(table.entries) == {k for k in state if not k.endswith("num_batches_tracked")}
  with torch.device("meta"):
    torch_count = sum(p.numel() for p in ReconNetWrapper(FACE3D_FULL).parameters())
  assert model_io.parameter_count(model) == torch_count == 23_508_032 + 2048 * 257 + 257
  assert FACE3D_FULL.feature_dim == 2048 and sum(FACE3D_FULL.coefficient_dims) == 257


def test_full_size_parity():
  # ResNet-50 at 224x224, one image: ~4 s on 2 cores, so not marked slow.
  reference = random_recon_net(FACE3D_FULL, seed=1)
  images = np.random.default_rng(1).uniform(0, 1, (1, 224, 224, 3)).astype(np.float32)
  theirs = _reference_coefficients(reference, images)
  model = params.face3d_from_torch(reference)
  _close(np.asarray(nnx.jit(lambda m, x: m(x))(model, images)), theirs)


def test_wrong_image_shape(converted):
  for images in (IMAGES[:, :16, :16], IMAGES[..., :1], IMAGES[0]):
    with pytest.raises(ValueError, match=r"\(batch, 64, 64, 3\)"):
      converted(images)


def test_configs():
  assert Face3DConfig.from_dict(FACE3D_FULL.to_dict()) == FACE3D_FULL
  # JSON turns tuples into lists; the config turns them back.
  fields = {k: list(v) if isinstance(v, tuple) else v for k, v in FACE3D_SMALL.to_dict().items()}
  assert Face3DConfig.from_dict(fields) == FACE3D_SMALL
  with pytest.raises(ValueError, match="same, non-zero number of stages"):
    Face3DConfig(stage_blocks=(3, 4, 6))
  with pytest.raises(ValueError, match="7 widths"):
    Face3DConfig(coefficient_dims=(80, 64))


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------


def _face_landmarks(width: int, height: int, centre, size: float, roll: float) -> np.ndarray:
  """MediaPipe-layout pixel landmarks of the synthetic template face (y down), rotated by
  `roll` radians, `size` pixels from eye line to mouth."""
  points = template_landmarks()[:, :2]
  cos, sin = np.cos(roll), np.sin(roll)
  rotated = points @ np.array([[cos, sin], [-sin, cos]])
  return rotated * size / 0.37 + np.asarray(centre, np.float64)


def _detector_points(landmarks_px: np.ndarray) -> np.ndarray:
  """What upstream's detections/*.txt would hold: image-left eye, image-right eye, nose tip,
  image-left and image-right mouth corner, pixel indices, y down."""
  return landmarks_px[[468, 473, 1, 61, 291]] - 0.5


CASES = [  # (frame width, height, face centre, eye-to-mouth size, roll)
    (320, 240, (160.3, 118.7), 70.0, 0.0),
    (256, 256, (121.9, 140.2), 48.5, 0.35),
    (200, 300, (30.0, 260.0), 90.0, -0.2),  # near a corner: the crop reaches outside the frame
    (640, 360, (400.0, 170.0), 150.0, 0.1),  # a large face: the frame shrinks
]


def test_five_points_are_upstreams():
  landmarks = _face_landmarks(320, 240, (160, 120), 70.0, 0.0)
  assert FIVE_POINTS == (468, 473, 1, 61, 291)
  points = five_points(landmarks, 240)
  # Upstream's order: image-left before image-right for the eyes and the mouth corners; y up,
  # so the eyes lie above the nose and the nose above the mouth.
  assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
  assert points[[0, 1], 1].min() > points[2, 1] > points[[3, 4], 1].max()
  indices = (landmarks[list(FIVE_POINTS)] - 0.5).astype(np.float32)  # float32, as upstream reads
  np.testing.assert_array_equal(points[:, 0], indices[:, 0])
  np.testing.assert_array_equal(points[:, 1], 239 - indices[:, 1])


def test_standard_points_are_load_lm3d():
  # Ours are the .mat's float32 values; public code prints them to 8 digits.
  np.testing.assert_allclose(STANDARD_POINTS_3D, LM3D_STD, rtol=0, atol=5e-9)
  assert STANDARD_POINTS_3D.dtype == np.float32


@pytest.mark.parametrize("case", CASES)
def test_alignment_matches_upstream(case):
  width, height, centre, size, roll = case
  rng = np.random.default_rng(int(size))
  frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  landmarks = _face_landmarks(width, height, centre, size, roll)
  theirs = read_data(frame, _detector_points(landmarks))[0].transpose(1, 2, 0)
  ours = face3d_inputs(frame[None], landmarks[None])[0]
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_array_equal(ours, theirs)


def test_alignment_puts_the_standard_face_at_its_place():
  # A face whose 5 points are the standard points' x, y (POS fits it exactly: the projection
  # has no z part, t is the image of the 3D origin): the crop shows the origin at its centre
  # and each point at 102 pixels per unit from there.
  width, height, centre, units = 320, 240, np.array([190.0, 110.0]), 80.0
  standard = STANDARD_POINTS_3D.astype(np.float64)
  landmarks = np.zeros((478, 2))
  landmarks[list(FIVE_POINTS)] = centre + units * standard[:, :2] * [1, -1]
  translation, scale = fit_translation_scale(five_points(landmarks, height))
  assert scale == pytest.approx(units, rel=1e-6)
  np.testing.assert_allclose(translation, [centre[0] - 0.5, height - 1 - (centre[1] - 0.5)],
                             atol=1e-4)
  frame = np.zeros((height, width, 3), np.uint8)
  nose = np.round(landmarks[NOSE_TIP] - 0.5).astype(int)
  frame[nose[1] - 2:nose[1] + 3, nose[0] - 2:nose[0] + 3] = 255
  face = align_face(frame, landmarks)
  rows, cols = np.nonzero(face[..., 0] > 64)
  expected = 112 + 102 * standard[2, :2] * [1, -1]
  assert abs(cols.mean() - expected[0]) < 1.5 and abs(rows.mean() - expected[1]) < 1.5


def test_small_inputs_and_empty_clip():
  width, height = 320, 240
  frame = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
  landmarks = _face_landmarks(width, height, (160.0, 120.0), 70.0, 0.1)
  small = face3d_inputs(frame[None], landmarks[None], image_size=FACE3D_SMALL.image_size)
  assert small.shape == (1, 64, 64, 3)
  theirs = read_data(frame, _detector_points(landmarks), target_size=64.0,
                     rescale_factor=102.0 * 64 / 224)[0].transpose(1, 2, 0)
  np.testing.assert_array_equal(small[0], theirs)
  assert face3d_inputs(frame[None][:0], landmarks[None][:0]).shape == (0, 224, 224, 3)


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


def _epoch_checkpoint(reference) -> dict:
  """What upstream's save_networks writes: the network beside Adam's and StepLR's states."""
  trained = copy.deepcopy(reference).train()
  optimizer = torch.optim.Adam(trained.parameters(), lr=1e-4)
  scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.2)
  trained(torch.zeros(2, 3, 64, 64)).square().mean().backward()
  optimizer.step()
  scheduler.step()
  return {"net_recon": reference.state_dict(), "opt_00": optimizer.state_dict(),
          "sched_00": scheduler.state_dict()}


def test_export_loads_strict(reference, converted):
  fresh = ReconNetWrapper(FACE3D_SMALL)
  fresh.load_state_dict(_torch_state(params.to_torch(converted)), strict=True)
  for key, value in reference.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def test_config_read_from_checkpoint(reference):
  # The input size is not in the weights: upstream's 224 unless given.
  source = params.open_source(reference.state_dict())
  assert params.config_from_checkpoint(source) == dataclasses.replace(FACE3D_SMALL, image_size=224)
  assert params.config_from_checkpoint(source, image_size=64) == FACE3D_SMALL
  with pytest.raises(ConversionError, match="not a Deep3DFaceRecon checkpoint"):
    params.face3d_from_torch({"weight": torch.zeros(2)})


def test_strict_errors_list_every_problem(reference):
  state = dict(reference.state_dict())
  del state["backbone.layer1.1.conv3.weight"]
  state["backbone.fc.weight"] = torch.zeros(257, 128)  # a use_last_fc=True network
  state["final_layers.1.bias"] = torch.zeros(7)
  with pytest.raises(ConversionError) as error:
    params.face3d_from_torch(state, FACE3D_SMALL)
  message = str(error.value)
  assert "1 missing, 1 unexpected, 1 with the wrong shape" in message
  for key in ("backbone.layer1.1.conv3.weight", "backbone.fc.weight", "final_layers.1.bias"):
    assert key in message


def test_net_recon_entry(tmp_path, reference, converted, run):
  checkpoint = _epoch_checkpoint(reference)
  expected = run(converted)[0]
  # In memory, and as the file upstream writes (read with weights_only=True).
  src = tmp_path / "epoch_20.pth"
  torch.save(checkpoint, src)
  for source in (checkpoint, src):
    np.testing.assert_array_equal(run(params.face3d_from_torch(source))[0], expected)
  with pytest.raises(ConversionError, match="'net_recon' entry is a list"):
    params.face3d_from_torch({"net_recon": [1, 2]})
  # Without the unwrapping, the optimizer's entries would be unexpected keys.
  with pytest.raises(ConversionError, match="not a Deep3DFaceRecon checkpoint"):
    params.face3d_from_torch({"opt_00": checkpoint["opt_00"]})


class _RunsCode:
  """Pickles as a call to os.mkdir: what a malicious checkpoint could run on load."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return os.mkdir, (self.path,)


def test_code_running_pickle_refused(tmp_path, reference):
  marker = tmp_path / "ran"
  src = tmp_path / "epoch_20.pth"
  torch.save({"net_recon": reference.state_dict(), "extra": _RunsCode(marker)}, src)
  with pytest.raises(ConversionError, match=r"weights_only=True"):
    params.convert_face3d_command(str(src), str(tmp_path / "out"))
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_command_and_load(tmp_path, reference, converted, run):
  src = tmp_path / "epoch_20.pth"
  torch.save(_epoch_checkpoint(reference), src)
  dst = tmp_path / "face3d"
  summary = params.convert_face3d_command(str(src), str(dst))
  assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
  assert summary["tensors"] == sum(1 for k in reference.state_dict()
                                   if not k.endswith("num_batches_tracked"))
  assert summary["bytes"] > 0 and summary["dst"] == str(dst) and summary["seconds"] >= 0
  loaded = params.load_face3d(dst)
  assert loaded.config == dataclasses.replace(FACE3D_SMALL, image_size=224)
  assert model_io.read_config(dst)["etalk_format"] == {"model": "face3d", "version": 1}
  np.testing.assert_array_equal(run(loaded)[0], run(converted)[0])
  with pytest.raises(FileExistsError):
    params.convert_face3d_command(str(src), str(dst))
  assert main(["convert", "face3d", "--src", str(src), "--dst", str(dst), "--overwrite"]) == 0
  assert main(["convert", "face3d", "--src", str(src), "--dst", str(dst), "--to",
               "transformers"]) == 2
  with pytest.raises(ConversionError, match="not a file"):
    params.convert_face3d_command(str(tmp_path / "absent.pth"), str(tmp_path / "out"))
  bad = tmp_path / "bad.pth"
  torch.save({"weight": torch.zeros(2)}, bad)
  assert main(["convert", "face3d", "--src", str(bad), "--dst", str(tmp_path / "out")]) != 0
  assert not (tmp_path / "out").exists()
  with pytest.raises(ConversionError, match="etalk convert face3d"):
    params.load_face3d(tmp_path)
  assert isinstance(loaded, Face3DRecon)
