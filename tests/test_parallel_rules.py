import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from etalk_jax import model_io, parallel
from etalk_jax.parallel import rules
from etalk_jax.svd import UNetConfig, UNetSpatioTemporal
from svd_reference import UNET_TWO_LEVELS

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
  from etalk_jax.parallel.mesh import CLUSTER_VARIABLES
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  parallel.initialize_distributed()
  assert jax.process_count() == 1 and not jax.distributed.is_initialized()
