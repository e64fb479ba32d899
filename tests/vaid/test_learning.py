"""Learning checks of V-AID on the synthetic talking-heads dataset (docs/ARCHITECTURE.md §3.3-§3.4).

Clips of the tiny synthetic set go through the Grain loader and `VAIDFeaturizer`: A_w from a tiny
random wav2vec2, l_v / e_v from a random-weight PD-FGC small encoder on the frames. The fast test
checks that one loader batch becomes examples both models train on; the slow ones (run with
`-m slow`) check that the projector's pull loss and Di-CTE's x0 loss fall at least 10x (and end
well below what predicting each target's mean would give), and that a 500-frame Di-CTE
generation with 220-frame windows and 20-frame held prefixes has no jump at a window boundary
larger than the typical frame-to-frame change inside its windows.
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from data_pipeline import loader, synthetic
from data_pipeline.builders import synthetic_talking_heads
from etalk_jax.audio import AudioFeatures, FeatureConfig, Wav2Vec2, Wav2Vec2Config
from etalk_jax.vaid import data
from etalk_jax.vaid.dicte import DiCTE, DiCTEConfig, dicte_loss, generate_expressions
from etalk_jax.vaid.projector import AudioLipProjector, ProjectorConfig, pull_loss
from etalk_jax.vision.pdfgc import PDFGC_SMALL, AdaptedPDFGC

TINY_WAV2VEC2 = Wav2Vec2Config(hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                               intermediate_size=32, conv_dim=(16,) * 7,
                               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
# Short transformer chunks: the tiny clips compile one small bucket.
TINY_FEATURES = FeatureConfig(chunk_frames=100, context_frames=10, bucket_frames=(60, 100))
CLIP_FRAMES = 48  # the tiny synthetic set's clip length


@pytest.fixture(scope="module")
def featurizer():
  return data.VAIDFeaturizer(AudioFeatures(Wav2Vec2(TINY_WAV2VEC2, rngs=nnx.Rngs(0)),
                                           TINY_FEATURES),
                             AdaptedPDFGC(PDFGC_SMALL, rngs=nnx.Rngs(1)))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  return synthetic_talking_heads.build(str(tmp_path_factory.mktemp("synthetic")), "tiny")


def _loader_batches(dataset_dir, window: int, batch_size: int):
  config = loader.LoaderConfig(window=window, batch_size=batch_size, num_epochs=1, seed=0,
                               num_workers=0, shard_index=0, shard_count=1)
  return list(loader.make_dataset(dataset_dir, "train", config))


@pytest.fixture(scope="module")
def whole_clips(dataset_dir, featurizer):
  """Every training clip of the tiny set, whole (48 frames), as examples."""
  return data.concatenate([featurizer.from_batch(batch)
                           for batch in _loader_batches(dataset_dir, CLIP_FRAMES, 1)])


def _train_projector(featurizer, examples, steps: int) -> list[float]:
  config = featurizer.projector_config(ProjectorConfig.tiny())
  model = AudioLipProjector(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, audio_windows, lip):
    loss, grads = nnx.value_and_grad(lambda m: pull_loss(m(audio_windows), lip))(model)
    optimizer.update(model, grads)
    return loss

  return [float(train_step(model, optimizer, examples.audio_windows, examples.lip))
          for _ in range(steps)]


def _train_dicte(config: DiCTEConfig, examples, steps: int, *, batch_size: int,
                 learning_rate: float) -> tuple[DiCTE, list[float]]:
  """Adam (warm-up, cosine decay) on random `window_frames`-long windows of the clips."""
  model = DiCTE(config, rngs=nnx.Rngs(0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps // 4), steps,
                                                0.05 * learning_rate)
  optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, key, windows):
    loss, grads = nnx.value_and_grad(lambda m: dicte_loss(
        m, key, windows.expression, windows.audio_windows, windows.reference,
        windows.reference_expression))(model)
    optimizer.update(model, grads)
    return loss

  rng, key = np.random.default_rng(0), jax.random.key(0)
  losses = [float(train_step(model, optimizer, jax.random.fold_in(key, step),
                             data.random_windows(rng, examples, batch_size,
                                                 config.window_frames)))
            for step in range(steps)]
  return model, losses


def _drop(losses: list[float]) -> float:
  return float(np.mean(losses[:3]) / np.mean(losses[-10:]))


def test_loader_batch_becomes_examples_both_models_learn_from(dataset_dir, featurizer):
  window = 24
  examples = featurizer.from_batch(_loader_batches(dataset_dir, window, 2)[0])
  lip_dim, expression_dim = PDFGC_SMALL.feature_dim, PDFGC_SMALL.expression_dim
  assert examples.audio_windows.shape == (2, window, 5, 3, 16)
  assert examples.lip.shape == (2, window, lip_dim)
  assert examples.expression.shape == (2, window, expression_dim)
  assert examples.reference.shape == (2, 64, 64, 3)
  assert examples.reference_expression.shape == (2, expression_dim)
  assert all(np.isfinite(a).all() and a.dtype == np.float32 for a in examples)
  # Different frames, different targets: the encoders see the pixels.
  assert np.std(examples.lip, axis=1).mean() > 1e-3
  projector_losses = _train_projector(featurizer, examples, 25)
  assert _drop(projector_losses) >= 2, projector_losses[::5]
  _, dicte_losses = _train_dicte(featurizer.dicte_config(DiCTEConfig.tiny()), examples, 25,
                                 batch_size=8, learning_rate=3e-3)
  assert _drop(dicte_losses) >= 2, dicte_losses[::5]


@pytest.mark.slow
def test_projector_pull_loss_falls_tenfold(whole_clips, featurizer):
  losses = _train_projector(featurizer, whole_clips, 300)
  lip = whole_clips.lip.reshape(-1, whole_clips.lip.shape[-1])
  mean_predictor = float(np.abs(lip - lip.mean(axis=0)).mean())
  print(f"projector pull loss {losses[0]:.4f} -> {np.mean(losses[-10:]):.4f} "
        f"({_drop(losses):.1f}x); predicting the mean l_v: {mean_predictor:.4f}")
  assert _drop(losses) >= 10, losses[::30]
  assert np.mean(losses[-10:]) < mean_predictor / 2


@pytest.mark.slow
def test_dicte_loss_falls_tenfold(whole_clips, featurizer):
  _, losses = _train_dicte(featurizer.dicte_config(DiCTEConfig.tiny()), whole_clips, 300,
                           batch_size=16, learning_rate=3e-3)
  expression = whole_clips.expression.reshape(-1, whole_clips.expression.shape[-1])
  mean_predictor = float(np.mean(np.square(expression - expression.mean(axis=0))))
  print(f"Di-CTE x0 loss {losses[0]:.4f} -> {np.mean(losses[-10:]):.5f} ({_drop(losses):.0f}x); "
        f"predicting the mean e_v: {mean_predictor:.5f}")
  assert _drop(losses) >= 10, losses[::30]
  assert np.mean(losses[-10:]) < mean_predictor / 2


def _frame_changes(expressions: np.ndarray, config: DiCTEConfig) -> tuple[np.ndarray, np.ndarray]:
  """(changes across window boundaries, changes inside windows) of a generated `(frames, dim)`
  sequence; a change is the L2 norm of e[i + 1] - e[i], and window k > 0 starts generating new
  frames at window_frames + (k - 1) (window_frames - prefix_frames)."""
  changes = np.linalg.norm(np.diff(expressions, axis=0), axis=-1)
  stride = config.window_frames - config.prefix_frames
  boundaries = np.arange(config.window_frames, len(expressions), stride) - 1
  return changes[boundaries], np.delete(changes, boundaries)


@pytest.mark.slow
def test_500_frame_generation_has_no_jump_at_window_boundaries(featurizer):
  """Di-CTE at the real window sizes (220 frames, 20 held clean) trained on e_v of synthetic
  clips, then 500 frames of a held-out clip's speech: 3 windows, 2 boundaries, for 4 noise
  seeds. Each boundary's change must be an ordinary in-window change (at most the 90th
  percentile of that generation's changes inside windows), and the boundaries' mean change at
  most the in-window 75th percentile."""
  emotions = ("happy", "sad", "angry", "surprised", "worried", "disgusted")
  train = data.concatenate([
      featurizer.from_clip(synthetic.make_clip(synthetic.make_identity(index % 3), emotion, 3,
                                               300, 64, take=index))
      for index, emotion in enumerate(emotions)])
  held_out = featurizer.from_clip(synthetic.make_clip(synthetic.make_identity(3), "fearful", 3,
                                                      500, 64))
  # dim 64 / 2 blocks / 400 steps left a seam 1.3-1.6x the mean change; this size learns the
  # continuation from the held prefix.
  config = featurizer.dicte_config(dataclasses.replace(
      DiCTEConfig.tiny(), dim=128, num_blocks=3, window_frames=220, prefix_frames=20,
      sample_steps=25))
  model, losses = _train_dicte(config, train, 800, batch_size=8, learning_rate=2e-3)
  jumps, inside_p75 = [], []
  for seed in range(4):
    generated = np.asarray(generate_expressions(
        model, jax.random.key(seed), held_out.audio_windows, held_out.reference,
        held_out.reference_expression))[0]
    assert generated.shape == (500, PDFGC_SMALL.expression_dim)
    at_boundaries, inside = _frame_changes(generated, config)
    assert len(at_boundaries) == 2
    print(f"seed {seed}: boundary jumps {np.round(at_boundaries, 4)}; inside windows median "
          f"{np.median(inside):.4f}, mean {inside.mean():.4f}, "
          f"p90 {np.percentile(inside, 90):.4f}, max {inside.max():.4f}")
    assert at_boundaries.max() <= np.percentile(inside, 90), (seed, at_boundaries)
    jumps.append(at_boundaries)
    inside_p75.append(np.percentile(inside, 75))
  print(f"Di-CTE loss {np.mean(losses[:3]):.4f} -> {np.mean(losses[-10:]):.5f}; mean boundary "
        f"jump {np.mean(jumps):.4f} vs in-window p75 {np.mean(inside_p75):.4f}")
  assert np.mean(jumps) <= np.mean(inside_p75)
