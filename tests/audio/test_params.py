"""transformers <-> NNX conversion for wav2vec2 / WavLM: layouts, sources, strictness, our format,
and the `etalk convert wav2vec2|wavlm` commands."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from etalk_jax.audio import params
from etalk_jax.cli import main
from etalk_jax.weights import ConversionError

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3),
            num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
AUDIO = np.random.default_rng(0).standard_normal((1, 1200)).astype(np.float32)


@pytest.fixture(scope="module")
def w2v():
  torch.manual_seed(0)
  return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**TINY)).eval()


@pytest.fixture(scope="module")
def wavlm():
  torch.manual_seed(0)
  config = transformers.WavLMConfig(**TINY, num_buckets=8, max_bucket_distance=20)
  return transformers.WavLMModel(config).eval()


def _torch_last(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(AUDIO)).last_hidden_state.numpy()


@nnx.jit
def _last_hidden_state(model, audio):
  return model(audio).last_hidden_state


def _ours_last(model) -> np.ndarray:
  return np.asarray(_last_hidden_state(model, jnp.asarray(AUDIO)))


def _close(a, b):
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_round_trip_loads_strict(family, w2v, wavlm):
  torch_model = w2v if family == "wav2vec2" else wavlm
  ours = (params.wav2vec2_from_transformers if family == "wav2vec2"
          else params.wavlm_from_transformers)(torch_model)
  exported = params.to_transformers(ours)
  fresh = type(torch_model)(torch_model.config).eval()
  fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
  for key, value in torch_model.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  _close(_ours_last(ours), _torch_last(torch_model))


def test_legacy_and_fused_weight_norm_layouts(w2v):
  state = {k: v.clone() for k, v in w2v.state_dict().items()}
  stem = "encoder.pos_conv_embed.conv."
  g = state.pop(stem + "parametrizations.weight.original0")
  v = state.pop(stem + "parametrizations.weight.original1")
  expected = _torch_last(w2v)

  legacy = dict(state, **{stem + "weight_g": g, stem + "weight_v": v})
  _close(_ours_last(params.wav2vec2_from_transformers(legacy, config=w2v.config.to_dict())),
         expected)

  fused = dict(state, **{stem + "weight": torch._weight_norm(v, g, 2)})
  _close(_ours_last(params.wav2vec2_from_transformers(fused, config=w2v.config.to_dict())),
         expected)

  legacy_export = params.to_transformers(params.wav2vec2_from_transformers(w2v),
                                         weight_norm="legacy")
  assert stem + "weight_g" in legacy_export and stem + "weight_v" in legacy_export


def test_task_model_checkpoint_folder(tmp_path, w2v):
  """A Wav2Vec2ForCTC folder (prefixed keys + lm_head) as saved by save_pretrained."""
  torch.manual_seed(0)
  ctc = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**TINY, vocab_size=12)).eval()
  ctc.save_pretrained(tmp_path / "ctc")
  ours = params.wav2vec2_from_transformers(tmp_path / "ctc")
  _close(_ours_last(ours), _torch_last(ctc.wav2vec2))


def test_pytorch_model_bin_folder(tmp_path, w2v):
  folder = tmp_path / "bin"
  folder.mkdir()
  (folder / "config.json").write_text(w2v.config.to_json_string())
  torch.save(w2v.state_dict(), folder / "pytorch_model.bin")
  _close(_ours_last(params.wav2vec2_from_transformers(folder)), _torch_last(w2v))


def test_mismatch_lists_every_problem(w2v):
  state = dict(w2v.state_dict())
  state.pop("encoder.layers.0.attention.q_proj.weight")
  state["encoder.extra.weight"] = torch.zeros(3)
  state["feature_projection.projection.bias"] = torch.zeros(5)
  with pytest.raises(ConversionError) as error:
    params.wav2vec2_from_transformers(state, config=w2v.config.to_dict())
  message = str(error.value)
  assert "1 missing, 1 unexpected, 1 with the wrong shape" in message
  assert "encoder.layers.0.attention.q_proj.weight" in message
  assert "encoder.extra.weight" in message
  assert "feature_projection.projection.bias: file has (5,), model needs (16,)" in message


def test_user_errors(tmp_path, w2v, wavlm):
  with pytest.raises(ValueError, match="carries no config"):
    params.wav2vec2_from_transformers(dict(w2v.state_dict()))
  with pytest.raises(ConversionError, match="does not exist"):
    params.wav2vec2_from_transformers(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="no config.json"):
    params.wav2vec2_from_transformers(tmp_path / "empty")
  with pytest.raises(ValueError, match="model_type 'wavlm'"):
    params.wav2vec2_from_transformers(wavlm)


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_convert_commands_both_ways(tmp_path, family, w2v, wavlm, capsys):
  torch_model = w2v if family == "wav2vec2" else wavlm
  load = params.load_wav2vec2 if family == "wav2vec2" else params.load_wavlm
  torch_model.save_pretrained(tmp_path / "hf")
  n_params = sum(p.numel() for p in torch_model.parameters())

  assert main(["convert", family, "--src", str(tmp_path / "hf"), "--dst",
               str(tmp_path / "ours"), "--json"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["parameters"] == n_params and summary["tensors"] > 0 and summary["bytes"] > 0
  assert json.loads((tmp_path / "ours" / "config.json").read_text())["etalk_format"]["model"] \
      == family
  _close(_ours_last(load(tmp_path / "ours")), _torch_last(torch_model))

  assert main(["convert", family, "--src", str(tmp_path / "hf"), "--dst",
               str(tmp_path / "ours")]) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert main(["convert", family, "--src", str(tmp_path / "ours"), "--dst",
               str(tmp_path / "x"), "--to", "diffusers"]) == 2
  assert "'ours' or 'transformers'" in capsys.readouterr().err

  assert main(["convert", family, "--src", str(tmp_path / "ours"), "--dst",
               str(tmp_path / "back"), "--to", "transformers"]) == 0
  assert f"{n_params:,} parameters" in capsys.readouterr().out
  reloaded = type(torch_model).from_pretrained(tmp_path / "back").eval()
  np.testing.assert_allclose(_torch_last(reloaded), _torch_last(torch_model), rtol=0, atol=0)

  with pytest.raises(ConversionError, match="not in our format"):
    load(tmp_path / "hf")
  other = params.load_wavlm if family == "wav2vec2" else params.load_wav2vec2
  with pytest.raises(ConversionError, match="holds a"):
    other(tmp_path / "ours")
