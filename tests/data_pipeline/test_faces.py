"""Faces: masks, crop boxes and the PD-FGC crop on landmark arrays; MediaPipe on the astronaut."""

from types import SimpleNamespace

import numpy as np
import pytest

from data_pipeline import faces, synthetic


@pytest.fixture(scope="module")
def synthetic_face():
  clip = synthetic.make_clip(synthetic.make_identity(2), "neutral", 1, num_frames=40,
                             resolution=128)
  return clip


def test_masks_cover_face_and_mouth(synthetic_face):
  points = synthetic_face.landmarks[0] * 128
  face, lips = faces.face_and_lip_masks(points, 128)
  assert face.dtype == lips.dtype == np.uint8 and set(np.unique(face)) <= {0, 1}
  # Upper inner lip: in the lip mask, cut out of the face mask.
  x, y = points[13].round().astype(int)
  assert lips[y, x] == 1 and face[y, x] == 0
  x, y = points[faces.RIGHT_IRIS[0]].round().astype(int)
  assert face[y, x] == 1 and lips[y, x] == 0
  # Dilated: the mask reaches past the face oval and the lip contour.
  oval_area = faces.face_and_lip_masks(points, 128, faces.MaskConfig(0.0, 0.0, 0.0))
  assert face.sum() + lips.sum() > oval_area[0].sum() + oval_area[1].sum()
  assert face[0, 0] == 0 and lips.sum() < face.sum()


def test_crop_box_is_square_stable_and_contains_the_face(synthetic_face):
  points = synthetic_face.landmarks * 128
  box = faces.clip_crop_box(points)
  assert box[2] - box[0] == pytest.approx(box[3] - box[1])
  assert (points[..., 0] > box[0]).all() and (points[..., 0] < box[2]).all()
  assert (points[..., 1] > box[1]).all() and (points[..., 1] < box[3]).all()
  frame = synthetic_face.frames[0]
  crop = faces.crop_frame(frame, box, 64)
  assert crop.shape == (64, 64, 3)
  # A box past the frame border is padded with edge pixels, not black.
  shifted = faces.crop_frame(frame, box + [100, 0, 100, 0], 32)
  assert shifted.shape == (32, 32, 3) and shifted[:, -1].mean() > 5


def _to_encoder(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Source pixels (N, 2) -> PD-FGC encoder-input pixels, through the inverse of a pdfgc_affine
  matrix."""
  inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
  return (inverse @ np.c_[points, np.ones(len(points))].T).T[:, :2]


def test_similarity_fit_recovers_a_known_transform():
  angle, scale, shift = 0.3, 1.7, np.array([5.0, -8.0])
  linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  src = np.random.default_rng(0).normal(size=(5, 2)) * 40
  fitted = faces._similarity(src, src @ linear.T + shift)
  np.testing.assert_allclose(fitted, np.c_[linear, shift], atol=1e-9)


def test_pdfgc_crop_follows_the_pc_avs_template(synthetic_face):
  """Eyes and mouth where PC-AVS's alignment puts them (aligned 224²: eyes (87, 59), (137, 59),
  mouth (112, 120)), seen through PD-FGC's inner crop (columns 16..208, rows 0..192, resized to
  224²)."""
  # Aligned pixel index -> encoder coordinates (continuous: pixel centres at .5).
  to_inner = lambda p: (np.asarray(p) + 0.5 - [16, 0]) * 224 / 192  # noqa: E731
  points = synthetic_face.landmarks[0] * 128
  crop = faces.pdfgc_crop(synthetic_face.frames[0], points)
  assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
  centres = faces._pdfgc_points(points)
  eyes_and_mouth = _to_encoder(faces.pdfgc_affine(points), centres)
  # One frame: the mouth lands exactly on the template (the shift puts it there), the eyes near it
  # (a least-squares fit of three points; this face's proportions differ a little from the
  # template's).
  np.testing.assert_allclose(eyes_and_mouth[2], to_inner([112, 120]), atol=1e-3)
  assert abs(eyes_and_mouth[0, 1] - eyes_and_mouth[1, 1]) < 2  # level
  np.testing.assert_allclose(eyes_and_mouth[:2], to_inner([[87, 59], [137, 59]]), atol=16)
  # A clip: one rotation and scale for all frames, the mouth kept near the template point.
  track = synthetic_face.landmarks * 128
  matrices = faces.pdfgc_affines(track)
  assert matrices.shape == (len(track), 2, 3)
  np.testing.assert_allclose(matrices[:, :, :2],
                             np.broadcast_to(matrices[0, :, :2], matrices[:, :, :2].shape))
  mouths = np.stack([_to_encoder(m, faces._pdfgc_points(p)[2:])[0]
                     for m, p in zip(matrices, track)])
  assert np.abs(mouths - to_inner([112, 120])).max() < 2
  assert faces.pdfgc_warp(synthetic_face.frames[5], matrices[5]).shape == (224, 224, 3)


def test_mediapipe_finds_the_astronaut():
  pytest.importorskip("mediapipe",
                      reason="face detection needs the `faces` extra (mediapipe==0.10.14)")
  image = pytest.importorskip("skimage.data").astronaut()
  with faces.FaceLandmarker() as landmarker:
    points = landmarker(image)
    assert landmarker(np.zeros((128, 128, 3), np.uint8)) is None
  assert points.shape == (478, 2)
  x0, y0, x1, y1 = faces.landmark_box(points)
  assert 150 < x0 < x1 < 300 and 40 < y0 < y1 < 220  # her face in the 512² portrait
  face, lips = faces.face_and_lip_masks(points, image.shape[:2])
  assert face.sum() > 4 * lips.sum() > 0


def test_landmarker_takes_the_largest_face_then_tracks_it():
  """The choice among several faces, on scripted MediaPipe results: the largest in the first frame,
  then the one nearest the previous pick (even when another face is now larger, or listed first)."""
  pytest.importorskip("mediapipe",
                      reason="face detection needs the `faces` extra (mediapipe==0.10.14)")

  def face(cx, cy, size):
    points = np.random.default_rng(0).uniform(-size / 2, size / 2, (478, 2)) + [cx, cy]
    return SimpleNamespace(landmark=[SimpleNamespace(x=x, y=y) for x, y in points])

  script = [[face(0.2, 0.5, 0.1), face(0.7, 0.5, 0.3)],  # small listed first: take the larger
            [face(0.25, 0.5, 0.4), face(0.68, 0.5, 0.2)],  # the other grew past it: keep tracking
            [face(0.66, 0.5, 0.2)]]
  with faces.FaceLandmarker() as landmarker:
    landmarker._mesh.close()
    results = iter(script)
    landmarker._mesh = SimpleNamespace(
        process=lambda frame: SimpleNamespace(multi_face_landmarks=next(results)),
        close=lambda: None)
    centres = [landmarker(np.zeros((100, 200, 3), np.uint8)).mean(axis=0) for _ in script]
  assert landmarker.faces_seen_max == 2
  np.testing.assert_allclose([c[0] / 200 for c in centres], [0.7, 0.68, 0.66], atol=0.03)
