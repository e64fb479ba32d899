"""Sharding specs of the full-size ETHD's parameters on an 8-way FSDP mesh, for the golden test.

`python tests/helpers/ethd_sharding_golden.py --regen` rewrites
tests/helpers/golden/ethd_sharding_specs.json after an intended change of the logical tables or
rules; tests/parallel/test_rules.py compares against it and prints the difference. Only the mesh's
axis sizes matter, so an AbstractMesh stands in for 8 devices and nothing is allocated
(model_io.abstract builds the 1.58 G-parameter model as shapes in ~2 s).
"""

import json
import sys
from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from etalk_jax import model_io, parallel
from etalk_jax.ethd.model import ETHD, ETHDConfig

GOLDEN = Path(__file__).parent / "golden" / "ethd_sharding_specs.json"
FSDP8 = AbstractMesh((1, 8), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def spec_json(spec) -> list:
  return [list(axis) if isinstance(axis, tuple) else axis for axis in spec]


def compute() -> dict:
  """Specs, logical names and per-device bytes (fp32) of every ETHD parameter."""
  model = model_io.abstract(lambda rngs: ETHD(ETHDConfig(), rngs=rngs))
  axes = parallel.model_axes(model)
  _, params = nnx.split(model, nnx.Param)
  specs = parallel.partition_specs(params, FSDP8, family_axes=axes)
  replicated = sharded = 0
  for path, leaf in nnx.to_flat_state(params):
    value = leaf.get_value()
    spec = specs[".".join(map(str, path))]
    shards = int(np.prod([FSDP8.shape[a] for axis in spec if axis
                          for a in ((axis,) if isinstance(axis, str) else axis)]))
    size = int(np.prod(value.shape)) * value.dtype.itemsize
    replicated += size
    sharded += size // shards
  return {"mesh": dict(FSDP8.shape), "parameters": len(specs),
          "bytes_replicated": replicated, "bytes_per_device": sharded,
          "specs": {path: [list(axes[path]), spec_json(spec)]
                    for path, spec in sorted(specs.items())}}


def dumps(result: dict) -> str:
  """One parameter a line: `"path": [[logical names], [spec]]`, so a diff reads per tensor."""
  head = {k: v for k, v in result.items() if k != "specs"}
  lines = [f"  {json.dumps(path)}: {json.dumps(entry)}"
           for path, entry in result["specs"].items()]
  return (json.dumps(head, sort_keys=True)[:-1] + ', "specs": {\n' + ",\n".join(lines)
          + "\n}}\n")


if __name__ == "__main__":
  if "--regen" not in sys.argv:
    sys.exit("usage: python tests/helpers/ethd_sharding_golden.py --regen")
  result = compute()
  GOLDEN.parent.mkdir(exist_ok=True)
  GOLDEN.write_text(dumps(result))
  print(f"wrote {GOLDEN}: {result['parameters']} parameters, "
        f"{result['bytes_per_device'] / 2**30:.3f} GiB per device of "
        f"{result['bytes_replicated'] / 2**30:.3f} GiB")
