"""The import graph of etalk_jax and data_pipeline (tools/check_imports.py): no cycles, and the
lower layers (layers/, the model packages) import nothing from parallel/, train/, the pipeline,
the demo or the CLI."""

import importlib.util
from pathlib import Path

ROOT = next(folder for folder in Path(__file__).resolve().parents
            if (folder / "tools" / "check_imports.py").is_file())
_spec = importlib.util.spec_from_file_location("check_imports",
                                               ROOT / "tools" / "check_imports.py")
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


def test_no_import_cycles_and_layering_kept():
  assert check_imports.problems(ROOT) == []


def test_checker_finds_deferred_cycles_and_layering_breaches(tmp_path):
  files = {
      "etalk_jax/__init__.py": "",
      "etalk_jax/layers/__init__.py": "",
      "etalk_jax/layers/block.py": "from etalk_jax.layers import helper\n",
      "etalk_jax/layers/helper.py": "def f():\n  from etalk_jax.train import loop\n",
      "etalk_jax/train/__init__.py": "",
      "etalk_jax/train/loop.py": "from ..layers.block import Block\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  assert check_imports.problems(tmp_path) == [
      "import cycle: etalk_jax.layers.block -> etalk_jax.layers.helper -> etalk_jax.train.loop "
      "-> etalk_jax.layers.block",
      "etalk_jax.layers.block (a lower layer) imports etalk_jax.train.loop: "
      "etalk_jax.layers.block -> etalk_jax.layers.helper -> etalk_jax.train.loop",
      "etalk_jax.layers.helper (a lower layer) imports etalk_jax.train.loop: "
      "etalk_jax.layers.helper -> etalk_jax.train.loop",
  ]
