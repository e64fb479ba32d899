"""PD-FGC's input preprocessing (`vision.alignment.pdfgc_inputs`) against a reference in upstream's
style (skimage + cv2, tests/helpers/pdfgc_align_reference.py) on the astronaut portrait, and the
encoder paths that must go through it (the featurizer behind precompute / codebook / pipeline, the
encoder stage)."""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_pipeline import faces, synthetic
from etalk_jax import model_io
from etalk_jax.train.stages.encoders import encoder_inputs
from etalk_jax.vaid.data import VAIDFeaturizer
from etalk_jax.vision import params
from etalk_jax.vision.alignment import canvas_to_source, eye_mouth_centres, pdfgc_inputs
from etalk_jax.vision.pdfgc import PDFGC_SMALL, AdaptedPDFGC, resize_bilinear
from tests.helpers.pdfgc_reference import random_fan_encoder


@pytest.fixture(scope="module")
def encoder():
  """A random PD-FGC small, built through the torch reference (nnx's eager initialisers would
  compile a program per weight shape: half a minute on the shared cores)."""
  return params.pdfgc_from_torch(random_fan_encoder(PDFGC_SMALL))


@pytest.fixture(scope="module")
def astronaut():
  """(the 512x512 portrait, its MediaPipe pixel landmarks)."""
  pytest.importorskip("mediapipe",
                      reason="face detection needs the `faces` extra (mediapipe==0.10.14)")
  image = pytest.importorskip("skimage.data").astronaut()
  with faces.FaceLandmarker() as landmarker:
    points = landmarker(image)
  assert points is not None
  return image, points


@pytest.fixture(scope="module")
def reference():
  pytest.importorskip("cv2", reason="the upstream-style reference warps with OpenCV "
                      "(a dependency of mediapipe)")
  from tests.helpers import pdfgc_align_reference  # noqa: PLC0415 (imports cv2: after the skip)
  return pdfgc_align_reference


def _grey(inputs) -> np.ndarray:
  return (np.asarray(inputs, np.float64) + 1.0) * 127.5


def _frame_variants(image, points):
  """The portrait as given, and resized into a non-square frame with a border (another size,
  another place): the alignment must not care."""
  yield "512x512", image, points
  small = np.asarray(Image.fromarray(image).resize((300, 300), Image.Resampling.BILINEAR))
  frame = np.zeros((360, 420, 3), np.uint8)
  frame[40:340, 90:390] = small
  yield "420x360", frame, points * 300 / 512 + [90, 40]


def test_matches_upstreams_alignment_and_crop(astronaut, reference):
  """Within rounding of the reference: it stores 8-bit images twice (aligned face, resized crop)
  and cv2 quantises warp coordinates to 1/32 px; measured 0.30 grey mean, 1.16 max."""
  image, points = astronaut
  for name, frame, landmarks in _frame_variants(image, points):
    ours = _grey(pdfgc_inputs(frame, landmarks, 224))
    theirs = reference.pdfgc_input(frame, landmarks).astype(np.float64)
    difference = np.abs(ours - theirs)
    assert ours.shape == theirs.shape == (224, 224, 3), name
    assert difference.mean() < 0.5 and difference.max() < 2.0, (
        name, difference.mean(), difference.max())


def test_small_encoder_sees_the_same_region(astronaut, reference):
  """At PDFGC_SMALL's 56 px: the same 192x192 crop of the same aligned canvas, resized with an
  antialiasing bilinear filter (PIL's, here, on the reference's crop)."""
  image, points = astronaut
  canvas = reference.cv2.warpAffine(image, reference.aligning_matrix(points), (224, 224),
                                    borderValue=0.0)
  crop = canvas[:192, 16:208]
  theirs = np.asarray(Image.fromarray(crop).resize((56, 56), Image.Resampling.BILINEAR), np.float64)
  ours = _grey(pdfgc_inputs(image, points, 56))
  difference = np.abs(ours - theirs)
  assert difference.mean() < 0.5 and difference.max() < 3.0, (difference.mean(), difference.max())


def test_the_mouth_lands_on_the_template_and_batches_align_each_frame():
  clip = synthetic.make_clip(synthetic.make_identity(2), "happy", 2, num_frames=16, resolution=96)
  frames, landmarks = clip.frames[:6], clip.landmarks[:6] * 96
  matrices = np.asarray(canvas_to_source(landmarks))
  centres = np.asarray(eye_mouth_centres(landmarks))
  for matrix, centre in zip(matrices, centres):  # canvas -> source, so invert to check
    forward = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    mouth = forward @ np.append(centre[2], 1.0)
    np.testing.assert_allclose(mouth[:2], faces.PDFGC_TEMPLATE[2], atol=1e-3)
  batch = np.asarray(pdfgc_inputs(frames.reshape(2, 3, 96, 96, 3),
                                  landmarks.reshape(2, 3, 478, 2), 56))
  assert batch.shape == (2, 3, 56, 56, 3) and -1.0 <= batch.min() and batch.max() <= 1.0
  np.testing.assert_allclose(batch[1, 2], np.asarray(pdfgc_inputs(frames[5], landmarks[5], 56)),
                             atol=1e-5)


def test_missing_or_misshapen_landmarks_are_refused():
  frames = np.zeros((2, 64, 64, 3), np.uint8)
  with pytest.raises(ValueError, match="each frame's own"):
    pdfgc_inputs(frames, np.zeros((478, 2)), 56)
  # Shapes only: both refusals come before any weight is read.
  featurizer = VAIDFeaturizer(audio=None, vision=model_io.abstract(
      lambda rngs: AdaptedPDFGC(PDFGC_SMALL, rngs=rngs)))
  with pytest.raises(ValueError, match="each frame's own landmarks"):
    featurizer.encode_frames(frames, None)
  with pytest.raises(ValueError, match="reference_landmarks"):
    featurizer.from_batch({"frames": frames[None], "landmarks": np.zeros((1, 2, 478, 2)),
                           "reference": frames[:1], "audio": np.zeros((1, 640 * 6)),
                           "clip_id": ["c"]})


def test_featurizer_and_encoder_stage_encode_the_aligned_crops(encoder):
  """l_v / e_v of precompute, codebook, pipeline and V-AID targets (the featurizer), and the
  encoder stage's inputs, are PD-FGC's on `pdfgc_inputs`, not on the loose crop resized."""
  clip = synthetic.make_clip(synthetic.make_identity(1), "angry", 3, num_frames=16, resolution=64)
  frames, landmarks = clip.frames[:3], clip.landmarks[:3]
  landmarks_px = landmarks * 64
  lip, expression = VAIDFeaturizer(audio=None, vision=encoder).encode_frames(frames, landmarks_px)
  aligned = pdfgc_inputs(frames, landmarks_px, PDFGC_SMALL.image_size)
  run = nnx.jit(lambda model, images: model(images))
  codes = run(encoder, aligned)
  tolerance = 1e-4 * np.abs(codes.expression).max()  # one program vs another's fusion
  np.testing.assert_allclose(lip, codes.lip, rtol=0, atol=1e-4 * np.abs(codes.lip).max())
  np.testing.assert_allclose(expression, codes.expression, rtol=0, atol=tolerance)
  # Not what the loose crop resized gives (a random encoder's outputs vary little, hence the
  # comparison with the agreement tolerance rather than an absolute size).
  resized = resize_bilinear(frames.astype(np.float32) / 127.5 - 1, 56, 56)
  assert np.abs(np.asarray(resized) - np.asarray(aligned)).mean() > 0.1
  assert np.abs(np.asarray(run(encoder, resized).expression) - expression).max() > 10 * tolerance
  # The encoder stage: the loader's [0, 1] landmarks, scaled to the frames' pixels.
  stage = encoder_inputs(frames[None], landmarks[None], PDFGC_SMALL.image_size)
  np.testing.assert_allclose(np.asarray(stage)[0], np.asarray(aligned), atol=1e-5)
