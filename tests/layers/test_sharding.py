"""Activation constraints follow the rules in force (etalk_jax/layers/sharding.py): the defaults
unless a `config.rules`-style override is installed with `use_rules`, as the train loop does."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from etalk_jax import model_io, parallel
from etalk_jax.layers import sharding
from etalk_jax.svd import UNetConfig, UNetSpatioTemporal
from tests.helpers.svd_reference import UNET_TWO_LEVELS

# Tracing needs only the mesh's axis sizes: an AbstractMesh stands in for 2 x 2 devices.
DATA_X_FSDP = AbstractMesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
# A config.rules override: batches over `data` only (pure data parallel, FSDP for weights).
DATA_ONLY = (("batch", "data"),) + tuple(rule for rule in parallel.DEFAULT_RULES
                                         if rule[0] != "batch")


def constraint_specs(jaxpr) -> list[P]:
  """The spec of every sharding constraint in a jaxpr, nested ones (remat, pjit) included."""
  specs = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "sharding_constraint":
      specs.append(eqn.params["sharding"].spec)
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        specs.extend(constraint_specs(inner))
  return specs


def traced_specs(function, *args) -> list[P]:
  # A fresh function each time: a traced function keeps the rules it was traced under.
  return constraint_specs(jax.make_jaxpr(lambda *a: function(*a))(*args).jaxpr)


def test_constrain_rows_follows_the_rules_in_force():
  x = jnp.zeros((4, 3))
  assert traced_specs(sharding.constrain_rows, x) == []  # no mesh: no constraint
  with jax.sharding.use_abstract_mesh(DATA_X_FSDP):
    assert traced_specs(sharding.constrain_rows, x) == [P(("data", "fsdp"), None)]
    with sharding.use_rules(DATA_ONLY):
      assert sharding.rules_in_force() == DATA_ONLY
      assert traced_specs(sharding.constrain_rows, x) == [P("data", None)]
    assert sharding.rules_in_force() == sharding.ACTIVATION_RULES
    assert traced_specs(sharding.constrain_rows, jnp.zeros((6, 3))) == [P("data", None)]


def test_default_rules_start_with_the_activation_rules():
  assert parallel.DEFAULT_RULES[:len(sharding.ACTIVATION_RULES)] == sharding.ACTIVATION_RULES


def test_unet_activation_constraints_follow_a_rules_override():
  # One level (and the mid block's transformer): every place the UNet constrains, traced fast.
  config = UNetConfig.from_dict({
      **UNET_TWO_LEVELS, "down_block_types": ("DownBlockSpatioTemporal",),
      "up_block_types": ("UpBlockSpatioTemporal",), "block_out_channels": (32,),
      "transformer_layers_per_block": 1})
  graphdef, state = nnx.split(model_io.abstract(
      lambda rngs: UNetSpatioTemporal(config, rngs=rngs)))
  batch, frames = 2, 2
  inputs = (jax.ShapeDtypeStruct((batch, frames, 8, 8, 4), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct((batch, 1, 16), jnp.float32),
            jax.ShapeDtypeStruct((batch, 3), jnp.float32))

  def forward(state, *inputs):
    return nnx.merge(graphdef, state)(*inputs)

  with jax.sharding.use_abstract_mesh(DATA_X_FSDP):
    default = traced_specs(forward, state, *inputs)
    with sharding.use_rules(DATA_ONLY):
      overridden = traced_specs(forward, state, *inputs)
  assert default and len(default) == len(overridden)
  assert {spec[0] for spec in default} == {("data", "fsdp")}  # rows over batch x FSDP
  assert {spec[0] for spec in overridden} == {"data"}  # P normalises a 1-tuple to its axis
