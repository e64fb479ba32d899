"""The synthetic face's rasteriser: draws an identity's projected face, hair, eyes and mouth over a
static background and body."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline import faces
from data_pipeline.synthetic.face_mesh import INNER_UPPER_LIP, hair_points, project
from data_pipeline.synthetic.identity import Identity


def _supersampling(resolution: int) -> int:
  return 4 if resolution <= 128 else 2 if resolution <= 384 else 1


class Renderer:
  """Draws one identity's frames at one resolution (the static background is drawn once)."""

  def __init__(self, identity: Identity, resolution: int, face_scale: float = 1.0):
    self.identity = identity
    self.resolution = resolution
    self.face_scale = face_scale
    self.size = resolution * _supersampling(resolution)
    size = self.size
    ramp = np.linspace(0, 1, size)[:, None, None]
    background = ((1 - ramp) * np.array(identity.background_top)
                  + ramp * np.array(identity.background_bottom))
    image = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # Shoulders and neck do not follow the head's sway: the body stays put as in real footage.
    neck = project(np.array([[-0.17, 0.45, 0.2], [0.17, 0.45, 0.2], [0.2, 1.3, 0.2],
                             [-0.2, 1.3, 0.2]]),
                   np.array([0, 0, 0, 0, 0, 1.0]), identity, face_scale) * size
    draw.ellipse((size * -0.05, size * 0.86, size * 1.05, size * 1.6), fill=identity.shirt)
    shade = tuple(int(c * 0.85) for c in identity.skin)
    draw.polygon([tuple(p) for p in neck], fill=shade)
    self.background = image

  def __call__(self, points_3d: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame (R, R, 3) uint8 and its landmarks (478, 2) in [0, 1] crop coordinates."""
    identity, size = self.identity, self.size
    landmarks = project(points_3d, pose, identity, self.face_scale)
    pixels = landmarks * size
    polygon = lambda index: [tuple(p) for p in pixels[list(index)]]  # noqa: E731
    back_hair, fringe = (project(p, pose, identity, self.face_scale) * size
                         for p in hair_points(points_3d, identity))
    image = self.background.copy()
    draw = ImageDraw.Draw(image)
    draw.polygon([tuple(p) for p in back_hair], fill=identity.hair)
    draw.polygon(polygon(faces.FACE_OVAL), fill=identity.skin)
    draw.polygon([tuple(p) for p in fringe], fill=identity.hair)
    height = np.linalg.norm(pixels[faces.CHIN] - pixels[faces.FOREHEAD_TOP])
    brow_colour = tuple(int(c * 0.7) for c in identity.hair)
    for brow in (faces.RIGHT_BROW, faces.LEFT_BROW):
      draw.polygon(polygon(brow), fill=brow_colour)
      draw.line(polygon(brow) + polygon(brow)[:1], fill=brow_colour,
                width=max(1, int(0.012 * height * identity.brow_thickness)))
    nose_colour = tuple(int(c * 0.78) for c in identity.skin)
    draw.line([tuple(pixels[i]) for i in (168, 197, 5, 4)],
              fill=tuple(int(c * 0.9) for c in identity.skin), width=max(1, int(0.015 * height)))
    for nostril in (98, 327):
      x, y = pixels[nostril]
      r = 0.018 * height
      draw.ellipse((x - r, y - r * 0.6, x + r, y + r * 0.6), fill=nose_colour)
    # Eyes: white, then iris and pupil clipped to the eye opening.
    eye_mask = Image.new("L", (size, size), 0)
    mask_draw = ImageDraw.Draw(eye_mask)
    for eye in (faces.RIGHT_EYE, faces.LEFT_EYE):
      draw.polygon(polygon(eye), fill=(245, 245, 240))
      mask_draw.polygon(polygon(eye), fill=255)
    irises = image.copy()
    iris_draw = ImageDraw.Draw(irises)
    for eye, iris in ((faces.RIGHT_EYE, faces.RIGHT_IRIS), (faces.LEFT_EYE, faces.LEFT_IRIS)):
      x, y = pixels[iris[0]]
      r = 0.3 * np.ptp(pixels[list(eye), 0])
      iris_draw.ellipse((x - r, y - r, x + r, y + r), fill=identity.iris)
      iris_draw.ellipse((x - r * 0.45, y - r * 0.45, x + r * 0.45, y + r * 0.45), fill=(10, 10, 10))
    image.paste(irises, mask=eye_mask)
    for eye in (faces.RIGHT_EYE, faces.LEFT_EYE):
      draw.line(polygon(eye) + polygon(eye)[:1], fill=(40, 30, 30),
                width=max(1, int(0.008 * height)))
    # Mouth: lips, then the dark opening with upper teeth clipped to it.
    draw.polygon(polygon(faces.LIPS_OUTER), fill=identity.lips)
    inner = polygon(faces.LIPS_INNER)
    if np.ptp(pixels[list(faces.LIPS_INNER), 1]) > 0.5:
      mouth_mask = Image.new("L", (size, size), 0)
      ImageDraw.Draw(mouth_mask).polygon(inner, fill=255)
      cavity = image.copy()
      cavity_draw = ImageDraw.Draw(cavity)
      cavity_draw.polygon(inner, fill=(70, 20, 25))
      teeth = pixels[INNER_UPPER_LIP]
      teeth_bottom = teeth + [0, 0.03 * height]
      cavity_draw.polygon([tuple(p) for p in np.concatenate([teeth, teeth_bottom[::-1]])],
                          fill=(235, 232, 220))
      image.paste(cavity, mask=mouth_mask)
    frame = (image.resize((self.resolution, self.resolution), Image.Resampling.BOX)
             if size != self.resolution else image)
    return np.asarray(frame), landmarks.astype(np.float32)
