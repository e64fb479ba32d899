"""The synthetic face's geometry: MediaPipe's 478-point template, the eight emotions' facial
actions, the face of an identity with an expression, mouth opening and eyelids, and its projection
into the crop under a head pose."""

from __future__ import annotations

import base64
import dataclasses
import functools

import numpy as np

from data_pipeline import NUM_LANDMARKS, faces
from data_pipeline.synthetic.identity import Identity

# MediaPipe's face mesh of the public-domain portrait skimage.data.astronaut(), refined (478
# points): pixels / face height (forehead top 10 to chin 152), origin between the eye corners, eye
# line levelled, left/right symmetrised by averaging each point with its mirror partner. float16
# (478, 3).
_TEMPLATE_F16_B64 = (
  "AACaNTSvAAAGNLSzAABjNFqwO6g9L12yAADDMhy0AAD8MNyzAAAvJeKwXrSIGhYcAAC2rDmwAADRr5qwAADNtPqvAADGNb6u"
  "AADuNQOuAAAENgqtAAAON0WrAAA9Nx6sAAB3N7WsAAC8N2WsAAAuOM2oAABONAOzsKkpNN2xcLadsEUxULFWKAWogbKlKGmn"
  "pLNOKPGkl7TcIq4hTbDWJkSnF7OprKmqrLFPrISqMLQ4rBepmrRsqgmmCrUFKBso+7CYOOkmlbQzoAEk2LbYIC00sLVXHk8s"
  "nbKpMUer6KtzNf+uUqviNROtVq+INfOs27CENdionK7FNWmrb7CvNZGmsrJUNiYpdaj7M5iz9Ki2Mgq0UrX7rGelcq/ELXys"
  "XrDUMomwZbASMjCwKbUhMdOenKgQMXmz2rM2r76twbSNrrOr5bWSslctVq3trLOvd7BGquSozrOINVEpU7bQNXM1+q6cM/qv"
  "zKwFNBKwc7KPNWIpI7KeNXMoC7Xtr6apiLAfM5OvpLHQrhevzLFFsNuvELONtJasgrVTsfshXbLbslCuqLUBrrUgE7aBr1gt"
  "06upNXau/K6qNWyspLCcNRyoc67DM3OvSrKWNc8onrEfNv8kEbKhNV0oV62sM82xV7C3NfKlba7QNYKqGqvuNZesJKwfOB2o"
  "3KuhNwCsr6tcNz2sWasjNzmr3Kr4NleqQLBzNlSeerCANiqivbCcNvej67DCNiifPbLRNICo2bZlMd80I4piNNSwDrEfNiUl"
  "WbEaNnIkvqtBNASwNLCtM4ytUqwlNBmwEbHHLgirNbP2L4WpyLBlMoSt/rQQtFkUmbRqshCqG7RxsIWtjbEaN9IkBK7Cr3iw"
  "yq7jsg6wr6/EtESvULTdJoWbq7WsKisrPa8EJTmmILVDqH4goa2CLIyt367AMtOxXbbpLHwuRbXULEkmgrSkLYqgv7J5LQin"
  "ErHCLLuopK/BK1qqqag7J1mwbLa+MFkujLUCqUcmHqdHNBeyl68gMGWt5rbyHS01vq20KWyr2rBYMjGs0rQ7n+sl5a7NMWex"
  "rbY7NNk1K68zIAGklKxYMbGyNLVYNyoxELUTOEEz4LZNMYwz87V2NkgybbZ2q9kwLLH8OFwqJKVPNBSyBrHOMFGsMrZWIcQu"
  "kLNEJGKkibLtJLCm1bErNrQmdbY1M8gvg62DOWErorLuOFUwIrSPOLAxAADTslqwAACZOfYphbFYJC6njrCEIuqlz6+eIR+k"
  "9rUlquUrw7CRptWnzrFOqfGo4bLOqcyo8rP2qCanSrTappqjwbYArQY0IbRtIRCeAACzNKivzrCfNI6s7a6VM0CwMqymNFSv"
  "AAAzpxawUbQlOEUw+LKQOBQuoq1EOakhwLUhN5M07K++nKClBKyxLYSwAABdOT4Y4rBFObQtxLb/M6wzPa7ANsGnr67eNqyo"
  "Ca8NN0epPK9LN2ioEbDJN22gZLGiNVsfmrGUNVAeyrGFNe0dW7MXNWQdxrXOM/Ep0asWKvGud60tpdKp8a5DpJ+nSbGoNXYg"
  "3bVzNacvgaqWpVauh7A0OCohAAD5Ls6yeqilLHqxAAA8LMuxAq6lMFywAAD9OISlAACLOFGnrKx5OLWkfbOyNoUr6LExM2Oq"
  "JrKiN/MoaLTsMmKoL7MiNJKn/7RZNMAhV63mOIihwq8aMcCuL7RkN9YtsbIqODQsUrTENbsqW7awNJ8wEbUUNl0tfbZINYEz"
  "L7SxNPUXtq37LhGvHK5uMxKy/a9XM6ewyKzBMgizV6/eqoSrorEcrVisY7N/rTesaLQGrWSq5rTQq4WmLrW8ivgo47ajLaQ0"
  "ubTsKXMjG7RAK46fpbJ3K8ulKbGwKqGnArBzKUqoZq4vKL2o4baZLcU1CrB4MwCwFawOMG6xOazNM7ayyKkjNHKyQKzeM2ay"
  "ia+4Mw2vKKkzNAWyZKhANAGyXa6uIJKlIq22I7upT6wYJaqsdbRcpEqX17Tup8SROyg9L12yXjSIGhYcKCkzNAWycDadsEUx"
  "UDFWKAWogTKlKGmnpDNOKPGklzTcIq4hTTDWJkSnFzOprKmqrDFPrISqMDQ4rBepmjRsqgmmCjUFKBso+zCYOOkmlTQzoAEk"
  "xjZiImIysDVXHk8snTKpMUer6CtzNf+uhyvVNY+thS91NTet9jB4NRGp/C6qNWyspDCcNRyosjJUNiYpdSj7M5iz9Ci2Mgq0"
  "UjX7rGelci/ELXysXjDUMomwZTASMjCwKTUhMdOenCgQMXmz2jM2r76twTSNrrOr5TWSslctVi3trLOvdzBGquSozjOINVEp"
  "UzbQNXM17S6VM0CwzCwFNBKwiDKLNa4pSjKWNc8oCzXtr6apiDAfM5OvpDHQrhevzDFFsNuvEDONtJasgjVTsfshXTLbslCu"
  "qDUBrrUgEzaBr1gt0yupNXauVi+INfOs2zCENdiocy7DM3OvczKPNWIpnjEfNv8kIzKeNXMoVy2sM82xbzCvNZGmnC7FNWmr"
  "UiviNROtJCwfOB2o3CuhNwCsrytcNz2sWSsjNzmr3Cr4NleqQDBzNlSeejCANiqivTCcNvej6zDCNiifPTLRNICo0zaCMfY1"
  "DjEfNiUlWTEaNnIkvitBNASwNDCtM4ytUiwlNBmwETHHLgirNTP2L4WpsjBxMteu/jQQtFkUmTRqshCqGzRxsIWtjTEaN9Ik"
  "BC7Cr3iwyi7jsg6wry/EtESvUDTdJoWbqzWsKisrPS8EJTmmIDVDqH4goS2CLIyt3y7AMtOxXTbpLHwuRTXULEkmgjSkLYqg"
  "vzJ5LQinEjHCLLuopC/BK1qqqSg7J1mwbDa+MFkujDUCqUcmJCVPNBSyly8gMGWt2DbYIC00vi20KWyr2jBYMjGs0jQ7n+sl"
  "5S7NMWexrTY7NNk1Ky8zIAGklCxYMbGyNDVYNyoxEDUTOEEz4DZNMYwz8zV2NkgybTZ2q9kwLDH8OFwqqSRZNDixBjHOMFGs"
  "MjZWIcQukDNEJGKkiTLtJLCm1TErNrQmdTY1M8gvgy2DOWErojLuOFUwIjSPOLAxhTFYJC6njjCEIuqlzy+eIR+k9jUlquUr"
  "wzCRptWnzjFOqfGo4TLOqcyo8jP2qCanSjTappqjwTYArQY0ITRtIRCezjCfNI6s3C6NM4OwMiymNFSvUTQlOEUw+DKQOBQu"
  "oi1EOakhwDUhN5M07C++nKClBCyxLYSw4jBFObQtxDb/M6wzPS7ANsGnry7eNqyoCS8NN0epPC9LN2ioETDJN22gmjGUNVAe"
  "yjGFNe0d4jF9NRYdWzMXNWQdxjXOM/Ep0SsWKvGudy0tpdKp8S5DpJ+nZDGiNVsf3TVzNacvgSqWpVauhzA0OCoheiilLHqx"
  "Ai6lMFywrCx5OLWkfTOyNoUr6DExM2OqJjKiN/MoaDTsMmKoLzMiNJKn/zRZNMAhVy3mOIihwi8aMcCuLzRkN9YtsTIqODQs"
  "UjTENbsqWzawNJ8wETUUNl0tfTZINYEzLzSxNPUXti37LhGvHC5uMxKy/S9XM6ewyCzBMgizVy/eqoSrojEcrVisYzN/rTes"
  "aDQGrWSq5jTQq4WmLjW8ivgo4zakLQszuTTsKXMjGzRAK46fpTJ3K8ulKTGwKqGnAjBzKUqoZi4vKL2o4zajLaQ0CjB4MwCw"
  "FSwOMG6xKiy8MwazsCkpNN2xQCzeM2ayiS+4Mw2vZChANAGyHidHNBeyXS6uIJKlIi22I7upTywYJaqsdTRcpEqX1zTup8SR"
  "hrKdoZKkSbF7oZKkwrLEqRWnx7PLoZKkjrIjJaOlhjKdoZKkxzPLoZKkgjJ8qZKkSTF7oZKkhjIhJZ+l"
)


@dataclasses.dataclass(frozen=True)
class ExpressionShape:
  """Facial action of one emotion at alpha 1 (units: face heights, or factors)."""
  brow_raise: float = 0.0  # whole brow up (+) / down (-)
  brow_inner: float = 0.0  # inner ends up (+, sad/worried) / down (-, angry)
  eye_open: float = 0.0  # wider (+) / narrower (-)
  mouth_corner: float = 0.0  # smile (+) / frown (-)
  mouth_width: float = 0.0  # stretched (+) / pursed (-)
  upper_lip: float = 0.0  # upper lip raised (disgust)
  jaw: float = 0.0  # extra mouth opening held through the clip (surprise)


EXPRESSIONS = {
  "happy": ExpressionShape(brow_raise=0.2, eye_open=-0.35, mouth_corner=1.0, mouth_width=0.6,
                           jaw=0.05),
  "angry": ExpressionShape(brow_raise=-0.6, brow_inner=-1.0, eye_open=-0.3, mouth_corner=-0.4,
                           mouth_width=-0.3),
  "sad": ExpressionShape(brow_raise=-0.1, brow_inner=1.0, eye_open=-0.35, mouth_corner=-0.9,
                         mouth_width=-0.1),
  "surprised": ExpressionShape(brow_raise=1.0, brow_inner=0.2, eye_open=0.8, mouth_width=-0.3,
                               jaw=0.3),
  "fearful": ExpressionShape(brow_raise=0.6, brow_inner=0.8, eye_open=0.6, mouth_corner=-0.3,
                             mouth_width=0.6, jaw=0.1),
  "disgusted": ExpressionShape(brow_raise=-0.4, brow_inner=-0.4, eye_open=-0.45, mouth_corner=-0.5,
                               upper_lip=1.0),
  "worried": ExpressionShape(brow_raise=0.3, brow_inner=1.0, eye_open=0.1, mouth_corner=-0.4,
                             mouth_width=-0.1),
  "neutral": ExpressionShape(),
}



@functools.lru_cache(maxsize=1)
def template_landmarks() -> np.ndarray:
  """The neutral face (478, 3) in face units. The portrait smiles with parted lips, so the mouth is
  closed (the lower inner lip put onto the upper one, the jaw following by the same field that opens
  it) and the mouth corners are lowered onto the mouth line."""
  raw = np.frombuffer(base64.b64decode(_TEMPLATE_F16_B64), np.float16).reshape(NUM_LANDMARKS, 3)
  points = raw.astype(np.float64)
  gap = points[_INNER_LOWER, 1] - points[INNER_UPPER_LIP, 1]
  weights = _jaw_weights(points)
  points[:, 1] -= weights * float(gap[len(gap) // 2])
  points[_INNER_LOWER, 1] = points[INNER_UPPER_LIP, 1]
  cx, _, half_width = _mouth_frame(points)
  points[_LIPS, 1] += 0.05 * np.clip(np.abs(points[_LIPS, 0] - cx) / half_width, 0.0, 1.0) ** 2
  return points


# Inner lip contour halves, paired from corner to corner (78 .. 308).
INNER_UPPER_LIP = [191, 80, 81, 82, 13, 312, 311, 310, 415]
_INNER_LOWER = [95, 88, 178, 87, 14, 317, 402, 318, 324]
_OUTER_UPPER = [185, 40, 39, 37, 0, 267, 269, 270, 409]
_OUTER_LOWER = [146, 91, 181, 84, 17, 314, 405, 321, 375]
_CORNERS = [61, 291, 78, 308]
_LIPS = sorted(set(faces.LIPS_OUTER) | set(faces.LIPS_INNER))
_UPPER_LIPS = INNER_UPPER_LIP + _OUTER_UPPER


def _mouth_frame(points: np.ndarray) -> tuple[float, float, float]:
  """(centre x, mouth-line y, half width) of the mouth."""
  corners = points[[61, 291]]
  return (float(corners[:, 0].mean()), float(points[[13, 14], 1].mean()),
          float(abs(corners[1, 0] - corners[0, 0]) / 2))


def _jaw_weights(points: np.ndarray) -> np.ndarray:
  """How much each point follows the jaw when the mouth opens: 1 for the lower lip (tapering to 0.5
  at the corners) and the chin, less towards the ears, 0 above the mouth."""
  cx, mouth_y, half_width = _mouth_frame(points)
  lateral = np.clip((np.abs(points[:, 0] - cx) - 0.15) / 0.3, 0.0, 1.0)
  weights = np.clip((points[:, 1] - mouth_y) / 0.08, 0.0, 1.0) * (1.0 - 0.6 * lateral)
  lower = _INNER_LOWER + _OUTER_LOWER
  taper = np.clip(np.abs(points[lower, 0] - cx) / half_width, 0.0, 1.0)
  weights[lower] = 1.0 - 0.5 * taper ** 2
  weights[_CORNERS] = 0.5
  weights[_UPPER_LIPS] = 0.0
  return weights



def face_points(identity: Identity, expression: ExpressionShape, alpha: float, mouth_open: float,
                lid: float) -> tuple[np.ndarray, float]:
  """The identity's face with an expression, mouth opening and eyelids, in face units (478, 3);
  also the eye-opening factor applied (ground truth `eye_open`)."""
  points = template_landmarks().copy()
  cx, mouth_y, half_width = _mouth_frame(points)
  # Identity shape.
  points[:, 0] *= identity.face_width
  below_mouth = np.clip((points[:, 1] - mouth_y) / 0.25, 0.0, 1.0)
  points[:, 0] *= 1.0 + (identity.jaw_width - 1.0) * below_mouth
  lips = _LIPS
  points[lips, 0] = cx + (points[lips, 0] - cx) * identity.mouth_width * (
      1 + 0.12 * expression.mouth_width * alpha)
  # Brows: raise, and inner ends up/down (weight 1 at the inner end, 0 at the outer end).
  for brow in (faces.RIGHT_BROW, faces.LEFT_BROW):
    index = list(brow)
    inner = 1.0 - np.clip((np.abs(points[index, 0]) - 0.05) / 0.3, 0.0, 1.0)
    points[index, 1] -= (0.035 * expression.brow_raise
                         + 0.03 * expression.brow_inner * inner) * alpha
  # Eyes: scale about each eye's centre; the upper lid closes more than the lower rises.
  eye_open = float(np.clip(1.0 + 0.45 * expression.eye_open * alpha, 0.2, 1.6) * lid)
  for eye, iris in ((faces.RIGHT_EYE, faces.RIGHT_IRIS), (faces.LEFT_EYE, faces.LEFT_IRIS)):
    index = list(eye) + list(iris)
    centre = points[list(eye), :2].mean(axis=0)
    points[index, :2] = centre + (points[index, :2] - centre) * identity.eye_size
    contour = np.array(eye)
    upper = contour[points[contour, 1] < centre[1]]
    lower = contour[points[contour, 1] >= centre[1]]
    points[upper, 1] = centre[1] + (points[upper, 1] - centre[1]) * eye_open
    points[lower, 1] = centre[1] + (points[lower, 1] - centre[1]) * (0.6 + 0.4 * min(eye_open, 1.0))
  # Mouth corners and upper lip, tapering from the corners / centre.
  spread = np.clip(np.abs(points[lips, 0] - cx) / (half_width * identity.mouth_width), 0.0, 1.0)
  points[lips, 1] -= 0.025 * expression.mouth_corner * alpha * spread ** 2
  upper = _UPPER_LIPS
  points[upper, 1] -= 0.015 * expression.upper_lip * alpha * (1 - np.clip(
    np.abs(points[upper, 0] - cx) / (half_width * identity.mouth_width), 0.0, 1.0) ** 2)
  # Jaw: the lower lip and chin follow the opening.
  points[:, 1] += 0.10 * mouth_open * _jaw_weights(template_landmarks())
  points[:, 1] *= identity.face_length
  return points, eye_open


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
  y, p, r = np.radians([yaw, pitch, roll])
  yaw_m = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
  pitch_m = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
  roll_m = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
  return roll_m @ pitch_m @ yaw_m


_HEAD_CENTRE = np.array([0.0, 0.25, 0.45])  # rotation pivot, face units (behind the face)
# Face units -> crop: the crop is what `faces.clip_crop_box` takes around a real face (face size
# x1.9, centre shifted down by 5%), so synthetic frames look like prepared real ones.
_CROP_SCALE = 1.0 / faces.CropConfig().enlarge
_CROP_CENTRE = np.array([0.5, 0.5 - faces.CropConfig().shift_down])
_FACE_BOX_CENTRE_Y = 0.2  # the template's landmark box centre (forehead -0.3 .. chin 0.7)


def project(points: np.ndarray, pose: np.ndarray, identity: Identity, face_scale: float = 1.0
            ) -> np.ndarray:
  """Face-unit points (N, 3) -> crop coordinates in [0, 1] (N, 2) under a pose row (6,);
  `face_scale` > 1 frames the face tighter than the training crop (a closer camera)."""
  yaw, pitch, roll, tx, ty, scale = pose
  rotated = (points - _HEAD_CENTRE) @ _rotation(yaw, pitch, roll).T + _HEAD_CENTRE
  xy = rotated[:, :2] - [0.0, _FACE_BOX_CENTRE_Y]
  return _CROP_CENTRE + [tx, ty] + xy * _CROP_SCALE * identity.head_scale * scale * face_scale


def hair_points(points: np.ndarray, identity: Identity) -> tuple[np.ndarray, np.ndarray]:
  """(back hair outline, fringe outline) in face units (N, 3), from the face oval."""
  oval = points[list(faces.FACE_OVAL)]
  centre = np.array([0.0, 0.18, 0.0])
  volume = 1.12 if identity.hair_style != 2 else 1.04
  back = centre + (oval - centre) * [volume, volume, 1.0]
  back[:, 2] += 0.05
  if identity.hair_style == 1:  # long hair falls to the shoulders beside the face, not under it
    low = back[:, 1] > 0.2
    lateral = np.clip((np.abs(back[low, 0]) - 0.2) / 0.25, 0.0, 1.0)
    back[low, 1] = 0.2 + (back[low, 1] + 0.45 - 0.2) * lateral
    back[low, 0] *= 1.15
  hairline_y = -identity.hairline - 0.05 * (identity.hair_style == 2)
  top = back[back[:, 1] < hairline_y + 0.06]
  arc_x = np.linspace(top[:, 0].max(), top[:, 0].min(), 9)
  arc = np.stack([arc_x, hairline_y + 0.10 * (arc_x / max(abs(arc_x).max(), 1e-6)) ** 2,
                  np.full(9, -0.1)], 1)
  fringe = np.concatenate([top[np.argsort(np.arctan2(top[:, 1] - 0.18, top[:, 0]))], arc[::-1]])
  return back, fringe
