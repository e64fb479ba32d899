"""The demo's PD-FGC stand-in: pretrained on the synthetic renderer's ground truth, its mouth
feature follows the mouth, which the random encoder it starts from does not; it saves as `etalk
convert pdfgc` does. (Its emotion read-out on identities it never saw needs the demo's 16
training identities: 0.10 random, 0.50 pretrained, docs/notes/2026-12-06-demo-chain.md; on the
tiny set's few clips a least-squares read-out of random e_v already separates them in-sample.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline.builders import synthetic_talking_heads
from data_pipeline.loader import data_source
from etalk_jax.demo import pdfgc_standin
from etalk_jax.demo.report import clip_from_record
from etalk_jax.vision.alignment import pdfgc_inputs
from etalk_jax.vision.params import load_pdfgc
from etalk_jax.vision.pdfgc import PDFGC_SMALL


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synthetic_talking_heads.build(str(tmp_path_factory.mktemp("synthetic")), "tiny",
                                       progress=False)


def _mouth_read_out(folder, dataset_dir) -> float:
  """Correlation of a least-squares read-out of l_v with the mouth opening, on the training
  clips' frames."""
  encoder = load_pdfgc(folder)
  encode = jax.jit(lambda frames, landmarks: tuple(
      encoder(pdfgc_inputs(frames, landmarks, PDFGC_SMALL.image_size))[:1]))
  source = data_source(dataset_dir, "train")
  lips, mouth = [], []
  for index in range(len(source)):
    clip = clip_from_record(source[index])
    lips.append(np.asarray(encode(clip.frames, clip.landmarks_px)[0]))
    mouth.append(clip.mouth_open)
  x = np.concatenate([np.concatenate(lips), np.ones((sum(map(len, lips)), 1))], 1)
  mouth = np.concatenate(mouth)
  return float(np.corrcoef(x @ np.linalg.lstsq(x, mouth, rcond=None)[0], mouth)[0, 1])


def test_the_pretrained_stand_in_reads_the_mouth_where_the_random_one_does_not(
    dataset, tmp_path):
  random_folder, trained_folder = tmp_path / "random", tmp_path / "trained"
  pdfgc_standin.pretrain_pdfgc(dataset, random_folder, steps=0, progress=False)
  summary = pdfgc_standin.pretrain_pdfgc(dataset, trained_folder, steps=150, batch_size=32,
                                         progress=False)
  assert "150 steps" in summary
  random_mouth = _mouth_read_out(random_folder, dataset)
  mouth = _mouth_read_out(trained_folder, dataset)
  # Measured: 0.945 against 0.741, i.e. 11% of the mouth's variance unexplained against 45%.
  assert mouth > 0.9 and 1 - mouth**2 < 0.5 * (1 - random_mouth**2), (mouth, random_mouth)
  # A finished folder is kept, not retrained.
  again = pdfgc_standin.pretrain_pdfgc(dataset, trained_folder, steps=150, progress=False)
  assert "already pretrained" in again


def test_recolouring_permutes_scales_and_shifts_each_images_channels():
  images = jax.random.uniform(jax.random.key(0), (6, 8, 8, 3), minval=-0.5, maxval=0.5)
  out = pdfgc_standin.recoloured(jax.random.key(1), images)
  assert out.shape == images.shape and float(jnp.abs(out).max()) <= 1.0
  for image, recoloured in zip(np.asarray(images), np.asarray(out)):
    # Every output channel is an affine function of one input channel (a permutation).
    sources = []
    for channel in range(3):
      fits = [abs(np.corrcoef(image[..., source].ravel(), recoloured[..., channel].ravel())[0, 1])
              for source in range(3)]
      assert max(fits) > 0.999, fits
      sources.append(int(np.argmax(fits)))
    assert sorted(sources) == [0, 1, 2]
