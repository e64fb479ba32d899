"""configs/vaid.py and configs/dicte.py build the models they describe, and the projector and
Di-CTE save and load through `model_io` (config.json + Orbax state) unchanged."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from etalk_jax import model_io
from etalk_jax.vaid.dicte import DICTE_FULL, DICTE_TINY, DiCTE, DiCTEConfig
from etalk_jax.vaid.projector import (
  PROJECTOR_FULL,
  PROJECTOR_TINY,
  AudioLipProjector,
  ProjectorConfig,
)
from etalk_jax.vaid.storage import load_dicte, load_projector, save_vaid_model

CONFIGS = Path(__file__).parents[2] / "configs"


def _config_module(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _parameters(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_full_configs_are_the_default_models_with_the_documented_sizes():
  projector = ProjectorConfig(**_config_module("vaid").get_config().projector)
  dicte = DiCTEConfig(**_config_module("dicte").get_config().dicte)
  assert projector == PROJECTOR_FULL and dicte == DICTE_FULL
  # The figures the config docstrings quote.
  assert _parameters(model_io.abstract(lambda rngs: AudioLipProjector(projector, rngs=rngs))
                     ) == 29_381_120
  assert _parameters(model_io.abstract(lambda rngs: DiCTE(dicte, rngs=rngs))) == 53_173_086


def test_tiny_variants_build_and_unknown_variants_are_refused():
  for name, config_class, field in (("vaid", ProjectorConfig, "projector"),
                                    ("dicte", DiCTEConfig, "dicte")):
    module = _config_module(name)
    config_class(**module.get_config("tiny")[field])
    with pytest.raises(ValueError, match="variants"):
      module.get_config("huge")


@pytest.mark.parametrize("config, model_class, load", [
    (PROJECTOR_TINY, AudioLipProjector, load_projector),
    (DICTE_TINY, DiCTE, load_dicte)])
def test_save_and_load_round_trip(tmp_path, config, model_class, load):
  model = model_class(config, rngs=nnx.Rngs(3))
  save_vaid_model(model, tmp_path / "model")
  restored = load(tmp_path / "model")
  assert restored.config == config
  for want, got in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
    np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


def test_loading_the_other_model_is_a_clear_error(tmp_path):
  save_vaid_model(AudioLipProjector(PROJECTOR_TINY, rngs=nnx.Rngs(0)), tmp_path / "projector")
  with pytest.raises(ValueError, match="does not hold a V-AID Di-CTE.*vaid_projector"):
    load_dicte(tmp_path / "projector")
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    load_projector(tmp_path / "nothing")
