"""The attention entry point: the xla path, fallbacks off their hardware, the choice per backend,
cuDNN's operands, splash in interpret mode (sharded on 8 simulated devices in
tests/helpers/attention_sharded_worker.py) and lowered for a TPU."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo as jax_cudnn

from etalk_jax import model_io
from etalk_jax.audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config
from etalk_jax.audio.wavlm import WavLM, WavLMConfig
from etalk_jax.diffusion import sampling
from etalk_jax.ethd.model import ETHD, ETHDConfig
from etalk_jax.ethd.objective import reconstruction_loss
from etalk_jax.layers import attention
from etalk_jax.layers.compute import Compute
from etalk_jax.pipeline import call_ethd
from etalk_jax.svd import TemporalVAE, UNetConfig, UNetSpatioTemporal, VAEConfig
from etalk_jax.vaid import DICTE_FULL, PROJECTOR_FULL, AudioLipProjector, DiCTE

HELPERS = Path(__file__).parents[1] / "helpers"


def naive_attention(q, k, v, mask=None):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def random_qkv(q_len=7, kv_len=5, heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  shape = lambda n: (2, n, heads, head_dim)
  return (rng.standard_normal(shape(q_len), np.float32),
          rng.standard_normal(shape(kv_len), np.float32),
          rng.standard_normal(shape(kv_len), np.float32))


def test_xla_matches_softmax_attention_with_and_without_mask():
  q, k, v = random_qkv()
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v), naive_attention(q, k, v),
                             rtol=1e-5, atol=1e-6)
  band = np.abs(np.arange(7)[:, None] - np.arange(5)[None, :]) <= 2  # a banded mask
  got = attention.dot_product_attention(q, k, v, mask=band[None, None])
  np.testing.assert_allclose(got, naive_attention(q, k, v, band[None, None]), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("implementation", ["cudnn", "splash"])
def test_accelerator_implementations_fall_back_on_cpu_with_a_message(implementation, caplog):
  assert jax.default_backend() == "cpu"
  attention._log_once.cache_clear()
  q, k, v = random_qkv()
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    got = attention.dot_product_attention(q, k, v, implementation=implementation)
  np.testing.assert_allclose(got, naive_attention(q, k, v), rtol=1e-5, atol=1e-6)
  hardware = {"cudnn": "a CUDA GPU", "splash": "a TPU"}[implementation]
  assert f"attention '{implementation}'" in caplog.text and f"needs {hardware}" in caplog.text
  assert "using the xla path" in caplog.text
  with caplog.at_level(logging.WARNING, logger=attention.__name__):  # one line per reason
    attention.dot_product_attention(q, k, v, implementation=implementation)
  assert caplog.text.count("using the xla path") == 1


def test_unknown_implementation_is_rejected():
  q, k, v = random_qkv()
  with pytest.raises(ValueError, match="unknown"):
    attention.dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="unknown"):
    Compute(attention="flash")


def test_splash_kernel_in_interpret_mode_equals_xla():
  q, k, v = random_qkv(q_len=128, kv_len=256, heads=2, head_dim=128, seed=1)
  got = attention.splash_attention(q, k, v, interpret=True)
  np.testing.assert_allclose(got, naive_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_long_keys_on_cpu_take_the_blocked_path_and_match_softmax_attention():
  q, k, v = random_qkv(q_len=40, kv_len=1100, heads=2, head_dim=8, seed=2)  # 3 key blocks, padded
  rng = np.random.default_rng(3)
  mask = rng.random((2, 1, 40, 1100)) > 0.3
  mask[0, 0, 5] = False  # a fully masked row: jax.nn averages all keys; so must we
  bias = rng.standard_normal((1, 2, 40, 1100)).astype(np.float32)
  assert k.shape[1] >= attention.BLOCKED_MIN_LENGTH
  got = attention.dot_product_attention(q, k, v, mask=mask, bias=bias)
  expected = jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="xla")
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6)
  unmasked = attention.blocked_attention(q, k, v)
  np.testing.assert_allclose(unmasked, naive_attention(q, k, v), rtol=1e-5, atol=2e-6)


def test_blocked_attention_gradients_match_softmax_attention():
  """The custom VJP (one key block at a time) gives jax.nn's gradients for q, k, v and a bias,
  with a mask and padded key blocks."""
  q, k, v = random_qkv(q_len=6, kv_len=300, heads=2, head_dim=8, seed=4)
  rng = np.random.default_rng(5)
  mask = rng.random((2, 1, 6, 300)) > 0.2
  bias = rng.standard_normal((1, 2, 6, 300)).astype(np.float32)
  weights = rng.standard_normal(q.shape).astype(np.float32)

  def loss(attend, q, k, v, bias):
    return (attend(q, k, v, bias) * weights).sum()

  blocked = lambda q, k, v, b: attention.blocked_attention(  # noqa: E731
      q, k, v, mask=mask, bias=b, block=128)
  reference = lambda q, k, v, b: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, mask=mask, bias=b)
  got = jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
  expected = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ the choice

BF16, F32 = jnp.bfloat16, jnp.float32
SPATIAL_512 = ((120, 4096, 5, 64), (120, 4096, 5, 64))  # ETHD's top spatial self-attention
EDI_WINDOW = ((120, 4096, 5, 64), (120, 5, 5, 64))  # EDI's expression window, 5 tokens


@pytest.mark.parametrize("requested, backend, shapes, dtype, mask, expected", [
    ("auto", "gpu", SPATIAL_512, BF16, None, ("cudnn", None)),
    ("auto", "gpu", SPATIAL_512, F32, None, ("blocked", 512)),  # fp32: no cuDNN flash
    ("xla", "gpu", SPATIAL_512, BF16, None, ("blocked", 512)),
    ("auto", "tpu", SPATIAL_512, BF16, None, ("splash", None)),
    ("auto", "cpu", SPATIAL_512, F32, None, ("blocked", 128)),
    ("cudnn", "tpu", SPATIAL_512, BF16, None, ("blocked", 512)),
    ("auto", "gpu", EDI_WINDOW, BF16, (120, 1, 1, 5), ("cudnn", None)),  # mask: full + padded
    ("auto", "tpu", EDI_WINDOW, BF16, (120, 1, 1, 5), ("plain", None)),  # splash: no masks
    ("splash", "tpu", ((2, 120, 5, 64), (2, 120, 5, 64)), BF16, None, ("plain", None)),
    ("auto", "gpu", ((1, 8, 1, 512), (1, 4096, 1, 512)), BF16, None, ("blocked", 512)),  # VAE
])
def test_choice_per_backend(requested, backend, shapes, dtype, mask, expected):
  choice = attention.choose_attention(requested, backend, shapes[0], shapes[1], dtype, mask)
  assert (choice.implementation, choice.block) == expected
  assert (choice.reason is None) == (expected[0] in ("cudnn", "splash") or requested == "xla"
                                     or (requested == "auto" and backend == "cpu"))


def test_choice_refuses_a_cudnn_bias_that_would_be_huge():
  shape = (4, 8192, 16, 64)  # a (4, 16, 8192, 8192) bf16 bias: 8 GiB
  choice = attention.choose_attention("cudnn", "gpu", shape, shape, BF16, None, (4, 16, 1, 8192))
  assert choice.implementation == "blocked" and "GiB bias" in choice.reason


@pytest.mark.parametrize("q_len, kv_len, mask_shape, bias_shape", [
    (7, 5, (2, 1, 1, 5), None),  # ETHD's expression window: odd both ways
    (6, 9, (2, 1, 6, 9), (1, 2, 6, 9)),  # WavLM: full mask and bias, odd keys
    (8, 6, None, (1, 2, 1, 6)),  # a bias broadcast over queries, even lengths
])
def test_cudnn_operands_pass_jax_checks_and_keep_the_result(q_len, kv_len, mask_shape,
                                                            bias_shape):
  """What goes to cuDNN is the same attention (checked through XLA on the padded operands) and
  passes jax's own cuDNN layout and flash checks, which the raw call fails."""
  q, k, v = random_qkv(q_len=q_len, kv_len=kv_len, seed=6)
  rng = np.random.default_rng(7)
  mask = None if mask_shape is None else rng.random(mask_shape) > 0.3
  if mask is not None:
    mask[..., 0] = True  # every row keeps a key
  bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(np.float32)
  operands = attention.cudnn_operands(q, k, v, mask, bias)
  padded = jax.nn.dot_product_attention(*operands[:3], mask=operands[3], bias=operands[4])
  expected = jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias)
  np.testing.assert_allclose(padded[:, :q_len], expected, rtol=1e-5, atol=1e-6)
  assert_cudnn_accepts(*[None if x is None else jax.ShapeDtypeStruct(x.shape, BF16 if x.dtype
                         == np.float32 else x.dtype) for x in operands])
  raw = [jax.ShapeDtypeStruct(x.shape, BF16) for x in (q, k, v)]
  with pytest.raises((ValueError, NotImplementedError)):
    raw_mask = None if mask is None else jax.ShapeDtypeStruct(mask.shape, bool)
    raw_bias = None if bias is None else jax.ShapeDtypeStruct(bias.shape, BF16)
    assert_cudnn_accepts(*raw, raw_mask, raw_bias)


def assert_cudnn_accepts(query, key, value, mask, bias):
  """jax's cuDNN checks (jax/_src/cudnn/fused_attention_stablehlo.py) on abstract operands, as
  `jax.nn.dot_product_attention(implementation="cudnn")` runs them for a training call: the
  mask folded into the bias, the layout check, the flash-attention check (cuDNN 9.10, a GPU
  before Hopper: head sizes up to 128). jax has no public API for them: a jax upgrade that
  moves them fails here, loudly."""
  cudnn = jax_cudnn
  four_d = lambda x: None if x is None else jax.ShapeDtypeStruct(  # noqa: E731
      (1,) * (4 - len(x.shape)) + tuple(x.shape), x.dtype)
  mask, bias = four_d(mask), four_d(bias)
  combined = None
  if mask is not None or bias is not None:
    combined = jax.eval_shape(lambda m, b: cudnn.combine_bias_and_mask(b, m, query.dtype),
                              mask, bias)
  layout = cudnn.AttentionLayout.BTNH
  cudnn.check_layout(query, key, value, combined, None, None, None, None, None, None, layout)
  cudnn.check_is_flash_attention(query, key, value, layout.value, 91000,
                                 has_bias=combined is not None, is_training=True)


# ------------------------------------------------------------------------------ every model

def _trace_calls(build, *input_specs, call=lambda model, *inputs: model(*inputs)):
  """The attention calls of a full-size model built abstractly in bf16 with attention "auto",
  traced (never computed) on inputs of these shapes."""
  graphdef, state = nnx.split(model_io.abstract(build))

  def run(state, *inputs):
    return call(nnx.merge(graphdef, state), *inputs)

  with attention.record_attention_calls() as calls:
    jax.eval_shape(run, state, *input_specs)
  return calls


@pytest.fixture(scope="module")
def full_size_calls():
  """{model: [AttentionCall]} at the shapes the paper runs: ETHD at 512² x 120 frames and
  1024² x 32, SVD-XT's UNet at its own 576x1024 x 25, the VAE on 512² frames, wav2vec2 and WavLM
  on 60 s of speech with a padding mask, the projector and Di-CTE on a 120-frame clip."""
  bf16 = Compute.bf16()
  spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  calls = {}
  ethd_config = ETHDConfig()
  for name, pixels, frames in (("ethd_512x120", 512, 120), ("ethd_1024x32", 1024, 32)):
    latent = pixels // 8
    calls[name] = _trace_calls(
        lambda rngs: ETHD(ethd_config, compute=bf16, rngs=rngs),
        spec(1, frames, latent, latent, 8), spec(1), spec(1, frames, ethd_config.lip_dim),
        spec(1, frames, ethd_config.expression_dim), spec(1, ethd_config.expression_dim),
        spec(1, pixels, pixels))
  unet_config = UNetConfig()  # SVD-XT's own setting: 25 frames at 576x1024 (72x128 latents)
  time_ids = (unet_config.projection_class_embeddings_input_dim
              // unet_config.addition_time_embed_dim)
  calls["svd_unet_576x1024x25"] = _trace_calls(
      lambda rngs: UNetSpatioTemporal(unet_config, compute=bf16, rngs=rngs),
      spec(1, 25, 72, 128, unet_config.in_channels), spec(1),
      spec(1, 1, unet_config.cross_attention_dim), spec(1, time_ids))
  vae = lambda rngs: TemporalVAE(VAEConfig(), compute=bf16, rngs=rngs)  # noqa: E731
  calls["vae_encode"] = _trace_calls(vae, spec(1, 512, 512, 3),
                                     call=lambda model, image: model.encode(image).mean)
  calls["vae_decode"] = _trace_calls(vae, spec(14, 64, 64, 4),
                                     call=lambda model, latents: model.decode(latents, 14))
  speech = (spec(1, 60 * 16000), spec(1, 60 * 16000, dtype=jnp.int32))
  calls["wav2vec2_60s"] = _trace_calls(
      lambda rngs: Wav2Vec2(Wav2Vec2Config(), compute=bf16, rngs=rngs), *speech)
  calls["wavlm_60s"] = _trace_calls(
      lambda rngs: WavLM(WavLMConfig(), compute=bf16, rngs=rngs), *speech)
  audio = spec(1, 120, DICTE_FULL.window, DICTE_FULL.audio_layers, DICTE_FULL.audio_dim)
  calls["projector"] = _trace_calls(
      lambda rngs: AudioLipProjector(PROJECTOR_FULL, compute=bf16, rngs=rngs), audio)
  calls["dicte"] = _trace_calls(
      lambda rngs: DiCTE(DICTE_FULL, compute=bf16, rngs=rngs),
      spec(1, 120, DICTE_FULL.expression_dim), spec(1, dtype=jnp.int32), audio,
      spec(1, 512, 512, DICTE_FULL.image_channels), spec(1, DICTE_FULL.condition_dim))
  return calls


def test_every_model_call_is_memory_safe_and_cudnn_calls_pass_jax_checks(full_size_calls):
  """Re-chosen for each backend: no call over `BLOCKED_MIN_LENGTH` keys runs plain softmax
  attention anywhere, and every call routed to cuDNN, after `cudnn_operands`, passes jax's
  cuDNN layout and flash checks. On a GPU the spatial self- and cross-attention, EDI's masked
  window and the speech encoders' masked attention take cuDNN; the VAE's 512-wide head does
  not."""
  routed = {}
  for model, calls in full_size_calls.items():
    assert calls, model
    for call in calls:
      for backend in ("cpu", "gpu", "tpu"):
        choice = attention.choose_attention(call.requested, backend, call.query_shape,
                                            call.key_shape, call.dtype, call.mask_shape,
                                            call.bias_shape)
        assert choice.implementation != "plain" or call.key_shape[1] < attention.BLOCKED_MIN_LENGTH
        routed.setdefault((model, backend), set()).add(choice.implementation)
        if backend == "gpu" and choice.implementation == "cudnn":
          operands = jax.eval_shape(
              attention.cudnn_operands, *[jax.ShapeDtypeStruct(s, call.dtype) for s in
                                          (call.query_shape, call.key_shape, call.key_shape)],
              None if call.mask_shape is None else jax.ShapeDtypeStruct(call.mask_shape, bool),
              None if call.bias_shape is None else jax.ShapeDtypeStruct(call.bias_shape,
                                                                         call.dtype))
          assert_cudnn_accepts(*operands)
  for model in ("ethd_512x120", "ethd_1024x32", "svd_unet_576x1024x25", "wav2vec2_60s",
                "wavlm_60s", "dicte"):
    assert "cudnn" in routed[model, "gpu"], model
  assert "splash" in routed["ethd_512x120", "tpu"] and "splash" in routed["ethd_1024x32", "tpu"]
  assert routed["vae_decode", "gpu"] == {"blocked"}  # one 512-wide head: no cuDNN
  masked = [c for c in full_size_calls["ethd_512x120"] if c.mask_shape is not None]
  assert masked and all(c.mask_shape[1:3] == (1, 1) and c.key_shape[1] == 5 for c in masked)


def test_models_reach_attention_only_through_the_entry_point():
  package = Path(attention.__file__).parents[1]
  direct = [str(path.relative_to(package)) for path in package.rglob("*.py")
            if "jax.nn.dot_product_attention(" in path.read_text()]
  assert direct == ["layers/attention.py"]


# ------------------------------------------------------------------------------ splash, sharded

def test_splash_under_a_mesh_of_8_devices_equals_one_device():
  """shard_map over the batch axes the batch divides: 8 rows over data x fsdp, 6 rows over data
  only; outputs and gradients equal the one-device kernel's (Pallas interpret mode)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(HELPERS.parents[1]))
  completed = subprocess.run([sys.executable, str(HELPERS / "attention_sharded_worker.py")],
                             env=env, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-4000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8
  assert result["8"]["axes"] == ["data", "fsdp"] and result["8"]["out_shards"] == 8
  assert result["6"]["axes"] == ["data"] and result["6"]["out_shards"] == 2
  for batch in ("8", "6"):
    assert result[batch]["reference_error"] < 1e-5  # the kernel is attention
    assert result[batch]["out_error"] <= 1e-6
    assert result[batch]["grad_error"] <= 1e-6 * result[batch]["grad_scale"]


# ------------------------------------------------------------------------------ lowered for TPU

EXPORT_UNET = dict(  # one level at 16² latents: 256 spatial tokens (splash), head size 64
    sample_size=16, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",),
    up_block_types=("CrossAttnUpBlockSpatioTemporal",), block_out_channels=(128,),
    addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, layers_per_block=1,
    cross_attention_dim=32, transformer_layers_per_block=1, num_attention_heads=2, num_frames=8)


def export_ethd_for_tpu(config: ETHDConfig, frames: int, latent: int, pixels: int):
  """(train step, windowed sampler) of ETHD with attention "splash", exported for TPU from this
  CPU: each a `jax.export.Exported`, and the attention calls each traced."""
  def split(remat):
    compute = Compute(dtype=jnp.bfloat16, param_dtype=jnp.float32, attention="splash",
                      remat=remat)
    return nnx.split(model_io.abstract(lambda rngs: ETHD(config, compute=compute, rngs=rngs)))

  graphdef, params = split("layers")  # as the full config trains; sampling keeps no residuals
  spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  batch = {"clean": spec(1, frames, latent, latent, 4),
           "reference_latents": spec(1, latent, latent, 4),
           "lip_latents": spec(1, frames, config.lip_dim),
           "expression": spec(1, frames, config.expression_dim),
           "reference_expression": spec(1, config.expression_dim),
           "face_mask": spec(1, pixels, pixels), "lip_mask": spec(1, pixels, pixels)}
  tx = optax.adam(1e-4)

  def train_step(params, opt_state, batch, key):
    def loss_fn(params):
      return reconstruction_loss(nnx.merge(graphdef, params), *(batch[name] for name in (
          "clean", "reference_latents", "lip_latents", "expression", "reference_expression",
          "face_mask", "lip_mask")), key)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  denoiser = sampling.ModelDenoiser(split("none")[0], call_ethd)
  plan = sampling.plan_windows(2 * frames, sampling.WindowConfig(frames=frames, overlap=2,
                                                                 min_window_groups=2))

  def sample(params, noise, frame_conditions, video_conditions):
    return sampling._sample_windows(
        denoiser, params, noise, jnp.asarray(sampling.sampler_sigmas(
            sampling.SamplerConfig(steps=2))), frame_conditions, video_conditions, None,
        plan.starts, plan.weights, plan.active_groups, windows_per_call=1)

  frame_conditions = {"lip_latents": spec(1, plan.buffer_frames, config.lip_dim),
                      "expression": spec(1, plan.buffer_frames, config.expression_dim)}
  video_conditions = {"reference_latent": spec(1, latent, latent, 4),
                      "reference_expression": spec(1, config.expression_dim),
                      "face_mask": spec(1, pixels, pixels)}
  with attention.target_backend("tpu"), attention.record_attention_calls() as calls:
    train = jax.export.export(jax.jit(train_step), platforms=("tpu",))(
        params, jax.eval_shape(tx.init, params), batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
    sampler = jax.export.export(jax.jit(sample), platforms=("tpu",))(
        params, spec(1, plan.buffer_frames, latent, latent, 4), frame_conditions,
        video_conditions)
  return train, sampler, calls


def _assert_splash_lowered(train, sampler, calls):
  assert train.platforms == ("tpu",) and sampler.platforms == ("tpu",)
  for exported in (train, sampler):
    assert "tpu_custom_call" in exported.mlir_module()  # the Mosaic (Pallas) kernel
  chosen = {call.choice.implementation for call in calls}
  assert "splash" in chosen and chosen <= {"splash", "plain", "blocked"}


def test_tiny_ethd_train_step_and_sampler_lower_for_tpu_with_splash():
  config = ETHDConfig(unet=UNetConfig.from_dict(EXPORT_UNET), lip_dim=8, expression_dim=6)
  _assert_splash_lowered(*export_ethd_for_tpu(config, frames=4, latent=16, pixels=128))


@pytest.mark.slow
def test_full_size_ethd_train_step_and_sampler_lower_for_tpu_with_splash():
  _assert_splash_lowered(*export_ethd_for_tpu(ETHDConfig(), frames=120, latent=64, pixels=512))
