import json

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from etalk_jax import model_io, parallel
from etalk_jax.audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config
from etalk_jax.audio.wavlm import WavLM, WavLMConfig
from etalk_jax.ethd.model import ETHD, ETHDConfig
from etalk_jax.parallel import logical, rules
from etalk_jax.parallel.mesh import CLUSTER_VARIABLES
from etalk_jax.svd import UNetConfig, UNetSpatioTemporal
from etalk_jax.svd.config import VAEConfig
from etalk_jax.svd.vae import TemporalVAE
from etalk_jax.train.optim import adam_8bit
from etalk_jax.vaid.dicte import DICTE_FULL, DiCTE
from etalk_jax.vaid.projector import PROJECTOR_FULL, AudioLipProjector
from etalk_jax.vision.pdfgc import PDFGC_FULL, AdaptedPDFGC
from tests.helpers import ethd_sharding_golden as golden
from tests.helpers.svd_reference import UNET_TWO_LEVELS

# Specs need only the mesh's axis sizes: an AbstractMesh stands in for 2 x 4 devices.
DATA_X_FSDP = AbstractMesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)

GOLDEN_UNET_SPECS = {
    "conv_in.kernel": P(None, None, None, None),  # 1152 elements: replicated
    "conv_in.bias": P(None),
    "time_embedding.linear_1.kernel": P(None, "fsdp"),  # (32, 128)
    "add_embedding.linear_2.kernel": P(None, "fsdp"),  # (128, 128): the last on a tie
    "down_blocks.0.resnets.0.spatial_res_block.conv1.kernel": P(None, None, None, "fsdp"),
    "down_blocks.1.resnets.0.temporal_res_block.conv1.kernel":
        P(None, None, None, None, "fsdp"),  # (3, 1, 1, 64, 64)
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.proj_in.kernel": P(None, "fsdp"),
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.proj_out.kernel": P("fsdp", None),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.kernel": P(None, "fsdp"),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.kernel": P(None, None),
    "mid_block.attentions.0.time_mixer.mix_factor": P(None),
    "up_blocks.0.resnets.0.spatial_res_block.conv1.kernel": P(None, None, "fsdp", None),
    "conv_out.kernel": P(None, None, None, None),
}


def test_golden_specs_of_tiny_unet():
  config = UNetConfig.from_dict(UNET_TWO_LEVELS)
  _, state = nnx.split(model_io.abstract(lambda rngs: UNetSpatioTemporal(config, rngs=rngs)))
  specs = parallel.partition_specs(state, DATA_X_FSDP)
  assert {path: specs[path] for path in GOLDEN_UNET_SPECS} == GOLDEN_UNET_SPECS
  sharded = [path for path, spec in specs.items() if "fsdp" in spec]
  assert len(sharded) == 209 and len(specs) == 608


def test_rules_from_config():
  assert parallel.logical_to_spec(("batch", "frames", None), DATA_X_FSDP, rules.DEFAULT_RULES
                                  ) == P(("data", "fsdp"), None, None)  # no context axis here
  pure_data_parallel = (("batch", "data"), ("weight_shard", None))
  assert parallel.parameter_spec((1024, 1024), DATA_X_FSDP, pure_data_parallel) == P(None, None)
  assert parallel.parameter_spec((1022, 1024), DATA_X_FSDP) == P(None, "fsdp")
  assert parallel.parameter_spec((1024, 1022), DATA_X_FSDP) == P("fsdp", None)
  assert parallel.parameter_spec((4099, 3), DATA_X_FSDP) == P(None, None)  # nothing divides
  with pytest.raises(ValueError, match="no sharding rule for logical axis 'frames'"):
    parallel.logical_to_spec(("frames",), DATA_X_FSDP, (("batch", "data"),))
  with pytest.raises(ValueError, match="twice"):
    parallel.logical_to_spec(("batch",), DATA_X_FSDP, (("batch", "data"), ("batch", None)))


def test_mesh_shape_from_config():
  assert parallel.mesh_shape({"data": -1, "fsdp": 4}, 8) == {"data": 2, "fsdp": 4}
  assert parallel.mesh_shape({"data": 1, "fsdp": 2, "context": -1}, 8) == {
      "data": 1, "fsdp": 2, "context": 4}
  with pytest.raises(ValueError, match="needs 6 devices, but 8"):
    parallel.mesh_shape({"data": 2, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    parallel.mesh_shape({"model": 2}, 8)
  mesh = parallel.make_mesh({"data": -1})
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_single_process_needs_no_distributed_start(monkeypatch):
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  parallel.initialize_distributed()
  assert jax.process_count() == 1 and not jax.distributed.is_initialized()


# --- Logical axis names (etalk_jax/parallel/logical.py) ------------------------------------

FSDP8 = AbstractMesh((1, 8), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _families():
  """Full-size builders of every model family (shapes only: ~4 s for all)."""
  large = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                         intermediate_size=4096, feat_extract_norm="layer",
                         do_stable_layer_norm=True, add_adapter=True, adapter_attn_dim=16)
  return {
      "unet": lambda rngs: UNetSpatioTemporal(UNetConfig(), rngs=rngs),
      "ethd": lambda rngs: ETHD(ETHDConfig(), rngs=rngs),
      "vae": lambda rngs: TemporalVAE(VAEConfig(), rngs=rngs),
      "wav2vec2": lambda rngs: Wav2Vec2(Wav2Vec2Config(), rngs=rngs),
      "wav2vec2_large_adapters": lambda rngs: Wav2Vec2(large, rngs=rngs),
      "wavlm": lambda rngs: WavLM(WavLMConfig(), rngs=rngs),
      "pdfgc": lambda rngs: AdaptedPDFGC(PDFGC_FULL, rngs=rngs),
      "projector": lambda rngs: AudioLipProjector(PROJECTOR_FULL, rngs=rngs),
      "dicte": lambda rngs: DiCTE(DICTE_FULL, rngs=rngs),
  }


def test_every_parameter_of_every_family_matches_exactly_one_rule():
  for name, build in _families().items():
    model = model_io.abstract(build)
    axes = parallel.model_axes(model)  # raises on any unmatched / ambiguous path
    leaves = nnx.to_flat_state(nnx.state(model))
    assert len(axes) == len(leaves), name
    for path, leaf in leaves:
      names = axes[".".join(map(str, path))]
      assert len(names) == leaf.get_value().ndim
      assert set(names) <= set(logical.PARAM_LOGICAL_NAMES), (path, names)
      # Every logical name has a rule, so specs resolve for every family.
      parallel.logical_param_spec(leaf.get_value().shape, names, FSDP8)


def test_unmatched_parameters_fail_listing_them():
  model = model_io.abstract(lambda rngs: UNetSpatioTemporal(UNetConfig.from_dict(
      UNET_TWO_LEVELS), rngs=rngs))
  no_mix_factor = tuple(rule for rule in logical.FAMILIES["unet"]
                        if "mix_factor" not in rule.pattern)
  with pytest.raises(ValueError, match=r"match none.*\n.*time_mixer\.mix_factor \(1,\)"):
    logical.param_axes(nnx.state(model), no_mix_factor)
  twice = logical.FAMILIES["unet"] + (logical.Rule(r".*to_q\.kernel", 2, ("embed", "heads")),)
  with pytest.raises(ValueError, match=r"match several"):
    logical.param_axes(nnx.state(model), twice)
  with pytest.raises(ValueError, match="no logical-axis table for Linear"):
    logical.family_of(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_logical_rules_divisibility_priority_and_size():
  spec = parallel.logical_param_spec
  assert spec((320, 2560), ("embed", "mlp"), FSDP8) == P(None, "fsdp")  # the larger dim
  assert spec((320, 320), ("embed", "heads"), FSDP8) == P(None, "fsdp")  # tie: rules' order
  assert spec((320, 320), ("heads", "embed"), FSDP8) == P("fsdp", None)
  assert spec((1020, 3072), ("embed", "mlp"), FSDP8) == P(None, "fsdp")
  assert spec((4096, 30), ("embed", "mlp"), FSDP8) == P("fsdp", None)  # 30 does not divide
  assert spec((3, 3, 8, 320), ("conv_h", "conv_w", "conv_in", "conv_out"), FSDP8
              ) == P(None, None, None, "fsdp")
  assert spec((3, 3, 320, 4), ("conv_h", "conv_w", "conv_in", "conv_out"), FSDP8
              ) == P(None, None, "fsdp", None)
  assert spec((1000, 12), ("position", "heads"), FSDP8) == P(None, None)  # under 4096
  assert spec((5000,), ("norm",), FSDP8) == P(None)  # norms are never sharded
  # One mesh axis for at most one dimension, even when two logical names map to it.
  two_axes = AbstractMesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  rules2 = (("embed", ("data", "fsdp")), ("mlp", "fsdp"))
  assert spec((64, 128), ("embed", "mlp"), two_axes, rules2) == P("data", "fsdp")
  assert spec((128, 64), ("embed", "mlp"), two_axes, rules2) == P(("data", "fsdp"), None)


def test_optimizer_state_follows_its_parameters():
  """Adam's moments and 8-bit Adam's codes (parameter-shaped) take the parameter's logical
  spec; 8-bit Adam's per-block scales (not parameter-shaped) keep the shape rule."""

  model = model_io.abstract(lambda rngs: UNetSpatioTemporal(UNetConfig.from_dict(
      UNET_TWO_LEVELS), rngs=rngs))
  axes = parallel.model_axes(model)
  _, params = nnx.split(model, nnx.Param)
  specs = parallel.partition_specs(params, DATA_X_FSDP, family_axes=axes)
  for tx in (optax.adam(1e-3), adam_8bit(1e-3)):
    state = jax.eval_shape(tx.init, params)
    shardings = parallel.state_shardings(state, DATA_X_FSDP, family_axes=axes)
    checked = 0
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(state),
                                      jax.tree.leaves(shardings)):
      names = logical.key_names(path)
      if names[-1] == "absmax":
        assert sharding.spec == parallel.parameter_spec(leaf.shape, DATA_X_FSDP)
        continue
      while names and names[-1] in logical.WRAPPERS:
        names.pop()
      param = next((".".join(names[i:]) for i in range(len(names))
                    if ".".join(names[i:]) in specs), None)
      if param is not None:
        assert sharding.spec == specs[param], (path, sharding.spec, specs[param])
        checked += 1
    assert checked == 2 * len(specs)


def test_annotate_sets_nnx_partition_metadata():
  model = model_io.abstract(lambda rngs: UNetSpatioTemporal(UNetConfig.from_dict(
      UNET_TWO_LEVELS), rngs=rngs))
  parallel.annotate(model, DATA_X_FSDP)
  expected = parallel.partition_specs(nnx.state(model), DATA_X_FSDP,
                                      family_axes=parallel.model_axes(model))
  got = nnx.get_partition_spec(nnx.state(model))
  assert {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(got)} == expected
  kernel = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.kernel
  assert kernel.get_metadata()["out_sharding"] == ("embed", "heads")


def test_golden_sharding_specs_of_full_size_ethd():
  """Every ETHD parameter's logical names and spec on 8-way FSDP, against the checked-in
  tests/helpers/golden/ethd_sharding_specs.json (`python tests/helpers/ethd_sharding_golden.py
  --regen` after an intended change)."""

  result = golden.compute()
  expected = json.loads(golden.GOLDEN.read_text())
  diff = [f"{path}: golden {expected['specs'].get(path)} now {result['specs'].get(path)}"
          for path in sorted(set(expected["specs"]) | set(result["specs"]))
          if expected["specs"].get(path) != result["specs"].get(path)]
  assert not diff, f"{len(diff)} specs differ from the golden file:\n" + "\n".join(diff[:200])
  assert {k: v for k, v in result.items() if k != "specs"} == {
      k: v for k, v in expected.items() if k != "specs"}
  assert result["parameters"] == 1516
  # 1,577,631,658 fp32 parameters (test_ethd): 5.88 GiB replicated, 0.74 GiB per device.
  assert result["bytes_replicated"] == 4 * 1_577_631_658
  assert result["bytes_per_device"] < result["bytes_replicated"] / 7.9


def test_train_state_of_model_and_optimizer():
  """The train loop's state `nnx.split((model, optimizer))`: `tree_axes` names the model's
  parameters under `0.` and Adam's moments under `1.opt_state...` take the same specs."""
  model = UNetSpatioTemporal(UNetConfig.from_dict(UNET_TWO_LEVELS), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  axes = parallel.tree_axes((model, optimizer))
  assert axes == {f"0.{k}": v for k, v in parallel.model_axes(model).items()}
  _, state = nnx.split((model, optimizer))
  specs = parallel.partition_specs(state, DATA_X_FSDP, family_axes=axes)
  kernel = "down_blocks.1.attentions.0.transformer_blocks.0.ff.proj_in.kernel"
  assert specs[f"0.{kernel}"] == P(None, "fsdp")
  assert specs[f"1.opt_state.0.mu.{kernel}"] == specs[f"1.opt_state.0.nu.{kernel}"] == P(
      None, "fsdp")
