"""PyTorch-side weight files, and table-driven conversion between them and NNX modules.

Every converter in the project (SVD, wav2vec2/WavLM, PD-FGC) is a `ConversionTable`: each leaf of
our module gets exactly one PyTorch key and a layout transform, derived from the leaf's module type
(Linear weight transposed, ConvNd weight permuted, norm weight -> scale) and a short list of
renames where our names differ from upstream. Loading is strict: every source key must be used
(or explicitly ignored), every leaf filled, every shape right, every tensor of the right kind
(floating point for a float leaf: an integer tensor would be cast silently); otherwise one
`ConversionError` lists all the missing, unexpected, mis-shaped and wrong-dtype keys before any
tensor data is read. PyTorch files are read with `torch.load(weights_only=True)` only: a pickle
that would run code is refused before anything in it runs.

Tensors are streamed one at a time from safetensors (memory-mapped) or from
`torch.load(weights_only=True)` files, so peak memory stays near the size of the target model.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can read bf16)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from etalk_jax.errors import OutputExists, UserError

# What a converter moves: trained parameters and BatchNorm running statistics.
WEIGHT_VARIABLES = nnx.Any(nnx.Param, nnx.BatchStat)


class ConversionError(UserError):
  """A weight file does not match the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# Layout transforms
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_theirs: Callable[[np.ndarray], np.ndarray]

  def our_shape(self, their_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(self.to_ours(np.empty(their_shape, dtype=np.uint8)).shape)


def _conv_to_ours(w):  # (out, in, *k) -> (*k, in, out)
  return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def _conv_to_theirs(w):  # (*k, in, out) -> (out, in, *k)
  return np.transpose(w, (w.ndim - 1, w.ndim - 2) + tuple(range(w.ndim - 2)))


IDENTITY = Transform("identity", lambda w: w, lambda w: w)
LINEAR = Transform("linear", lambda w: np.transpose(w), lambda w: np.transpose(w))
CONV = Transform("conv", _conv_to_ours, _conv_to_theirs)

# (module type, our leaf name) -> (their leaf name, transform). Order matters: first match wins.
_LEAF_RULES: list[tuple[type, str, str, Transform]] = [
    (nnx.Linear, "kernel", "weight", LINEAR),
    (nnx.Conv, "kernel", "weight", CONV),
    (nnx.ConvTranspose, "kernel", "weight", CONV),
    (nnx.Embed, "embedding", "weight", IDENTITY),
    (nnx.GroupNorm, "scale", "weight", IDENTITY),
    (nnx.LayerNorm, "scale", "weight", IDENTITY),
    (nnx.BatchNorm, "scale", "weight", IDENTITY),
    (nnx.BatchNorm, "mean", "running_mean", IDENTITY),
    (nnx.BatchNorm, "var", "running_var", IDENTITY),
]


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple            # our leaf path, e.g. ('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')
  transform: Transform
  shape: tuple[int, ...]  # our leaf's shape
  dtype: Any


def _dotted(path: Iterable) -> str:
  return ".".join(str(p) for p in path)


@dataclasses.dataclass
class ConversionTable:
  """Their key -> our leaf, for one model instance (concrete or abstract)."""

  entries: dict[str, Entry]
  ignore: tuple[str, ...] = ()  # regexes of their keys that carry nothing we need

  @classmethod
  def build(cls, model: nnx.Module, renames: Sequence[tuple[str, str]] = (),
            ignore: Sequence[str] = (), leaf_rules: Sequence[tuple] = ()) -> "ConversionTable":
    """Derives their names from our module tree.

    renames: (regex, replacement) applied in order to our dotted module path to get theirs,
      e.g. (r"\\.to_out$", ".to_out.0").
    leaf_rules: extra (module type, our leaf, their leaf, transform) tried before the defaults.
    """
    module_types = {path: type(m) for path, m in nnx.iter_modules(model)}
    rules = list(leaf_rules) + _LEAF_RULES
    entries: dict[str, Entry] = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, WEIGHT_VARIABLES)):
      module_path, leaf = path[:-1], path[-1]
      module_type = module_types[module_path]
      their_leaf, transform = leaf, IDENTITY
      for rule_type, our_leaf, rule_their_leaf, rule_transform in rules:
        if issubclass(module_type, rule_type) and leaf == our_leaf:
          their_leaf, transform = rule_their_leaf, rule_transform
          break
      module_name = _dotted(module_path)
      for pattern, replacement in renames:
        module_name = re.sub(pattern, replacement, module_name)
      key = f"{module_name}.{their_leaf}" if module_name else their_leaf
      if key in entries:
        raise ConversionError(f"two leaves map to {key!r}: {entries[key].path} and {path}")
      value = variable.get_value()
      entries[key] = Entry(path, transform, tuple(value.shape), value.dtype)
    return cls(entries, tuple(ignore))

  def is_ignored(self, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in self.ignore)

  def check(self, source: "TensorSource", what: str) -> None:
    """Raises one ConversionError listing every mismatch between `source` and the table:
    missing, unexpected and mis-shaped keys, and tensors of the wrong kind (an integer or bool
    tensor where the model has a float leaf; any float width is fine, it is cast)."""
    keys = set(source.keys())
    missing = sorted(set(self.entries) - keys)
    unexpected = sorted(k for k in keys - set(self.entries) if not self.is_ignored(k))
    misshaped, mistyped = [], []
    for key in sorted(keys & set(self.entries)):
      entry = self.entries[key]
      their_shape = tuple(source.shape(key))
      if (len(their_shape) != len(entry.shape)
          or entry.transform.our_shape(their_shape) != entry.shape):
        expected = entry.transform.to_theirs(np.empty(entry.shape, np.uint8)).shape
        misshaped.append(f"{key}: file has {their_shape}, model needs {tuple(expected)}")
      their_dtype = source.dtype(key)
      wanted = dtype_kind(np.dtype(entry.dtype).name)
      if their_dtype is not None and dtype_kind(their_dtype) != wanted:
        mistyped.append(f"{key}: file has {their_dtype}, model needs {wanted} "
                        f"({np.dtype(entry.dtype).name})")
    if missing or unexpected or misshaped or mistyped:
      lines = [f"{what} does not match the model configuration "
               f"({len(missing)} missing, {len(unexpected)} unexpected, "
               f"{len(misshaped)} with the wrong shape, {len(mistyped)} with the wrong dtype)."]
      for title, items in (("missing", missing), ("unexpected", unexpected),
                           ("wrong shape", misshaped), ("wrong dtype", mistyped)):
        if items:
          lines.append(f"  {title}:")
          lines.extend(f"    {item}" for item in items)
      lines.append("  Check that the file is the model's own release and complete, and that "
                   "a config.json beside it is the one the weights were trained with.")
      raise ConversionError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Sources of tensors
# ----------------------------------------------------------------------------------------------


class TensorSource(abc.ABC):
  """Read-only, lazily read mapping from PyTorch key to numpy array."""

  description = "weights"

  @abc.abstractmethod
  def keys(self) -> list[str]:
    """All tensor names."""

  @abc.abstractmethod
  def shape(self, key: str) -> tuple[int, ...]:
    """A tensor's shape, without reading its data."""

  @abc.abstractmethod
  def read(self, key: str) -> np.ndarray:
    """A tensor's data as numpy."""

  def dtype(self, key: str) -> str | None:
    """A tensor's dtype name without reading its data ("float32", "bfloat16", "int64", ...);
    None where the source cannot tell (then `ConversionTable.check` does not check it)."""
    return None

  def close(self) -> None:
    pass


# safetensors' dtype codes -> numpy-style names (the F8 variants as ml_dtypes names them).
_SAFETENSORS_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2"}


def dtype_kind(name: str) -> str:
  """A dtype name -> "floating point", "integer", "bool", "complex" or the name itself: what a
  weight file's tensor must share with the model's leaf (its width may differ: it is cast)."""
  name = name.removeprefix("torch.")
  if name.startswith(("float", "bfloat", "half", "double")):
    return "floating point"
  if name.startswith(("int", "uint", "long", "short")):
    return "integer"
  if name.startswith("complex"):
    return "complex"
  return name


def _dtype_name(value) -> str | None:
  """The dtype name of a torch tensor or an array-like, without reading its data."""
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    return None
  if hasattr(value, "detach"):  # a torch tensor: "torch.float32"
    return str(dtype).removeprefix("torch.")
  return np.dtype(dtype).name


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, without importing torch here
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      return value.view(dtype=_torch().int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def _torch():
  import torch  # noqa: PLC0415 (PyTorch is optional: only torch tensors and .pt files need it)
  return torch


class DictSource(TensorSource):
  def __init__(self, tensors: Mapping[str, Any], description: str = "state dict"):
    self.tensors = tensors
    self.description = description

  def keys(self):
    return list(self.tensors.keys())

  def shape(self, key):
    return tuple(self.tensors[key].shape)

  def read(self, key):
    return _to_numpy(self.tensors[key])

  def dtype(self, key):
    return _dtype_name(self.tensors[key])


class SafetensorsSource(TensorSource):
  """Tensors of one or more safetensors files (a sharded checkpoint), read one at a time.

  Each read maps the file afresh and unmaps it after copying the tensor out: pages of a
  memory-mapped file count towards the process's resident memory for as long as the mapping
  lives, which for a 3 GB checkpoint held open during conversion would add its whole size to the
  peak.
  """

  def __init__(self, files: Sequence[Path], description: str):
    self._safe_open = safe_open
    self.description = description
    self._files: dict[str, Path] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    self._dtypes: dict[str, str] = {}
    for file in files:
      try:
        with safe_open(str(file), framework="np") as handle:
          for key in handle.keys():
            self._files[key] = Path(file)
            tensor = handle.get_slice(key)
            self._shapes[key] = tuple(tensor.get_shape())
            code = tensor.get_dtype()
            self._dtypes[key] = _SAFETENSORS_DTYPES.get(code, code.lower())
      except Exception as error:  # safetensors raises several types for a damaged header
        raise ConversionError(f"{file} is not a readable safetensors file ({error}); it is "
                              "damaged or incomplete. Re-download or re-export it.") from error

  def keys(self):
    return list(self._files)

  def shape(self, key):
    return self._shapes[key]

  def dtype(self, key):
    return self._dtypes[key]

  def read(self, key):
    with self._safe_open(str(self._files[key]), framework="np") as handle:
      return np.array(handle.get_tensor(key), copy=True)


def _torch_load_error(file: Path, error: Exception) -> ConversionError:
  """torch.load(weights_only=True)'s failure as one short message: a refused pickle (one that
  would import and call something other than tensor rebuilding: run code) or a damaged file."""
  text = str(error)
  # torch wraps the unpickler's reason in paragraphs of advice (with terminal escapes, and ways
  # to allow the code to run); keep the reason's first sentence alone.
  reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
  detail = " ".join((reason.group(1) if reason else text).split())
  detail = re.sub(r"\x1b\[[0-9;]*m", "", detail).split(". ")[0].rstrip(".")
  if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in detail:
    return ConversionError(
        f"{file} was refused by torch.load(weights_only=True): loading it would call a Python "
        f"function the file names, i.e. run code ({detail}). Nothing in it was run; use the "
        "weight file its project releases, or re-save the model's state_dict() with "
        "torch.save.")
  if isinstance(error, pickle.UnpicklingError):
    return ConversionError(
        f"{file} is not a plain tensor checkpoint that torch.load(weights_only=True) reads "
        f"({detail}); re-save the model's state_dict() with torch.save.")
  return ConversionError(f"{file} could not be read with torch.load(weights_only=True) "
                         f"({detail}); it is damaged or incomplete. Re-download or re-export "
                         "it.")


class TorchFileSource(DictSource):
  """The tensors of a `torch.save` file, read with `torch.load(weights_only=True)`: a pickle
  that would run code is refused before anything in it runs."""

  def __init__(self, file: Path):
    torch = _torch()
    try:
      with warnings.catch_warnings():
        # A legacy file pickled with protocol 4 is read all the same; the warning says nothing
        # a user can act on.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        # torch memory-maps only its zip format (torch >= 1.6); an older, legacy-pickle file
        # (e.g. pytorch-fid's 2019 Inception weights) is read whole, with the same guard.
        tensors = torch.load(str(file), map_location="cpu", weights_only=True,
                             mmap=zipfile.is_zipfile(file))
    except Exception as error:  # pickle-level errors come in many types
      raise _torch_load_error(file, error) from error
    if isinstance(tensors, dict) and "state_dict" in tensors and isinstance(
        tensors["state_dict"], dict):
      tensors = tensors["state_dict"]
    if not isinstance(tensors, dict):
      raise ConversionError(f"{file} holds a {type(tensors).__name__}, not a state dict.")
    super().__init__(tensors, description=str(file))


class AliasedSource(TensorSource):
  """Presents another source's keys rewritten by (regex, replacement) aliases, e.g. a legacy
  checkpoint's names in today's layout."""

  def __init__(self, source: TensorSource, aliases: Sequence[tuple[str, str]]):
    self.source = source
    self.description = source.description
    self._names: dict[str, str] = {}
    for key in source.keys():
      name = key
      for pattern, replacement in aliases:
        name = re.sub(pattern, replacement, name)
      if name in self._names:
        raise ConversionError(f"{source.description}: {self._names[name]!r} and {key!r} are the "
                              f"same tensor {name!r} under two names")
      self._names[name] = key

  def keys(self):
    return list(self._names)

  def shape(self, key):
    return self.source.shape(self._names[key])

  def read(self, key):
    return self.source.read(self._names[key])

  def dtype(self, key):
    return self.source.dtype(self._names[key])

  def close(self):
    self.source.close()


def open_weight_file(path: Path) -> TensorSource:
  path = Path(path)
  if not path.is_file():
    raise ConversionError(f"{path} does not exist.")
  if path.stat().st_size == 0:
    raise ConversionError(f"{path} is empty.")
  if path.suffix == ".safetensors":
    return SafetensorsSource([path], description=str(path))
  if path.suffix in (".bin", ".pth", ".pt", ".ckpt"):
    return TorchFileSource(path)
  raise ConversionError(f"{path}: unknown weight format {path.suffix!r}; expected .safetensors, "
                        ".bin, .pth or .pt.")


def _with_variant(name: str, variant: str | None) -> str:
  if not variant:
    return name
  stem, ext = name.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


def open_weight_folder(folder: Path, stems: Sequence[str], variant: str | None = None
                       ) -> TensorSource:
  """Finds the weights in a diffusers/transformers folder.

  stems: file stems to look for, e.g. ("diffusion_pytorch_model",) or ("model", "pytorch_model").
  Tries, per stem: `<stem>[.variant].safetensors`, its sharded `.safetensors.index[.variant].json`,
  then `<stem>[.variant].bin`. With variant=None, falls back to the fp16 variant.
  """
  folder = Path(folder)
  variants = [variant] if variant else [None, "fp16"]
  for v in variants:
    for stem in stems:
      single = folder / _with_variant(f"{stem}.safetensors", v)
      if single.is_file():
        return open_weight_file(single)
      index = folder / (f"{stem}.safetensors.index.{v}.json" if v else
                        f"{stem}.safetensors.index.json")
      if index.is_file():
        try:
          weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
          raise ConversionError(f"{index} is not a valid shard index ({error}).") from error
        shards = sorted({folder / name for name in weight_map.values()})
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
          raise ConversionError(f"{index} names shards that are not there: {absent}")
        return SafetensorsSource(shards, description=str(index))
      torch_file = folder / _with_variant(f"{stem}.bin", v)
      if torch_file.is_file():
        return open_weight_file(torch_file)
  looked = ", ".join(f"{s}.safetensors" for s in stems)
  raise ConversionError(f"{folder} holds no weights (looked for {looked}, sharded indexes and "
                        ".bin files, plain and fp16 variants).")


def open_source(src: Any, stems: Sequence[str] = ("diffusion_pytorch_model",),
                variant: str | None = None) -> TensorSource:
  """A model object (`state_dict()`), a mapping, a weight file or a folder -> TensorSource."""
  if hasattr(src, "state_dict") and callable(src.state_dict):
    return DictSource(src.state_dict(), description=f"{type(src).__name__} state dict")
  if isinstance(src, Mapping):
    return DictSource(src)
  path = Path(src)
  if path.is_dir():
    return open_weight_folder(path, stems, variant)
  return open_weight_file(path)


# ----------------------------------------------------------------------------------------------
# Loading into / exporting from NNX modules
# ----------------------------------------------------------------------------------------------


def load_into(model: nnx.Module, source: TensorSource, table: ConversionTable, *,
              dtype: Any = None, progress: bool = False) -> nnx.Module:
  """Fills `model`'s leaves (it may be an `nnx.eval_shape` abstract model) from `source`.

  Every tensor is read, transformed and cast one at a time and placed on the target leaf's
  sharding when the abstract leaf carries one (default device otherwise).
  """
  table.check(source, source.description)
  variables = dict(nnx.to_flat_state(nnx.state(model, WEIGHT_VARIABLES)))
  keys = list(table.entries)
  iterator: Iterable[str] = keys
  if progress:
    iterator = tqdm(keys, desc="converting", unit="tensor")
  for key in iterator:
    entry = table.entries[key]
    variable = variables[entry.path]
    target = variable.get_value()
    array = entry.transform.to_ours(source.read(key))
    array = np.ascontiguousarray(array, dtype=dtype or target.dtype)
    sharding = getattr(target, "sharding", None)
    variable.set_value(jax.device_put(array, sharding) if sharding is not None
                       else jax.device_put(array))
  return model


def export_tensors(model: nnx.Module, table: ConversionTable, dtype: Any = None
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (their key, numpy array in their layout), one leaf at a time."""
  variables = dict(nnx.to_flat_state(nnx.state(model, WEIGHT_VARIABLES)))
  for key, entry in table.entries.items():
    array = np.asarray(jax.device_get(variables[entry.path].get_value()))
    array = entry.transform.to_theirs(array)
    yield key, np.ascontiguousarray(array, dtype=dtype or array.dtype)


def strip_module_prefix(source: TensorSource) -> TensorSource:
  """A checkpoint saved from a DataParallel wrapper: the `module.` prefix, when every key carries
  it, is removed (upstream loaders unwrap the same way)."""
  keys = source.keys()
  if keys and all(key.startswith("module.") for key in keys):
    return AliasedSource(source, [(r"^module\.", "")])
  return source


def load_from_source(source: TensorSource, config: Any,
                     config_from_checkpoint: Callable[[TensorSource], Any],
                     build_abstract: Callable[[Any], nnx.Module],
                     table_of: Callable[[nnx.Module], "ConversionTable"], *,
                     dtype: Any = None) -> nnx.Module:
  """A model of `config` (by default read from the source's shapes) built abstractly and filled
  from `source` through its conversion table, strictly; the source is closed afterwards."""
  try:
    config = config if config is not None else config_from_checkpoint(source)
    model = build_abstract(config)
    load_into(model, source, table_of(model), dtype=dtype)
  finally:
    source.close()
  return model


def export_torch_state(model: nnx.Module, table: ConversionTable, dtype: Any = None
                       ) -> dict[str, np.ndarray]:
  """`export_tensors` as a state dict that torch's `load_state_dict(strict=True)` takes: a
  BatchNorm's `num_batches_tracked` (a training-step counter we do not keep) is written as 0
  beside each running_var."""
  out = {}
  for key, array in export_tensors(model, table, dtype=dtype):
    out[key] = array
    if key.endswith(".running_var"):
      out[key[:-len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
  return out


# ----------------------------------------------------------------------------------------------
# Atomic folders
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_folder(dst: Path, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary folder beside `dst`; renames it to `dst` only if the block succeeds."""
  dst = Path(dst).absolute()
  if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
    raise OutputExists(f"{dst} already exists and is not empty; choose another destination "
                       "or pass --overwrite.")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if dst.exists():
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, dst)


def write_safetensors(path: Path, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
  save_file(dict(tensors), str(path), metadata=metadata or {"format": "pt"})
