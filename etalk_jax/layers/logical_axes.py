"""Logical axis names of parameters, the rules that give them, and the model families' tables.

A family's table is a tuple of rules `(pattern, ndim, names)`: `pattern` is a regular expression
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

`COMMON` covers the layers every family is built from; each model family adds the rules of its
own parameters next to its model and registers the table under its name with `register_family`,
whose result the model class keeps as `logical_family`. The models mirror diffusers /
transformers module by module (their converters depend on it), so the names live in tables
matched against parameter paths, not in the layers' constructors. etalk_jax.parallel maps the
names to mesh axes and reads a model's table through its `logical_family`, so it needs no model.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

# Logical axis names of parameters (activations use `batch` and `frames`, see sharding.py).
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
  """Logical `names` of every parameter of rank `ndim` whose dotted path matches `pattern`."""
  pattern: str
  ndim: int
  names: tuple[str | None, ...]


def parameter_of(parents: str, leaf: str) -> str:
  """A path pattern ending in `<parent>.<leaf>`, the parent one of the `|`-separated names."""
  return rf"(?:.*\.)?(?:{parents})\.{leaf}"


ATTENTION_IN = "to_q|to_k|to_v|q_proj|k_proj|v_proj"
ATTENTION_OUT = "to_out|out_proj"
MLP_IN = "proj_in|intermediate_dense|fc1"
MLP_OUT = "proj_out|output_dense|fc2|linear_2|output"
_NAMED_LINEAR = "|".join((ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_OUT))
# A norm is any module whose attribute name contains "norm" (norm1, group_norm, stem_norm, ...).
NORM_PARENT = r"[^.]*norm[^.]*"

# Layers every family is built from: disjoint by (leaf name, parent name, rank).
COMMON: tuple[Rule, ...] = (
    Rule(parameter_of(ATTENTION_IN, "kernel"), 2, (EMBED, HEADS)),
    Rule(parameter_of(ATTENTION_OUT, "kernel"), 2, (HEADS, EMBED)),
    Rule(parameter_of(MLP_IN, "kernel"), 2, (EMBED, MLP)),
    Rule(parameter_of(MLP_OUT, "kernel"), 2, (MLP, EMBED)),
    Rule(rf"(?:.*\.)?(?!(?:{_NAMED_LINEAR})\.)[^.]+\.kernel", 2, (EMBED, MLP)),  # other Linear
    Rule(r"(?:.*\.)?[^.]+\.kernel", 3, (CONV_W, CONV_IN, CONV_OUT)),
    Rule(r"(?:.*\.)?[^.]+\.kernel", 4, (CONV_H, CONV_W, CONV_IN, CONV_OUT)),
    Rule(r"(?:.*\.)?[^.]+\.kernel", 5, (CONV_T, CONV_H, CONV_W, CONV_IN, CONV_OUT)),
    Rule(parameter_of(NORM_PARENT, "(?:scale|bias)"), 1, (NORM,)),
    Rule(r"(?:.*\.)?(?![^.]*norm)[^.]+\.bias", 1, (BIAS,)),
)

# Every registered family's table, by family name (filled as the model modules are imported).
FAMILIES: dict[str, tuple[Rule, ...]] = {}


def register_family(name: str, rules: Sequence[Rule]) -> str:
  """Registers the logical-axis table `rules` of the model family `name`; returns `name`, for
  the model class's `logical_family` attribute (a subclass without its own is of its parent's
  family). A name registered twice must come with the same table."""
  rules = tuple(rules)
  if FAMILIES.setdefault(name, rules) != rules:
    raise ValueError(f"model family {name!r} is registered twice with different tables")
  return name
