"""Parameter counts and XLA-counted FLOPs of V-AID at full size: the audio-lip projector and
Di-CTE with DDIM sampling, for one clip, beside the paper's 0.45 TFLOPs.

  python benchmarks/vaid_flops.py [--frames 120] [--steps 25] [--image-size 512]

Nothing is materialised: the models are abstract (`model_io.abstract`) and every function is only
lowered and compiled for its shapes. XLA's cost analysis counts a while loop's body once, so
Di-CTE's sampling is reported as context + steps x one denoiser call, next to the raw count of
the jitted `denoise_window` loop. The wav2vec2 features (A_w) are inputs here, not counted.
Figures only: nothing is asserted.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from etalk_jax import model_io
from etalk_jax.vaid.dicte import DICTE_FULL, DiCTE, _denoise_window, sampling_schedule
from etalk_jax.vaid.projector import PROJECTOR_FULL, AudioLipProjector

PAPER_VAID_TFLOPS = 0.45


def _params(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float(cost["flops"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--frames", type=int, default=120)
  parser.add_argument("--steps", type=int, default=DICTE_FULL.sample_steps)
  parser.add_argument("--image-size", type=int, default=512)
  args = parser.parse_args()
  if args.frames > DICTE_FULL.window_frames:
    parser.error(f"--frames must be at most one Di-CTE window ({DICTE_FULL.window_frames}).")

  projector = model_io.abstract(lambda rngs: AudioLipProjector(PROJECTOR_FULL, rngs=rngs))
  dicte = model_io.abstract(lambda rngs: DiCTE(DICTE_FULL, rngs=rngs))
  projector_graph, projector_state = nnx.split(projector)
  dicte_graph, dicte_state = nnx.split(dicte)
  f32 = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  frames, c = args.frames, DICTE_FULL
  audio = f32(1, frames, c.window, c.audio_layers, c.audio_dim)
  image = f32(1, args.image_size, args.image_size, c.image_channels)
  condition = f32(1, c.condition_dim)
  expression = f32(1, frames, c.expression_dim)
  context = f32(1, frames, c.dim)

  projector_flops = _flops(lambda s, a: nnx.merge(projector_graph, s)(a), projector_state, audio)
  context_flops = _flops(lambda s, a, i: nnx.merge(dicte_graph, s).context(a, i),
                         dicte_state, audio, image)
  denoise_flops = _flops(lambda s, x, ctx, cond: nnx.merge(dicte_graph, s).denoise(
      x, jnp.int32(500), ctx, cond), dicte_state, expression, context, condition)
  schedule = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in sampling_schedule(c, args.steps)]
  loop_flops = _flops(lambda s, *rest: _denoise_window(dicte_graph, s, *rest), dicte_state,
                      expression, expression, jax.ShapeDtypeStruct((1, frames, 1), jnp.bool_),
                      audio, image, condition, *schedule)
  dicte_flops = context_flops + args.steps * denoise_flops
  total = projector_flops + dicte_flops

  print(f"V-AID at full size, one {frames}-frame clip, x_ref {args.image_size}², "
        f"{args.steps} DDIM steps")
  print(f"  parameters: projector {_params(projector):,}, Di-CTE {_params(dicte):,}, "
        f"total {_params(projector) + _params(dicte):,}")
  print(f"  projector:              {projector_flops / 1e12:.4f} TFLOPs")
  print(f"  Di-CTE context (once):  {context_flops / 1e12:.4f} TFLOPs")
  print(f"  Di-CTE denoiser (1x):   {denoise_flops / 1e12:.4f} TFLOPs")
  print(f"  Di-CTE sampling:        {dicte_flops / 1e12:.4f} TFLOPs "
        f"(= context + {args.steps} x denoiser; the jitted loop's raw XLA count, which counts "
        f"the loop body once: {loop_flops / 1e12:.4f})")
  print(f"  V-AID total:            {total / 1e12:.4f} TFLOPs   (paper: {PAPER_VAID_TFLOPS} "
        "TFLOPs)")


if __name__ == "__main__":
  main()
