"""wav2vec2 and WavLM against transformers' PyTorch models: tiny random-init parity, full-size
parameter counts, config handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from etalk_jax import model_io
from etalk_jax.audio import params
from etalk_jax.audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config
from etalk_jax.audio.wavlm import WavLM, WavLMConfig, relative_position_buckets
from etalk_jax.layers.compute import Compute

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 2),
            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
BASE = dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)
STABLE = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
SAMPLES = 4000  # 199 frames with the tiny conv stack: past the WavLM buckets' exact range


def _relative_error(ours, theirs) -> float:
  theirs = theirs.detach().numpy()
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def _inputs(padded: bool, samples: int = SAMPLES):
  generator = torch.Generator().manual_seed(1)
  audio = torch.randn(2, samples, generator=generator)
  mask = torch.ones(2, samples, dtype=torch.long)
  if padded:
    mask[1, 5 * samples // 8:] = 0
    audio[1, 5 * samples // 8:] = 0.0
  return audio, (mask if padded else None)


@nnx.jit
def _jitted_call(model, audio, attention_mask=None, mask_time_indices=None):
  # One compile per config instead of one per op: much faster than eager on the CPU.
  return model(audio, attention_mask=attention_mask, mask_time_indices=mask_time_indices)


def _check_parity(torch_model, ours, padded: bool, mask_time=False, samples=SAMPLES):
  audio, mask = _inputs(padded, samples)
  mask_time_indices = None
  if mask_time:
    mask_time_indices = torch.zeros(2, 199, dtype=torch.bool)
    mask_time_indices[:, 10:20] = True
  with torch.no_grad():
    expected = torch_model(audio, attention_mask=mask, mask_time_indices=mask_time_indices,
                           output_hidden_states=True)
  got = _jitted_call(ours, jnp.asarray(audio.numpy()),
             attention_mask=None if mask is None else jnp.asarray(mask.numpy()),
             mask_time_indices=(None if mask_time_indices is None
                                else jnp.asarray(mask_time_indices.numpy())))
  assert len(got.hidden_states) == len(expected.hidden_states)
  for i, (a, b) in enumerate(zip(got.hidden_states, expected.hidden_states)):
    assert a.shape == tuple(b.shape)
    assert _relative_error(a, b) < 1e-4, f"hidden state {i}"
  assert _relative_error(got.last_hidden_state, expected.last_hidden_state) < 1e-4
  assert _relative_error(got.extract_features, expected.extract_features) < 1e-4


@pytest.mark.parametrize("variant", ["base", "stable"])
@pytest.mark.parametrize("padded", [False, True])
def test_wav2vec2_matches_transformers(variant, padded):
  torch.manual_seed(0)
  config = transformers.Wav2Vec2Config(**TINY, **(BASE if variant == "base" else STABLE))
  torch_model = transformers.Wav2Vec2Model(config).eval()
  _check_parity(torch_model, params.wav2vec2_from_transformers(torch_model), padded)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("variant", ["base", "stable"])
@pytest.mark.parametrize("padded", [False, True])
def test_wavlm_matches_transformers(variant, padded):
  torch.manual_seed(0)
  config = transformers.WavLMConfig(**TINY, **(BASE if variant == "base" else STABLE),
                                    num_buckets=16, max_bucket_distance=40)
  torch_model = transformers.WavLMModel(config).eval()
  with torch.no_grad():  # make the gate const differ from its init of ones
    for layer in torch_model.encoder.layers:
      layer.attention.gru_rel_pos_const.uniform_(0.5, 1.5)
  _check_parity(torch_model, params.wavlm_from_transformers(torch_model), padded)


def test_wav2vec2_adapters_and_masked_frames_match_transformers():
  """The MMS attention adapters, the output adapter with its projection, mask_time_indices."""
  torch.manual_seed(0)
  config = transformers.Wav2Vec2Config(**TINY, **STABLE, adapter_attn_dim=8, add_adapter=True,
                                       output_hidden_size=24, num_adapter_layers=2)
  torch_model = transformers.Wav2Vec2Model(config).eval()
  _check_parity(torch_model, params.wav2vec2_from_transformers(torch_model), padded=True,
                mask_time=True)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_long_padded_sequences_match_transformers():
  """1249 frames: past the length where an attention implementation may switch to blocks."""
  torch.manual_seed(0)
  w2v = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY, **BASE)).eval()
  _check_parity(w2v, params.wav2vec2_from_transformers(w2v), padded=True, samples=25000)
  config = transformers.WavLMConfig(**TINY, **BASE, num_buckets=16, max_bucket_distance=40)
  wavlm = transformers.WavLMModel(config).eval()
  _check_parity(wavlm, params.wavlm_from_transformers(wavlm), padded=True, samples=25000)


def test_relative_position_buckets_match_transformers():
  config = transformers.WavLMConfig(**TINY, num_buckets=320, max_bucket_distance=800)
  attention = transformers.models.wavlm.modeling_wavlm.WavLMAttention(
      32, 4, num_buckets=320, max_distance=800)
  length = 1200
  relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  expected = attention._relative_positions_bucket(relative).numpy()
  np.testing.assert_array_equal(relative_position_buckets(length, 320, 800), expected)
  del config


def _parameter_count(model_cls, config) -> int:
  abstract = model_io.abstract(lambda rngs: model_cls(config, rngs=rngs))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_full_size_parameter_counts():
  assert _parameter_count(Wav2Vec2, Wav2Vec2Config()) == 94_371_712  # wav2vec2-base
  assert _parameter_count(WavLM, WavLMConfig()) == 94_381_936        # WavLM base
  large = transformers.Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24,
                                      num_attention_heads=16, intermediate_size=4096, **STABLE)
  with torch.device("meta"):
    expected = sum(p.numel() for p in transformers.Wav2Vec2Model(large).parameters())
  assert _parameter_count(Wav2Vec2, Wav2Vec2Config.from_dict(large.to_dict())) == expected


def test_config_round_trip_and_errors():
  theirs = transformers.Wav2Vec2Config(**TINY, **STABLE).to_dict()
  ours = Wav2Vec2Config.from_dict(theirs)
  assert ours.conv_dim == (16, 16, 16) and ours.do_stable_layer_norm
  back = transformers.Wav2Vec2Config(**ours.to_dict())
  assert Wav2Vec2Config.from_dict(back.to_dict()) == ours
  wavlm = WavLMConfig.from_dict(transformers.WavLMConfig(num_buckets=64).to_dict())
  assert wavlm.num_buckets == 64
  with pytest.raises(ValueError, match="model_type 'wavlm'"):
    Wav2Vec2Config.from_dict({"model_type": "wavlm"})
  with pytest.raises(ValueError, match="feat_extract_norm"):
    Wav2Vec2Config(feat_extract_norm="batch")
  with pytest.raises(ValueError, match="same length"):
    Wav2Vec2Config(conv_dim=(8, 8), conv_stride=(5,), conv_kernel=(10,))
  with pytest.raises(ValueError, match="hidden_act"):
    Wav2Vec2Config(hidden_act="nonexistent")


def test_bf16_compute_runs():
  """The GPU setting (bf16 compute over fp32 weights) builds and runs; values stay close."""
  config = Wav2Vec2Config.from_dict(TINY)
  fp32 = Wav2Vec2(config, rngs=nnx.Rngs(0))
  bf16 = Wav2Vec2(config, compute=Compute(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  audio = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2000)), jnp.float32)
  a, b = _jitted_call(fp32, audio).last_hidden_state, _jitted_call(bf16, audio).last_hidden_state
  assert b.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(a - b.astype(jnp.float32)))) < 0.1 * float(jnp.max(jnp.abs(a)))
