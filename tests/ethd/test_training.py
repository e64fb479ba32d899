"""A tiny ETHD overfits one synthetic talking-head clip on the CPU
(docs/ARCHITECTURE.md §3.5, §3.7).

Latents are the clip's frames area-downsampled 8x (SVD's VAE factor) to 8x8, RGB in [-1, 1]
plus their luma as the 4th channel: no VAE, so the test measures the backbone and the objective
only. Lip latents are the synthetic clip's mouth opening, expression latents its eye opening and
head pose (ground-truth tracks standing in for l_v / e_v); the reference is another frame of the
clip. The EDM objective (`etalk_jax.diffusion.edm`) is evaluated on a fixed set of sigmas with
fixed noise, so the loss is deterministic and must fall by memorising the clip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data_pipeline import loader
from data_pipeline.builders import synthetic_talking_heads
from etalk_jax.diffusion.edm import denoise, weighted_loss
from etalk_jax.ethd import ETHD, ETHDConfig
from etalk_jax.ethd.edi import area_downsample
from etalk_jax.svd import UNetConfig

FRAMES, LATENT = 4, 8
SIGMAS = (0.1, 0.4, 1.2, 4.0)  # spans the log-normal's bulk (ln sigma ~ N(0.7, 1.6^2))
# One level (cross-attention down and up blocks around the mid block): every ETHD layer kind,
# and half the compile time of two levels on a small CPU.
TINY_UNET = UNetConfig(
    sample_size=LATENT, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",),
    up_block_types=("CrossAttnUpBlockSpatioTemporal",),
    block_out_channels=(32,), addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=12, layers_per_block=1, cross_attention_dim=16,
    transformer_layers_per_block=1, num_attention_heads=2, num_frames=FRAMES)


def frames_to_latents(frames: np.ndarray) -> np.ndarray:
  """uint8 `(..., H, W, 3)` -> `(..., H/8, W/8, 4)`: area-downsampled RGB in [-1, 1] and luma."""
  pixels = frames.astype(np.float32) / 127.5 - 1
  lead, (height, width) = pixels.shape[:-3], pixels.shape[-3:-1]
  planes = np.moveaxis(pixels, -1, -3).reshape(-1, height, width)
  small = np.asarray(area_downsample(planes, height // 8, width // 8))
  rgb = np.moveaxis(small.reshape(lead + (3, height // 8, width // 8)), -3, -1)
  luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
  return np.concatenate([rgb, luma[..., None]], axis=-1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  dataset_dir = synthetic_talking_heads.build(str(tmp_path_factory.mktemp("synthetic")), "tiny")
  config = loader.LoaderConfig(window=FRAMES, batch_size=1, seed=0, num_workers=0,
                               shard_index=0, shard_count=1)
  window = next(iter(loader.make_dataset(dataset_dir, "train", config)))
  expression = np.concatenate([window["eye_open"][..., None], window["pose"]], axis=-1)
  batch = len(SIGMAS)  # the clip once per sigma
  repeat = lambda x: np.repeat(np.asarray(x, np.float32), batch, axis=0)
  clean = repeat(frames_to_latents(window["frames"]))
  return dict(
      clean=clean,
      reference=repeat(np.repeat(frames_to_latents(window["reference"])[:, None], FRAMES, 1)),
      lip=repeat(window["mouth_open"][..., None]), expression=repeat(expression),
      reference_expression=repeat(expression[:, 0]), face_mask=repeat(window["face_mask"]),
      sigma=np.asarray(SIGMAS, np.float32),
      noise=np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32))


def loss_fn(model: ETHD, clip: dict) -> jax.Array:
  def render(scaled, c_noise):
    return model(jnp.concatenate([scaled, clip["reference"]], -1), c_noise, clip["lip"],
                 clip["expression"], clip["reference_expression"], clip["face_mask"])
  noisy = clip["clean"] + clip["sigma"][:, None, None, None, None] * clip["noise"]
  return weighted_loss(denoise(render, noisy, clip["sigma"]), clip["clean"], clip["sigma"])


@nnx.jit
def train_step(model: ETHD, optimizer: nnx.Optimizer, clip: dict) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, clip)
  optimizer.update(model, grads)
  return loss


def overfit(clip: dict, steps: int, learning_rate: float = 2e-3) -> tuple[float, float]:
  """(loss before, loss after `steps` adam steps), both evaluated on the fixed sigmas."""
  model = ETHD(ETHDConfig(unet=TINY_UNET, lip_dim=1, expression_dim=7), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
  # The loss a step returns is the one before its update: step `steps + 1` reports the trained
  # model's loss without compiling a separate evaluation.
  losses = [float(train_step(model, optimizer, clip)) for _ in range(steps + 1)]
  first, final = losses[0], losses[-1]
  print(f"tiny ETHD, one {FRAMES}-frame clip: loss {first:.4f} -> {final:.4f} in {steps} "
        f"steps ({first / final:.1f}x)")
  return first, final


def test_latents_come_from_the_frames(clip):
  assert clip["clean"].shape == (len(SIGMAS), FRAMES, LATENT, LATENT, 4)
  assert -1 <= clip["clean"].min() and clip["clean"].max() <= 1
  np.testing.assert_allclose(clip["clean"][..., 3],
                             clip["clean"][..., :3] @ np.array([0.299, 0.587, 0.114]), atol=1e-6)


def test_tiny_ethd_loss_falls_smoke(clip):
  first, final = overfit(clip, steps=10)
  assert final < 0.5 * first


@pytest.mark.slow
def test_tiny_ethd_overfits_one_clip(clip):
  first, final = overfit(clip, steps=60)
  assert final * 10 <= first
