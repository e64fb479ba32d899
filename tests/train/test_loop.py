"""The training loop (etalk_jax/train/loop.py): optimizer pieces, gradient accumulation, and a
real stage (the projector on the tiny synthetic set, 8-bit Adam as the full configs train) run
through `etalk train`, resumed, exported.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data_pipeline.builders import synthetic_talking_heads
from etalk_jax import cli, model_io
from etalk_jax.audio import Wav2Vec2
from etalk_jax.audio.params import save_speech_encoder
from etalk_jax.diffusion.sampling import WINDOWS_512, WINDOWS_1024
from etalk_jax.ethd import ETHD
from etalk_jax.train import loop, stages
from etalk_jax.train.config import config_file, load_config
from etalk_jax.train.stages.common import dicte_condition, ethd_config
from etalk_jax.vaid.storage import load_dicte, load_projector
from etalk_jax.vision.params import save_pdfgc
from etalk_jax.vision.pdfgc import PDFGC_SMALL, PDFGCEncoder
from tests.vaid.test_learning import TINY_WAV2VEC2

CONFIGS = Path(__file__).parents[2] / "configs"


def test_schedules_warm_up_then_hold_or_decay():
  constant = loop.learning_rate_schedule({"lr": 1.0, "warmup_steps": 4}, 100)
  assert [float(constant(s)) for s in (0, 2, 4, 50)] == [0.0, 0.5, 1.0, 1.0]
  cosine = loop.learning_rate_schedule({"lr": 1.0, "warmup_steps": 2, "schedule": "cosine",
                                        "final_lr_fraction": 0.1}, 10)
  assert float(cosine(2)) == pytest.approx(1.0) and float(cosine(10)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="constant.*cosine"):
    loop.learning_rate_schedule({"lr": 1.0, "schedule": "linear"}, 10)


def test_params_ema_averages_the_updated_parameters():
  tx = optax.chain(optax.sgd(1.0), loop.params_ema(0.5))
  params = {"w": jnp.array([2.0])}
  state = tx.init(params)
  for grad in (1.0, 1.0):
    updates, state = tx.update({"w": jnp.array([grad])}, state, params)
    params = optax.apply_updates(params, updates)
  # ema: 2 -> 0.5 * 2 + 0.5 * 1 = 1.5 -> 0.5 * 1.5 + 0.5 * 0 = 0.75
  np.testing.assert_allclose(state[1]["ema"]["w"], [0.75])
  np.testing.assert_allclose(params["w"], [0.0])


class _Regression(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 1, rngs=rngs)
    self.frozen = nnx.Linear(3, 3, rngs=rngs)


def _regression_task(model) -> loop.Task:
  def loss(model, batch, key):
    del key
    prediction = model.linear(model.frozen(batch["x"]))
    return jnp.mean((prediction - batch["y"]) ** 2), {"mean_prediction": jnp.mean(prediction)}
  return loop.Task(name="regression", model=model,
                   trainable=nnx.All(nnx.Param, nnx.PathContains("linear")), loss=loss,
                   batches=iter(()), export=lambda model, folder: None)


def _one_step(accumulation: int, batch):
  model = _Regression(nnx.Rngs(0))
  task = _regression_task(model)
  tx, schedule = loop.make_optimizer({"name": "adam", "lr": 0.1, "clip_norm": 1.0}, 10)
  optimizer = nnx.Optimizer(model, tx, wrt=task.trainable)
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(loop.make_step(task, graphdef, accumulation, schedule))
  state, metrics = step(state, batch, jax.random.key(0))
  model, _ = nnx.merge(graphdef, state)
  return model, metrics


def test_gradient_accumulation_equals_one_big_batch_and_frozen_parts_stay():
  rng = np.random.default_rng(0)
  batch = {"x": rng.standard_normal((8, 3), np.float32),
           "y": rng.standard_normal((8, 1), np.float32)}
  whole, whole_metrics = _one_step(1, batch)
  accumulated, accumulated_metrics = _one_step(4, batch)
  np.testing.assert_allclose(accumulated.linear.kernel[...], whole.linear.kernel[...],
                             rtol=1e-5, atol=1e-6)
  for name in ("loss", "grad_norm", "mean_prediction"):
    np.testing.assert_allclose(accumulated_metrics[name], whole_metrics[name], rtol=1e-5)
  untouched = _Regression(nnx.Rngs(0))
  np.testing.assert_array_equal(whole.frozen.kernel[...], untouched.frozen.kernel[...])
  assert not np.array_equal(whole.linear.kernel[...], untouched.linear.kernel[...])
  with pytest.raises(ValueError, match="grad_accum"):
    _one_step(3, batch)


# ------------------------------------------------------------------- a real stage, end to end


@pytest.fixture(scope="module")
def projector_inputs(tmp_path_factory):
  """The tiny synthetic set and random frozen encoders saved as folders."""
  root = tmp_path_factory.mktemp("loop")
  save_speech_encoder(Wav2Vec2(TINY_WAV2VEC2, rngs=nnx.Rngs(0)), root / "wav2vec2")
  save_pdfgc(PDFGCEncoder(PDFGC_SMALL, rngs=nnx.Rngs(1)), root / "pdfgc")
  return {"dataset": synthetic_talking_heads.build(str(root / "data"), "tiny"),
          "wav2vec2": root / "wav2vec2", "pdfgc": root / "pdfgc"}


def _train_args(inputs, workdir, steps: int) -> list[str]:
  return ["train", "--config", f"{CONFIGS / 'vaid.py'}:tiny", "--workdir", str(workdir),
          "--no-progress", f"--config.data.dataset_dir={inputs['dataset']}",
          f"--config.encoders.audio={inputs['wav2vec2']}",
          f"--config.encoders.vision={inputs['pdfgc']}", f"--config.train.steps={steps}",
          "--config.train.log_every=2", "--config.train.checkpoint_every=2",
          "--config.optim.ema_decay=0.5", "--config.optim.name=adam8bit",
          "--config.train.eval_every=4", "--config.train.eval_batches=1",
          '--config.encoders.audio_features={"chunk_frames": 100, "context_frames": 10, '
          '"bucket_frames": [60, 100]}']


def test_etalk_train_runs_resumes_and_exports(projector_inputs, tmp_path, capsys):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  assert cli.main(_train_args(projector_inputs, straight, 4)) == 0
  assert "exported" in capsys.readouterr().out
  assert cli.main(_train_args(projector_inputs, resumed, 2)) == 0
  assert cli.main(_train_args(projector_inputs, resumed, 4)) == 0  # resumes at step 2

  lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
  # Training metrics at steps 2 and 4, the held-out loss (the test split) at step 4.
  assert [line["step"] for line in lines] == [2, 4, 4]
  training, held_out = lines[1], lines[2]
  for name in ("loss", "grad_norm", "lr", "steps_per_s", "examples_per_s", "pull"):
    assert np.isfinite(training[name]), name
  assert set(held_out) == {"step", "held_out/loss", "held_out/pull"}
  assert np.isfinite(held_out["held_out/loss"]) and held_out["held_out/loss"] != training["loss"]
  assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
  resumed_lines = [json.loads(line)
                   for line in (resumed / "metrics.jsonl").read_text().splitlines()]
  # The same batches and keys after resume, and the same held-out batches.
  assert resumed_lines[-2]["loss"] == training["loss"]
  assert resumed_lines[-1] == held_out

  # The export holds the EMA weights, equal in both runs.
  want, got = load_projector(straight / "export"), load_projector(resumed / "export")
  for a, b in zip(jax.tree.leaves(nnx.state(want)), jax.tree.leaves(nnx.state(got))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_etalk_train_bad_input_is_one_clear_error(projector_inputs, tmp_path, capsys):
  args = _train_args(projector_inputs, tmp_path / "run", 2)
  assert cli.main(args + ["--config.optim.lr=fast"]) == 2
  assert "could not convert" in capsys.readouterr().err
  missing = [a if not a.startswith("--config.data.dataset_dir") else
             f"--config.data.dataset_dir={tmp_path / 'nothing'}" for a in args]
  assert cli.main(missing) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["train", "--config", f"{CONFIGS / 'vaid.py'}:huge", "--workdir",
                   str(tmp_path / "x")]) == 2
  assert "variants" in capsys.readouterr().err


def test_every_stage_config_loads_with_its_documented_fields():
  for file, stage in (("encoders", "encoders"), ("vaid", "projector"), ("dicte", "dicte"),
                      ("vaid_joint", "vaid"), ("ethd_512", "ethd"), ("ethd_1024", "ethd"),
                      ("ser", "ser")):
    for variant in ("full", "tiny"):
      config = load_config(f"{CONFIGS / file}.py:{variant}")
      assert config.stage == stage
      assert {"data", "optim", "train", "mesh", "rules"} <= set(config.keys())
  full = load_config(f"{CONFIGS / 'ethd_512.py'}")
  assert (full.optim.name, full.optim.lr, full.data.batch_size, full.data.window) == (
      "adam8bit", 1e-5, 1, 120)
  assert (full.train.compute_dtype, full.train.remat) == ("bfloat16", "layers")


def test_a_shipped_config_loads_by_name_as_by_its_path():
  """`--config vaid:tiny` is configs/vaid.py:tiny wherever the package is installed."""
  assert config_file(f"{CONFIGS / 'vaid.py'}:tiny") == f"{CONFIGS / 'vaid.py'}:tiny"
  for name in ("vaid:tiny", "ethd_512", "tiny:quick"):
    file, _, variant = name.partition(":")
    by_path = f"{CONFIGS / file}.py" + (f":{variant}" if variant else "")
    assert load_config(name).to_dict() == load_config(by_path).to_dict(), name


def test_paper_configs_ethd_1024_windows_dicte_steps_and_references():
  full = load_config(f"{CONFIGS / 'ethd_1024.py'}")
  assert (full.data.window, full.ethd.unet.sample_size, full.ethd.unet.num_frames) == (32, 128, 32)
  assert (full.windows.frames, full.windows.overlap) == (WINDOWS_1024.frames, WINDOWS_1024.overlap)
  assert (full.optim.name, full.optim.lr, full.train.remat) == ("adam8bit", 1e-5, "layers")
  assert full.ethd.unet.block_out_channels == load_config(
      f"{CONFIGS / 'ethd_512.py'}").ethd.unet.block_out_channels  # the same SVD-XT weights
  tiny = load_config(f"{CONFIGS / 'ethd_1024.py'}:tiny")
  assert tiny.ethd.unet.sample_size * tiny.codec.factor == 64 and tiny.data.window == 2
  # The tiny ETHD takes its codec's latents (12 channels of 2x2 pixel shuffle, + the reference's).
  abstract = model_io.abstract(lambda rngs: ETHD(ethd_config(tiny, 32, 30), rngs=rngs))
  assert abstract.ethd_config.unet.in_channels == 2 * 2 * 2 * 3 == 2 * tiny.ethd.unet.out_channels
  ethd_512 = load_config(f"{CONFIGS / 'ethd_512.py'}")
  assert (ethd_512.windows.frames, ethd_512.windows.overlap) == (WINDOWS_512.frames,
                                                                  WINDOWS_512.overlap)
  # The ETHD stage's Di-CTE samples with the export's own steps (0 here): the sampler's 25.
  dicte = load_config(f"{CONFIGS / 'dicte.py'}")
  assert ethd_512.vaid.dicte_steps == full.vaid.dicte_steps == 0 and dicte.dicte.sample_steps == 25
  # Cross-clip references: on for ETHD, off for the encoders' self-driven reconstruction.
  assert ethd_512.data.cross_clip_reference == full.data.cross_clip_reference == 0.5
  assert load_config(f"{CONFIGS / 'encoders.py'}").data.cross_clip_reference == 0.0


@pytest.mark.parametrize("file", ["ethd_512", "ethd_1024", "encoders"])
def test_full_configs_refuse_to_start_without_an_svd_initialisation(file):
  """Before any data or weights are read; the tiny variants pass this check (and fail later on
  the data folder they were not given)."""
  with pytest.raises(ValueError, match="--config.ethd.init=svd:DIR"):
    stages.make_task(load_config(f"{CONFIGS / file}.py"), mesh=None)
  with pytest.raises(ValueError, match="config.encoders.(vision|audio) is not set"):
    stages.make_task(load_config(f"{CONFIGS / file}.py:tiny"), mesh=None)


@pytest.mark.slow  # ~55 s on the shared 2-core machine: two train steps compile both models
def test_vaid_stage_trains_the_push_term_when_weighted(projector_inputs, tmp_path):
  """configs/vaid_joint.py:tiny trains projector and Di-CTE for two steps and exports both;
  with push_weight > 0 the push is in the metrics and the gradient differs from weight 0 by
  exactly the push's (the pull and Di-CTE parts are the same at either weight)."""
  def config(push_weight: float):
    return load_config(f"{CONFIGS / 'vaid_joint.py'}:tiny", [
        f"--config.data.dataset_dir={projector_inputs['dataset']}",
        f"--config.encoders.audio={projector_inputs['wav2vec2']}",
        f"--config.encoders.vision={projector_inputs['pdfgc']}", "--config.train.steps=2",
        "--config.train.log_every=2", "--config.train.checkpoint_every=2",
        "--config.data.batch_size=2", "--config.data.cross_clip_reference=0.5",
        f"--config.push_weight={push_weight}",
        '--config.encoders.audio_features={"chunk_frames": 100, "context_frames": 10, '
        '"bucket_frames": [60, 100]}'])

  assert load_config(f"{CONFIGS / 'vaid_joint.py'}").push_weight == 0.0  # off by default
  task = stages.make_task(config(0.1), loop.parallel.make_mesh({"data": -1}))
  batch = jax.tree.map(jnp.asarray, task.featurize(next(task.batches)))
  weighted = task.model.projector.config
  grads, parts = [], []
  # Gradients in the projector only (Di-CTE's backward is not needed to see the push act), at
  # the weight make_task set (0.1) and at what make_task sets for weight 0.
  for projector_config in (dataclasses.replace(weighted, use_push=False, push_weight=0.0),
                           weighted):
    task.model.projector.config = projector_config
    (_, part), grad = nnx.value_and_grad(
        lambda m: task.loss(m, batch, jax.random.key(0)), has_aux=True,
        argnums=nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains("projector"))))(task.model)
    grads.append(jax.tree.leaves(grad))
    parts.append(part)
  assert "push" not in parts[0] and float(parts[1]["push"]) > 0
  np.testing.assert_allclose(parts[0]["pull"], parts[1]["pull"])
  np.testing.assert_allclose(parts[0]["dicte"], parts[1]["dicte"])
  assert any(not np.allclose(a, b) for a, b in zip(*grads))

  workdir = tmp_path / "vaid"
  loop.train(config(0.1), workdir, task=task, progress=False)
  metrics = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert all(np.isfinite(metrics[name]) for name in ("loss", "pull", "push", "dicte"))
  assert load_projector(workdir / "export" / "projector").config.use_push
  load_dicte(workdir / "export" / "dicte")


def test_dicte_condition_is_the_driving_emotion_for_cross_clip_references():
  """Di-CTE's condition: e_ref only for a same-clip reference that the draw leaves to it; the
  window's mean e_v where the draw says so and always for a reference from another clip."""
  expression = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
  reference = np.full((2, 2), -1.0, np.float32)
  cross = np.array([False, True])
  np.testing.assert_array_equal(dicte_condition(expression, reference, cross),
                                [[-1, -1], expression[1].mean(0)])
  traced = jax.jit(dicte_condition)(jnp.asarray(expression), jnp.asarray(reference),
                                    jnp.asarray(cross), jnp.array([True, False]))
  np.testing.assert_array_equal(traced, expression.mean(1))
