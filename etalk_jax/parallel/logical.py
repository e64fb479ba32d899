"""Logical axis names for every parameter of every model family, without touching model code.

Each family has a table of rules `(pattern, ndim, names)`: `pattern` is a regular expression
matched in full against the parameter's dotted nnx path (`down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q.kernel`), `ndim` its rank and `names` one logical name per
dimension, in the style of MaxText / levanter:

  Linear kernels    attention in  ('embed', 'heads'), attention out ('heads', 'embed'),
                    MLP in ('embed', 'mlp'), MLP out ('mlp', 'embed'); any other Linear
                    ('embed', 'mlp')
  conv kernels      Conv1d ('conv_w', 'conv_in', 'conv_out'), Conv2d ('conv_h', 'conv_w',
                    'conv_in', 'conv_out'), Conv3d ('conv_t', 'conv_h', 'conv_w', 'conv_in',
                    'conv_out')
  norms             ('norm',) for scales, biases and running statistics
  biases            ('bias',)
  embeddings        ('position', 'embed'), learned queries (None..., 'embed'), ...
  scalars           ('scalar',) (SVD's time-mixer factor)

Why a table outside the models: the models mirror diffusers / transformers module by module and
their converters depend on it; the sharding policy is a training concern and changes with the
mesh, so it lives here, next to the rules that map these names to mesh axes (rules.py).

Every parameter must match exactly one rule: `param_axes` raises listing every unmatched and
every ambiguously matched path, so a new layer type cannot silently fall back to replication.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from flax import nnx

# Logical axis names of parameters (activations use `batch` and `frames`, see rules.py).
EMBED = "embed"        # a model's residual / channel width on a Linear's "model" side
MLP = "mlp"            # hidden width of an MLP (and any other Linear's output)
HEADS = "heads"        # attention heads x head dim
CONV_T, CONV_H, CONV_W = "conv_t", "conv_h", "conv_w"   # kernel taps
CONV_IN, CONV_OUT = "conv_in", "conv_out"               # conv channels
NORM = "norm"          # norm scales / biases / running statistics
BIAS = "bias"          # Linear / conv biases
POSITION = "position"  # rows of a learned position table
SCALAR = "scalar"      # size-1 dims (mix factors, broadcast constants)

PARAM_LOGICAL_NAMES = (EMBED, MLP, HEADS, CONV_T, CONV_H, CONV_W, CONV_IN, CONV_OUT, NORM, BIAS,
                       POSITION, SCALAR)


class Rule(NamedTuple):
  pattern: str
  ndim: int
  names: tuple[str | None, ...]


def _at(parents: str, leaf: str) -> str:
  """A path ending in `<parent>.<leaf>`, the parent one of the `|`-separated names."""
  return rf"(?:.*\.)?(?:{parents})\.{leaf}"


ATTENTION_IN = "to_q|to_k|to_v|q_proj|k_proj|v_proj"
ATTENTION_OUT = "to_out|out_proj"
MLP_IN = "proj_in|intermediate_dense|fc1"
MLP_OUT = "proj_out|output_dense|fc2|linear_2|output"
_NAMED_LINEAR = "|".join((ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_OUT))
# A norm is any module whose attribute name contains "norm" (norm1, group_norm, stem_norm, ...).
_NORM_PARENT = r"[^.]*norm[^.]*"

# Layers every family is built from: disjoint by (leaf name, parent name, rank).
COMMON: tuple[Rule, ...] = (
    Rule(_at(ATTENTION_IN, "kernel"), 2, (EMBED, HEADS)),
    Rule(_at(ATTENTION_OUT, "kernel"), 2, (HEADS, EMBED)),
    Rule(_at(MLP_IN, "kernel"), 2, (EMBED, MLP)),
    Rule(_at(MLP_OUT, "kernel"), 2, (MLP, EMBED)),
    Rule(rf"(?:.*\.)?(?!(?:{_NAMED_LINEAR})\.)[^.]+\.kernel", 2, (EMBED, MLP)),  # other Linear
    Rule(r"(?:.*\.)?[^.]+\.kernel", 3, (CONV_W, CONV_IN, CONV_OUT)),
    Rule(r"(?:.*\.)?[^.]+\.kernel", 4, (CONV_H, CONV_W, CONV_IN, CONV_OUT)),
    Rule(r"(?:.*\.)?[^.]+\.kernel", 5, (CONV_T, CONV_H, CONV_W, CONV_IN, CONV_OUT)),
    Rule(_at(_NORM_PARENT, "(?:scale|bias)"), 1, (NORM,)),
    Rule(r"(?:.*\.)?(?![^.]*norm)[^.]+\.bias", 1, (BIAS,)),
)

SVD_EXTRA = (Rule(_at("time_mixer", "mix_factor"), 1, (SCALAR,)),)
SPEECH_EXTRA = (
    Rule("masked_spec_embed", 1, (EMBED,)),
    # Weight-normed grouped positional conv: v (taps, in per group, out), g one norm per tap.
    Rule(_at("conv", "weight_v"), 3, (CONV_W, CONV_IN, CONV_OUT)),
    Rule(_at("conv", "weight_g"), 3, (CONV_W, SCALAR, SCALAR)),
)
WAVLM_EXTRA = (
    Rule(_at("attention", "gru_rel_pos_const"), 4, (SCALAR, HEADS, SCALAR, SCALAR)),
    Rule(_at("rel_attn_embed", "embedding"), 2, (POSITION, HEADS)),
)
PDFGC_EXTRA = (Rule(_at(_NORM_PARENT, "(?:mean|var)"), 1, (NORM,)),)  # BatchNorm statistics
PROJECTOR_EXTRA = (
    Rule("position_embedding", 3, (POSITION, SCALAR, EMBED)),  # (window, layers, dim)
    Rule("query", 3, (SCALAR, SCALAR, EMBED)),
)
DICTE_EXTRA = (Rule("position_embedding", 2, (POSITION, EMBED)),)

FAMILIES: dict[str, tuple[Rule, ...]] = {
    # SVD's spatio-temporal UNet; ETHD adds TokenProjections (Linear) and EDI (attention).
    "unet": COMMON + SVD_EXTRA,
    "ethd": COMMON + SVD_EXTRA,
    "vae": COMMON + SVD_EXTRA,
    "wav2vec2": COMMON + SPEECH_EXTRA,
    "wavlm": COMMON + SPEECH_EXTRA + WAVLM_EXTRA,
    "pdfgc": COMMON + PDFGC_EXTRA,
    "projector": COMMON + PROJECTOR_EXTRA,
    "dicte": COMMON + DICTE_EXTRA,
}


def family_of(model: nnx.Module) -> str:
  """The family name of a model instance (most specific class first: ETHD is a UNet)."""
  from etalk_jax.audio.wav2vec2 import Wav2Vec2
  from etalk_jax.audio.wavlm import WavLM
  from etalk_jax.ethd.model import ETHD
  from etalk_jax.svd.unet import UNetSpatioTemporal
  from etalk_jax.svd.vae import TemporalVAE
  from etalk_jax.vaid.dicte import DiCTE
  from etalk_jax.vaid.projector import AudioLipProjector
  from etalk_jax.vision.pdfgc import AdaptedPDFGC, PDFGCEncoder
  for cls, name in ((ETHD, "ethd"), (UNetSpatioTemporal, "unet"), (TemporalVAE, "vae"),
                    (WavLM, "wavlm"), (Wav2Vec2, "wav2vec2"), (AdaptedPDFGC, "pdfgc"),
                    (PDFGCEncoder, "pdfgc"), (AudioLipProjector, "projector"),
                    (DiCTE, "dicte")):
    if isinstance(model, cls):
      return name
  raise ValueError(f"no logical-axis table for {type(model).__name__}; the families are "
                   f"{', '.join(FAMILIES)}")


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
  return re.compile(pattern)


def dotted(path: Iterable[Any]) -> str:
  return ".".join(str(part) for part in path)


def _table(family: str | Sequence[Rule]) -> Sequence[Rule]:
  if isinstance(family, str):
    if family not in FAMILIES:
      raise ValueError(f"unknown model family {family!r}; the families are "
                       f"{', '.join(FAMILIES)}")
    return FAMILIES[family]
  return family


def match(path: str, ndim: int, family: str | Sequence[Rule]) -> list[Rule]:
  """Every rule of `family` that matches this path and rank."""
  return [rule for rule in _table(family)
          if rule.ndim == ndim and _compiled(rule.pattern).fullmatch(path)]


def param_axes(state: Any, family: str | Sequence[Rule]) -> dict[str, tuple[str | None, ...]]:
  """`{dotted.path: logical names}` for every variable of an nnx.State / Module (parameters,
  batch statistics). Raises listing all unmatched and ambiguous paths."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  axes, unmatched, ambiguous = {}, [], []
  for path, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    shape = tuple(getattr(value, "shape", ()))
    name = dotted(path)
    rules = match(name, len(shape), family)
    if not rules:
      unmatched.append(f"{name} {shape}")
    elif len(rules) > 1:
      ambiguous.append(f"{name} {shape}: " + ", ".join(r.pattern for r in rules))
    else:
      axes[name] = rules[0].names
  if unmatched or ambiguous:
    label = family if isinstance(family, str) else "the given table"
    raise ValueError(
        f"logical axes of {label}: every parameter must match exactly one rule; "
        f"{len(unmatched)} match none, {len(ambiguous)} match several:\n  "
        + "\n  ".join(unmatched + ambiguous))
  return axes


def model_axes(model: nnx.Module, family: str | None = None) -> dict[str, tuple[str | None, ...]]:
  """`param_axes` of a model, its family found from its class unless given."""
  return param_axes(nnx.state(model), family or family_of(model))


WRAPPERS = ("value", "raw_value", "codes")  # Variable payloads; 8-bit Adam's codes


def key_names(path: Sequence[Any]) -> list[str]:
  """Plain names of a jax key path (DictKey, GetAttrKey, SequenceKey) or of nnx path parts."""
  names = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        names.append(str(getattr(key, attribute)))
        break
    else:
      names.append(str(key))
  return names


def lookup(axes: Mapping[str, tuple], path: Sequence[Any], ndim: int
           ) -> tuple[str | None, ...] | None:
  """Logical names for a leaf of a tree that embeds parameter paths: an nnx.State
  (`kernel.value`), an optax state (`0.mu.down_blocks.0....kernel.value`) or 8-bit Adam's codes
  (`....kernel.value.codes`, shaped like the parameter). Trailing payload names are dropped,
  then the longest suffix that names a parameter of the same rank wins; None if there is none
  (8-bit Adam's per-block scales, counters: the caller falls back to the shape rule)."""
  parts = key_names(path)
  while parts and parts[-1] in WRAPPERS:
    parts.pop()
  for start in range(len(parts)):
    names = axes.get(".".join(parts[start:]))
    if names is not None and len(names) == ndim:
      return names
  return None


def tree_axes(node: Any) -> dict[str, tuple[str | None, ...]]:
  """Logical names for every variable of every known-family model inside `node` (a model, a
  tuple `(model, optimizer)`, a task's container module), keyed by the path from `node`: what
  `rules.state_shardings(nnx.state(node), ..., family_axes=...)` needs for a train state such
  as `nnx.split((model, optimizer))`. The outermost model of a known family claims its whole
  subtree (ETHD, not the UNet inside it); variables outside any such model get none (the shape
  rule)."""
  axes: dict[str, tuple[str | None, ...]] = {}
  claimed: list[tuple[Any, ...]] = []
  for path, child in nnx.iter_graph(node):
    if not isinstance(child, nnx.Module) or any(path[:len(p)] == p for p in claimed):
      continue
    try:
      family = family_of(child)
    except ValueError:
      continue
    # iter_graph yields children before parents: a parent found later replaces its children.
    claimed = [p for p in claimed if p[:len(path)] != path] + [tuple(path)]
    prefix = dotted(path)
    axes = {k: v for k, v in axes.items() if not (prefix == "" or k.startswith(prefix + "."))}
    for name, names in param_axes(nnx.state(child), family).items():
      axes[f"{prefix}.{name}" if prefix else name] = names
  return axes
