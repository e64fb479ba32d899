"""The demo's stand-in for PD-FGC's pretrained weights.

EmotiveTalk freezes a pretrained PD-FGC motion encoder and trains only adapters on it
(docs/ARCHITECTURE.md §3.9); upstream's weights were trained on real video, so that its mouth
feature follows the lips and its expression embedding the emotion. Offline there are no weights,
and a randomly initialised tiny PD-FGC encodes neither: on the demo's held-out identities its
(adapted) l_v predicted the mouth opening at r = 0.22 and its e_v read the emotion at 0.10
(chance 0.125) after the encoder stage (docs/notes/2026-12-06-demo-chain.md). Every later stage
learns from those features, so the demo pretrains the tiny encoder first, as upstream's was, on
what the synthetic renderer knows of each training frame: linear read-outs of its heads predict
the mouth opening from l_v, the emotion from e_v, the eye opening and the head pose from the pose
and eye heads. The read-outs are dropped; the encoder is saved as `etalk convert pdfgc` saves
one. Held-out identities are never seen.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from data_pipeline import EMOTION_LABELS
from data_pipeline.loader import data_source
from etalk_jax import parallel
from etalk_jax.demo.report import clip_from_record
from etalk_jax.vision.alignment import pdfgc_inputs
from etalk_jax.vision.params import save_pdfgc
from etalk_jax.vision.pdfgc import PDFGC_SMALL, PDFGCEncoder


class ReadOuts(nnx.Module):
  """Linear read-outs of the encoder's codes: mouth opening from l_v, emotion logits from e_v,
  eye opening from the eye embedding, the six pose values from the pose embedding."""

  def __init__(self, config, emotions: int, *, rngs: nnx.Rngs):
    self.mouth = nnx.Linear(config.feature_dim, 1, rngs=rngs)
    self.emotion = nnx.Linear(config.expression_dim, emotions, rngs=rngs)
    self.eye = nnx.Linear(config.eye_dim, 1, rngs=rngs)
    self.pose = nnx.Linear(config.pose_dim, 6, rngs=rngs)


class StandIn(nnx.Module):
  def __init__(self, encoder: PDFGCEncoder, emotions: int, *, rngs: nnx.Rngs):
    self.encoder = encoder
    self.read_outs = ReadOuts(encoder.config, emotions, rngs=rngs)


def training_frames(dataset_dir: str, every: int = 2, chunk: int = 256
                    ) -> dict[str, np.ndarray]:
  """Every `every`-th frame of the training split, aligned as PD-FGC reads faces (float16
  `(n, S, S, 3)` in [-1, 1]), with the renderer's ground truth: mouth opening, emotion index,
  eye opening, pose `(n, 6)`."""
  size = PDFGC_SMALL.image_size
  align = jax.jit(lambda frames, landmarks: pdfgc_inputs(frames, landmarks, size))
  source = data_source(dataset_dir, "train")
  images, mouth, emotion, eye, pose = [], [], [], [], []
  for index in range(len(source)):
    record = source[index]
    clip = clip_from_record(record)
    frames, landmarks = clip.frames[::every], clip.landmarks_px[::every]
    for start in range(0, len(frames), chunk):
      images.append(np.asarray(align(frames[start:start + chunk],
                                     landmarks[start:start + chunk]), np.float16))
    mouth.append(clip.mouth_open[::every])
    eye.append(np.asarray(record["eye_open"], np.float32)[::every])
    pose.append(np.asarray(record["pose"], np.float32)[::every])
    emotion.append(np.full(len(frames), EMOTION_LABELS.index(clip.emotion), np.int32))
  return {"images": np.concatenate(images), "mouth": np.concatenate(mouth),
          "emotion": np.concatenate(emotion), "eye": np.concatenate(eye),
          "pose": np.concatenate(pose)}


def recoloured(key: jax.Array, images: jax.Array) -> jax.Array:
  """Each image `(n, S, S, 3)` in [-1, 1] with its colour channels shuffled and each scaled and
  shifted at random: identities differ mostly in colour (skin, hair, background), expressions in
  shape, and with 8-20 training identities an encoder otherwise tells emotions apart by who
  shows them."""
  permute_key, gain_key, shift_key = jax.random.split(key, 3)
  count = images.shape[0]
  order = jax.vmap(lambda k: jax.random.permutation(k, 3))(jax.random.split(permute_key, count))
  shuffled = jnp.take_along_axis(images, order[:, None, None, :], axis=-1)
  gain = jax.random.uniform(gain_key, (count, 1, 1, 3), minval=0.6, maxval=1.4)
  shift = jax.random.uniform(shift_key, (count, 1, 1, 3), minval=-0.3, maxval=0.3)
  return jnp.clip(shuffled * gain + shift, -1.0, 1.0)


def _standardised(values: np.ndarray) -> np.ndarray:
  return (values - values.mean(0)) / (values.std(0) + 1e-6)


def pretrain_pdfgc(dataset_dir: str, folder: Path, *, steps: int, batch_size: int = 64,
                   learning_rate: float = 1e-3, seed: int = 1, progress: bool = True) -> str:
  """Pretrains the tiny PD-FGC (`PDFGC_SMALL`, seeded) on the training split's ground truth and
  saves it to `folder` (unless it exists); returns a summary line."""
  folder = Path(folder)
  if folder.exists():
    return f"{folder} exists: already pretrained"
  data = training_frames(dataset_dir)
  targets = {"mouth": _standardised(data["mouth"]), "eye": _standardised(data["eye"]),
             "pose": _standardised(data["pose"]), "emotion": data["emotion"]}
  encoder = parallel.create_sharded(lambda rngs: PDFGCEncoder(PDFGC_SMALL, rngs=rngs),
                                    parallel.make_mesh({"data": -1}), seed=seed)
  model = StandIn(encoder, len(EMOTION_LABELS), rngs=nnx.Rngs(seed))
  # BatchNorm on batch statistics while it trains (its running averages are what the frozen
  # encoder then uses): without it the random trunk's activations drift and some runs learnt
  # nothing in 400 steps.
  model.train()
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

  def losses(model: StandIn, images, batch):
    codes = model.encoder(images.astype(jnp.float32))
    logits = model.read_outs.emotion(codes.expression)
    terms = {
        "mouth": jnp.mean((model.read_outs.mouth(codes.lip)[:, 0] - batch["mouth"]) ** 2),
        "emotion": optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                   batch["emotion"]).mean(),
        "eye": jnp.mean((model.read_outs.eye(codes.eye)[:, 0] - batch["eye"]) ** 2),
        "pose": jnp.mean((model.read_outs.pose(codes.pose) - batch["pose"]) ** 2)}
    terms["emotion_accuracy"] = jnp.mean(logits.argmax(-1) == batch["emotion"])
    return terms["mouth"] + terms["emotion"] + terms["eye"] + terms["pose"], terms

  @nnx.jit
  def step(model: StandIn, optimizer: nnx.Optimizer, images, batch, key):
    images = recoloured(key, images.astype(jnp.float32))
    (_, terms), grads = nnx.value_and_grad(losses, has_aux=True)(model, images, batch)
    optimizer.update(model, grads)
    return terms

  rng = np.random.default_rng(seed)
  keys = jax.random.split(jax.random.key(seed), steps)
  count = len(data["images"])
  bar = tqdm(range(steps), desc="pretrain PD-FGC stand-in", unit="step", disable=not progress)
  for index in bar:
    pick = rng.integers(0, count, batch_size)
    terms = step(model, optimizer, data["images"][pick],
                 {name: value[pick] for name, value in targets.items()}, keys[index])
    if progress and index % 25 == 0:  # reading the loss waits for the step: not every step
      bar.set_postfix(mouth=f"{float(terms['mouth']):.3f}",
                      emotion_acc=f"{float(terms['emotion_accuracy']):.2f}")
  model.eval()
  save_pdfgc(model.encoder, folder)
  if not steps:
    return f"PD-FGC stand-in: not trained (0 steps), saved as initialised: {folder}"
  terms = {name: float(value) for name, value in terms.items()}
  return (f"PD-FGC stand-in: {steps} steps on {count} training frames; last batch: mouth error "
          f"{terms['mouth']:.3f} (of unit variance), emotion accuracy "
          f"{terms['emotion_accuracy']:.2f}, eye {terms['eye']:.3f}, pose {terms['pose']:.3f}")
