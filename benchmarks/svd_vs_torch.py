"""SVD backbone figures: our jitted UNet vs diffusers' eager UNet, and full-size conversion.

  .venv/bin/python benchmarks/svd_vs_torch.py                 # both parts
  .venv/bin/python benchmarks/svd_vs_torch.py --skip-convert  # speed only (a few minutes)

Part 1 (speed): same random weights, a medium config (channels 64/128/256, 2 layers per block,
8 frames, 32x32 latents, batch 1): median forward time of each (runs of the two interleaved, so
background load hits both alike), the ratio (ours / PyTorch) and our compile time. Part 2
(conversion): writes a random fp16 safetensors SVD-XT UNet (1,524,623,082 parameters, ~3 GB)
and times `etalk convert svd` on it in a fresh process, reporting wall time and that process's
peak RSS against the fp32 model size.
Figures go to stdout; copy them into WORKSPACE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from etalk_jax.svd.config import UNetConfig
from etalk_jax.svd.params import WEIGHTS_STEM, abstract_model, conversion_table

from svd_compare import compare_unet  # benchmarks/ sibling

MEDIUM_UNET = dict(
    sample_size=32, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                      "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(64, 128, 256), addition_time_embed_dim=64,
    projection_class_embeddings_input_dim=192, layers_per_block=2, cross_attention_dim=256,
    transformer_layers_per_block=1, num_attention_heads=(1, 2, 4), num_frames=8)


def speed(repeats: int) -> None:
  import torch  # noqa: PLC0415 (PyTorch is optional: only the speed part needs it)
  print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")
  result = compare_unet(MEDIUM_UNET, frames=8, size=32, repeats=repeats)
  print(f"[speed] medium UNet, {result['parameters']:,} parameters, 1 x 8 frames x 32 x 32")
  print(f"  relative difference          {result['relative_error']:.2e}")
  print(f"  ours (jit) median forward    {result['jax_forward_s'] * 1e3:8.1f} ms")
  print(f"  diffusers (eager) median     {result['torch_forward_s'] * 1e3:8.1f} ms")
  print(f"  ratio ours / PyTorch         {result['ratio_jax_over_torch']:8.2f}x")
  print(f"  our XLA compile              {result['jax_compile_s']:8.1f} s")


def write_random_svd_xt_unet(folder: Path) -> int:
  """A diffusers UNet folder with random fp16 weights in SVD-XT's exact layout."""
  config = UNetConfig()
  table = conversion_table(abstract_model("unet", config))
  rng = np.random.default_rng(0)
  tensors, count = {}, 0
  for key, entry in table.entries.items():
    shape = entry.transform.to_theirs(np.empty(entry.shape, np.uint8)).shape
    tensors[key] = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)
    count += int(np.prod(shape))
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config.to_dict()))
  save_file(tensors, str(folder / f"{WEIGHTS_STEM}.fp16.safetensors"))
  return count


def conversion(workdir: Path) -> None:
  src, dst = workdir / "svd_xt_unet", workdir / "converted"
  start = time.perf_counter()
  parameters = write_random_svd_xt_unet(src)
  size = sum(p.stat().st_size for p in src.iterdir())
  print(f"[convert] wrote a random fp16 SVD-XT UNet: {parameters:,} parameters, "
        f"{size / 2**30:.2f} GiB, in {time.perf_counter() - start:.0f} s")
  command = [sys.executable, "-m", "etalk_jax.cli", "convert", "svd", "--src", str(src),
             "--dst", str(dst)]
  start = time.perf_counter()
  subprocess.run(command, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  wall = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
  fp32_bytes = parameters * 4
  print(f"  etalk convert svd wall time  {wall:8.1f} s   (goal < 120 s)")
  print(f"  peak RSS of that process     {peak / 2**30:8.2f} GiB = "
        f"{peak / fp32_bytes:.2f}x the fp32 model ({fp32_bytes / 2**30:.2f} GiB; goal < 1.5x)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-convert", action="store_true")
  parser.add_argument("--skip-speed", action="store_true")
  parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
  args = parser.parse_args()
  if not args.skip_speed:
    speed(args.repeats)
  if not args.skip_convert:
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
      conversion(Path(workdir))


if __name__ == "__main__":
  main()
