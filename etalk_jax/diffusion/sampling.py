"""Euler sampling on Karras sigmas (SVD's sampler; the paper's "DDIM", 25 steps) and the
overlapping-window sampler for videos of any length (docs/ARCHITECTURE.md §3.7, §3.8).

The denoiser is a pure function

  denoiser(params, scaled_noisy, c_noise, frame_conditions, video_conditions) -> model output

with `scaled_noisy`: `(batch, frames, h, w, c)` already multiplied by c_in, `c_noise`: a scalar,
`frame_conditions`: a pytree of arrays laid out `(batch, frames, ...)` (a reference latent to
concatenate, per-frame lip or expression tokens, masks) that windows slice along the frames,
and `video_conditions`: a pytree with the batch first (cross-attention context, added time ids)
shared by every window. The denoiser is a static argument of the jitted samplers, so it must be
hashable and stable: a module-level function, or a `ModelDenoiser` (an nnx graphdef, which
compares by value, plus a module-level call function) whose weights travel in `params` as an
nnx state. A new window, a new video or new weights of the same structure reuse the compiled
loop.

Compile-once design for long videos: the windowed loop never sees the video length. The window
count is padded to a bucket (a power of two number of window groups, at least
`WindowConfig.min_window_groups`), the latents to the frame count the bucket can cover, and
the window start positions and blend weights are traced arrays. Padded groups are skipped at run
time by `lax.cond` inside the `lax.map` over groups (the cond is a real branch there, not a
select), so padding costs memory for a few latents, not UNet evaluations. Every length whose
window count falls into the same bucket runs the same executable; with the default of 8 groups
of one window that is every 512² video from 121 to 792 frames. A video no longer than one
window is sampled as a single window of its own length (the temporal layers see the frame
count, so padding it would change the result): one compile per such length.

Sharding over devices (`sample_video(..., devices=...)`): the windows of a group are split over a
1-D mesh (axis "windows") of the given devices, the parameters, noise and conditions replicated.
`windows_for_devices` rounds `windows_per_call` up to a multiple of the device count and scales
`min_window_groups` down so the smallest bucket holds about as many windows as before; padded
windows inside a group have zero blend weight, so the devices that hold them compute harmlessly.
With guidance the doubled (unconditional + conditional) batch is split the same way. The mesh's
`NamedSharding` is a static argument: one compile per bucket and device set, as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from etalk_jax.diffusion.edm import denoised_from_v, noise_conditioning, scale_model_input
from etalk_jax.errors import UserError

Denoiser = Callable[[Any, jax.Array, jax.Array, Any, Any], jax.Array]

WINDOW_AXIS = "windows"  # the mesh axis the windows of a group (their batch axis) split over


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Euler on Karras sigmas as SVD's EulerDiscreteScheduler runs it; guidance off by default."""
  steps: int = 25
  sigma_min: float = 0.002
  sigma_max: float = 700.0
  rho: float = 7.0
  # SVD-style classifier-free guidance, linear over a window's frames from min to max; equal
  # values give a constant scale; 1.0 and 1.0 switch guidance off (one denoiser call per step).
  min_guidance_scale: float = 1.0
  max_guidance_scale: float = 1.0

  @property
  def guided(self) -> bool:
    return self.min_guidance_scale != 1.0 or self.max_guidance_scale != 1.0


@dataclasses.dataclass(frozen=True)
class WindowConfig:
  """Overlapping temporal windows denoised together at every step."""
  frames: int = 120
  overlap: int = 24
  windows_per_call: int = 1  # windows batched through one denoiser call (memory bound)
  min_window_groups: int = 8  # smallest window-group bucket: lengths up to it compile once

  def __post_init__(self):
    if not 0 <= self.overlap < self.frames:
      raise UserError(f"WindowConfig: overlap {self.overlap} must be in [0, frames "
                      f"{self.frames}); fix the window config.")


WINDOWS_512 = WindowConfig(frames=120, overlap=24)
WINDOWS_1024 = WindowConfig(frames=32, overlap=12)


def windows_for_devices(config: WindowConfig, devices: int) -> WindowConfig:
  """`config` for windows split over `devices`: `windows_per_call` rounded up to a multiple of
  the device count (every device gets whole windows of each group) and `min_window_groups`
  scaled down so that the smallest bucket holds about as many windows as `config`'s (8 groups of
  1 window on 8 devices -> 1 group of 8). One device: `config` unchanged."""
  if devices < 1:
    raise ValueError(f"windows_for_devices: {devices} devices; give at least 1.")
  if devices == 1:
    return config
  per_call = -(-config.windows_per_call // devices) * devices
  capacity = config.windows_per_call * config.min_window_groups
  return dataclasses.replace(config, windows_per_call=per_call,
                             min_window_groups=max(1, -(-capacity // per_call)))


def window_sharding(devices) -> NamedSharding | None:
  """The sharding of a window group's batch axis over a 1-D mesh of `devices`; None (no
  sharding) for None or a single device."""
  if devices is None:
    return None
  devices = list(devices)
  if not devices:
    raise ValueError("sample_video: `devices` is empty; give None (one device) or the devices "
                     "to split the windows over, e.g. jax.local_devices().")
  if len(set(devices)) != len(devices):
    raise ValueError(f"sample_video: `devices` lists a device twice ({devices}); give each "
                     "device once.")
  if len(devices) == 1:
    return None
  return NamedSharding(Mesh(np.asarray(devices), (WINDOW_AXIS,)), P(WINDOW_AXIS))


def _constrain(tree, sharding: NamedSharding | None, leading: int = 0):
  """Every leaf of `tree` split over `sharding`'s mesh on axis `leading` (the axes before it
  replicated); no-op without a sharding."""
  if sharding is None:
    return tree
  spec = NamedSharding(sharding.mesh, P(*(None,) * leading, *sharding.spec))
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)


class Guidance(NamedTuple):
  """Classifier-free guidance inputs: the unconditional conditions (same structures as the
  conditional ones; SVD uses zeros) and the per-frame scale `(frames,)`."""
  frame_conditions: Any
  video_conditions: Any
  scale: jax.Array


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0,
                  rho: float = 7.0) -> np.ndarray:
  """`(steps + 1,)` float32 sigmas, Karras' rho-spaced ramp from sigma_max to sigma_min and a
  final 0, computed in float64 and rounded once, exactly as diffusers does."""
  ramp = np.linspace(0, 1, steps)
  min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
  return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def sampler_sigmas(config: SamplerConfig) -> np.ndarray:
  return karras_sigmas(config.steps, config.sigma_min, config.sigma_max, config.rho)


def initial_noise_scale(sigmas: jax.Array) -> jax.Array:
  """sqrt(sigma_max^2 + 1): diffusers' `init_noise_sigma` for SVD's "leading" spacing."""
  return (sigmas[0] ** 2 + 1) ** 0.5


def guidance_scales(frames: int, min_scale: float, max_scale: float) -> np.ndarray:
  """SVD's per-frame guidance: linear from min_scale (first frame) to max_scale (last)."""
  return np.linspace(min_scale, max_scale, frames, dtype=np.float32)


def euler_step(model_output: jax.Array, noisy: jax.Array, sigma: jax.Array,
               sigma_next: jax.Array) -> jax.Array:
  """One deterministic Euler step of the probability-flow ODE, as diffusers' `step` (no churn)."""
  denoised = denoised_from_v(model_output.astype(jnp.float32), noisy, sigma)
  derivative = (noisy - denoised) / sigma
  return noisy + derivative * (sigma_next - sigma)


@dataclasses.dataclass(frozen=True)
class ModelDenoiser:
  """A denoiser around an nnx model split into (graphdef, state): `params` is the state.

  `call(model, scaled_noisy, c_noise, frame_conditions, video_conditions)` must be a
  module-level function so that two ModelDenoisers of one architecture compare equal and share
  the compiled sampler.
  """
  graphdef: nnx.GraphDef
  call: Callable[..., jax.Array]

  def __call__(self, params, scaled_noisy, c_noise, frame_conditions, video_conditions):
    return self.call(nnx.merge(self.graphdef, params), scaled_noisy, c_noise, frame_conditions,
                     video_conditions)


def model_denoiser(model: nnx.Module, call: Callable[..., jax.Array]
                   ) -> tuple[ModelDenoiser, nnx.State]:
  """(denoiser, params) for an nnx model."""
  graphdef, state = nnx.split(model)
  return ModelDenoiser(graphdef, call), state


def call_svd_unet(unet, scaled_noisy: jax.Array, c_noise: jax.Array, frame_conditions: dict,
                  video_conditions: dict) -> jax.Array:
  """SVD's UNet call: the (unscaled) reference latent `frame_conditions["reference_latents"]`,
  when given, is concatenated on the channels after input scaling, as the SVD pipeline does;
  `video_conditions` holds `encoder_hidden_states` and `added_time_ids`."""
  if "reference_latents" in frame_conditions:
    scaled_noisy = jnp.concatenate([scaled_noisy, frame_conditions["reference_latents"]], -1)
  return unet(scaled_noisy, c_noise, video_conditions["encoder_hidden_states"],
              video_conditions["added_time_ids"])


def _concat_batch(unconditional, conditional):
  return jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), unconditional, conditional)


def _model_output(denoiser: Denoiser, params, noisy: jax.Array, sigma: jax.Array,
                  frame_conditions, video_conditions, guidance: Guidance | None,
                  batch_sharding: NamedSharding | None = None) -> jax.Array:
  """The denoiser's output at `sigma`, guided when `guidance` is given: the unconditional and
  conditional halves go through one batched call, out = u + scale * (c - u) (SVD's order).
  batch_sharding: splits the denoiser's batch (the doubled one with guidance) over its mesh."""
  scaled = scale_model_input(noisy, sigma)
  c_noise = noise_conditioning(sigma)
  if guidance is None:
    return denoiser(params, scaled, c_noise, frame_conditions, video_conditions)
  # The concatenation is placed like its halves only if told: without the constraint XLA may
  # run the doubled batch replicated, every device computing every window.
  both = denoiser(params,
                  _constrain(jnp.concatenate([scaled, scaled], axis=0), batch_sharding),
                  c_noise,
                  _constrain(_concat_batch(guidance.frame_conditions, frame_conditions),
                             batch_sharding),
                  _constrain(_concat_batch(guidance.video_conditions, video_conditions),
                             batch_sharding))
  unconditional, conditional = jnp.split(both, 2, axis=0)
  scale = guidance.scale.reshape((1, -1) + (1,) * (noisy.ndim - 2))
  return unconditional + scale * (conditional - unconditional)


@functools.partial(jax.jit, static_argnames=("denoiser",))
def sample_clip(denoiser: Denoiser, params, noise: jax.Array, sigmas: jax.Array,
                frame_conditions, video_conditions, guidance: Guidance | None = None
                ) -> jax.Array:
  """All Euler steps of one clip (one window) in one compiled `fori_loop`.

  noise: standard normal `(batch, frames, h, w, c)`; sigmas: `(steps + 1,)` ending in 0
  (`sampler_sigmas`). Returns the clean latents.
  """
  def step(i, latents):
    output = _model_output(denoiser, params, latents, sigmas[i], frame_conditions,
                           video_conditions, guidance)
    return euler_step(output, latents, sigmas[i], sigmas[i + 1])

  latents = noise.astype(jnp.float32) * initial_noise_scale(sigmas)
  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, latents)


class WindowPlan(NamedTuple):
  """Where the windows of one video sit, padded to a compile bucket (host-side numpy)."""
  frames: int  # the video's frame count
  window_frames: int  # frames per window (the video's, when it is shorter than one window)
  buffer_frames: int  # padded frame count the bucket covers
  starts: np.ndarray  # (padded windows,) int32 first frame of each window
  weights: np.ndarray  # (padded windows, window_frames) float32 blend weights, 0 for padding
  active_groups: np.ndarray  # (groups,) bool: groups holding at least one real window
  windows: int  # real windows


def window_starts(frames: int, window_frames: int, overlap: int) -> np.ndarray:
  """First frames of the fewest windows of `window_frames` that cover `frames` with overlaps of
  at least `overlap`, spread evenly so that the first starts at 0 and the last ends the video."""
  if frames <= window_frames:
    return np.zeros(1, np.int32)
  stride = window_frames - overlap
  count = math.ceil((frames - window_frames) / stride) + 1
  return np.round(np.arange(count) * (frames - window_frames) / (count - 1)).astype(np.int32)


def blend_weights(starts: np.ndarray, window_frames: int, frames: int) -> np.ndarray:
  """`(windows, window_frames)` linear cross-fade weights that sum to 1 on every frame.

  Each window ramps up over its overlap with the previous window and down over its overlap
  with the next: in an overlap of L frames the later window's weight at frame k is
  (k + 1) / (L + 1) and the earlier one's the rest. Frames covered by three windows (possible
  when windows are packed tighter than half a window) are normalised to sum to 1.
  """
  ends = starts + window_frames
  position = np.arange(window_frames, dtype=np.float64)
  raw = np.ones((len(starts), window_frames))
  for i in range(len(starts)):
    if i > 0:
      left = ends[i - 1] - starts[i]
      raw[i] = np.minimum(raw[i], (position + 1) / (left + 1))
    if i < len(starts) - 1:
      right = ends[i] - starts[i + 1]
      raw[i] = np.minimum(raw[i], (window_frames - position) / (right + 1))
  total = np.zeros(frames)
  for i, start in enumerate(starts):
    total[start:start + window_frames] += raw[i]
  return (raw / np.stack([total[s:s + window_frames] for s in starts])).astype(np.float32)


def plan_windows(frames: int, config: WindowConfig) -> WindowPlan:
  window_frames = min(frames, config.frames)
  starts = window_starts(frames, config.frames, config.overlap)
  weights = blend_weights(starts, window_frames, frames)
  groups = math.ceil(len(starts) / config.windows_per_call)
  padded_groups = max(config.min_window_groups, 1 << (groups - 1).bit_length())
  padded = padded_groups * config.windows_per_call
  # The frames a bucket can hold depend on the bucket only, so lengths share the buffer shape.
  stride = config.frames - config.overlap
  buffer_frames = frames if frames <= config.frames else (padded - 1) * stride + config.frames
  pad = padded - len(starts)
  return WindowPlan(
      frames=frames, window_frames=window_frames, buffer_frames=buffer_frames,
      starts=np.pad(starts, (0, pad)).astype(np.int32),
      weights=np.pad(weights, ((0, pad), (0, 0))),
      active_groups=np.arange(padded_groups) < groups, windows=len(starts))


def _pad_frames(tree, frames: int):
  """Zero-pads the frame axis (1) of every leaf on the host: no per-length device compile."""
  def pad(x):
    x = np.asarray(x)
    return np.pad(x, [(0, 0), (0, frames - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  return jax.tree.map(pad, tree)


def _gather_windows(video: jax.Array, frame_index: jax.Array, groups: int) -> jax.Array:
  """(batch, buffer_frames, ...) -> (groups, windows_per_group * batch, window_frames, ...)."""
  windows = jnp.moveaxis(video[:, frame_index], 1, 0)  # (windows, batch, window_frames, ...)
  return windows.reshape((groups, -1) + windows.shape[2:])


def _blend(windows: jax.Array, frame_index: jax.Array, weights: jax.Array,
           buffer_frames: int) -> jax.Array:
  """(windows, batch, window_frames, ...) -> (batch, buffer_frames, ...), the weighted sum of
  the windows on every frame (the weights sum to 1 wherever a real window lies)."""
  weighted = windows * weights.reshape(weights.shape + (1,) * (windows.ndim - 3))[:, None]
  video = jnp.zeros((windows.shape[1], buffer_frames) + windows.shape[3:], windows.dtype)
  return video.at[:, frame_index].add(jnp.moveaxis(weighted, 0, 1))


def blend_windows(windows: jax.Array, starts: jax.Array, weights: jax.Array,
                  buffer_frames: int) -> jax.Array:
  """Cross-fades `(windows, batch, window_frames, ...)` into `(batch, buffer_frames, ...)`."""
  frame_index = jnp.asarray(starts)[:, None] + jnp.arange(windows.shape[2])
  return _blend(windows, frame_index, jnp.asarray(weights), buffer_frames)


@functools.partial(jax.jit, static_argnames=("denoiser", "windows_per_call", "sharding"))
def _sample_windows(denoiser: Denoiser, params, noise: jax.Array, sigmas: jax.Array,
                    frame_conditions, video_conditions, guidance: Guidance | None,
                    starts: jax.Array, weights: jax.Array, active_groups: jax.Array, *,
                    windows_per_call: int, sharding: NamedSharding | None = None) -> jax.Array:
  """sharding: splits each group's batch axis (windows x batch) over its mesh; None: one
  device."""
  batch, buffer_frames = noise.shape[:2]
  groups = active_groups.shape[0]
  frame_index = starts[:, None] + jnp.arange(weights.shape[1])  # (windows, window_frames)
  repeat = lambda tree: jax.tree.map(lambda x: jnp.concatenate([x] * windows_per_call), tree)
  # Stacked per group (groups, windows_per_call * batch, ...): split on axis 1, each device
  # holding its windows of every group.
  gather = lambda tree: _constrain(
      jax.tree.map(lambda x: _gather_windows(x, frame_index, groups), tree), sharding, 1)
  window_conditions = gather(frame_conditions)
  shared_conditions = _constrain(repeat(video_conditions), sharding)
  if guidance is not None:
    guidance_frames = gather(guidance.frame_conditions)
    guidance_video = _constrain(repeat(guidance.video_conditions), sharding)

  def denoise_group(sigma, group):
    active, latents, conditions = group[0], _constrain(group[1], sharding), group[2]
    conditions = _constrain(conditions, sharding)
    group_guidance = None
    if guidance is not None:
      group_guidance = Guidance(_constrain(group[3], sharding), guidance_video, guidance.scale)
    run = lambda: _constrain(_model_output(
        denoiser, params, latents, sigma, conditions, shared_conditions, group_guidance,
        sharding).astype(jnp.float32), sharding)
    # Padded groups hold no real window: skip the network (a real branch inside lax.map).
    return jax.lax.cond(active, run, lambda: jnp.zeros_like(latents))

  def step(i, video):
    windows = _constrain(_gather_windows(video, frame_index, groups), sharding, 1)
    group_inputs = (active_groups, windows, window_conditions)
    if guidance is not None:
      group_inputs += (guidance_frames,)
    outputs = jax.lax.map(functools.partial(denoise_group, sigmas[i]), group_inputs)
    updated = euler_step(outputs, windows, sigmas[i], sigmas[i + 1])
    updated = updated.reshape((-1, batch) + updated.shape[2:])  # (windows, batch, ...)
    return _blend(updated, frame_index, weights, buffer_frames)

  video = noise.astype(jnp.float32) * initial_noise_scale(sigmas)
  return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, video)


def sample_video(denoiser: Denoiser, params, noise: jax.Array, frame_conditions=None,
                 video_conditions=None, *, sampler: SamplerConfig = SamplerConfig(),
                 windows: WindowConfig = WINDOWS_512, unconditional: tuple | None = None,
                 devices=None) -> jax.Array:
  """Samples latents of a video of any length with overlapping windows.

  noise: standard normal `(batch, frames, h, w, c)`; frame_conditions: pytree of
  `(batch, frames, ...)` arrays, cut into windows with the latents; video_conditions: pytree of
  `(batch, ...)` arrays given to every window. unconditional: `(frame_conditions,
  video_conditions)` for classifier-free guidance, used when `sampler` asks for guidance (SVD's
  per-frame linear scale over each window). All windows are denoised together at every step and
  re-blended after it; returns `(batch, frames, h, w, c)` float32 latents.
  devices: None (or one device): as today, on the default device; several: each group's
  windows (`windows_for_devices(windows, len(devices))` of them) split over a 1-D mesh of
  them, everything else replicated (`params` already replicated on that mesh are not copied).
  """
  frame_conditions = {} if frame_conditions is None else frame_conditions
  video_conditions = {} if video_conditions is None else video_conditions
  frames = noise.shape[1]
  sharding = window_sharding(devices)
  if sharding is not None:
    windows = windows_for_devices(windows, sharding.mesh.size)
  plan = plan_windows(frames, windows)
  guidance = None
  if sampler.guided:
    if unconditional is None:
      raise ValueError("sample_video: the sampler config asks for classifier-free guidance "
                       "(guidance scales != 1) but no `unconditional` conditions were given.")
    guidance = Guidance(_pad_frames(unconditional[0], plan.buffer_frames), unconditional[1],
                        guidance_scales(plan.window_frames, sampler.min_guidance_scale,
                                        sampler.max_guidance_scale))
  inputs = (params, _pad_frames(noise, plan.buffer_frames), sampler_sigmas(sampler),
            _pad_frames(frame_conditions, plan.buffer_frames), video_conditions, guidance,
            plan.starts, plan.weights, plan.active_groups)
  if sharding is not None:
    # Every input on every device of the mesh (a no-op for arrays already placed so): the jitted
    # loop then runs on the mesh and the constraints inside split the windows.
    inputs = jax.device_put(inputs, NamedSharding(sharding.mesh, P()))
  latents = _sample_windows(denoiser, *inputs, windows_per_call=windows.windows_per_call,
                            sharding=sharding)
  return latents[:, :frames]
