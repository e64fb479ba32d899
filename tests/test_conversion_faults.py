"""`etalk convert` under damaged input, for every model family it converts (issue 21, item 3).

One good source per family (a diffusers SVD VAE folder, a transformers wav2vec2 folder, and the
PD-FGC / Inception / I3D / SyncNet / Deep3DFaceRecon weight files, each written from a tiny
random model of ours by the family's own export, as upstream lays it out) is converted once
(exit 0: the source is sound), then damaged one way at a time: truncated, one tensor mis-shaped,
one of an integer dtype, an extra key, a missing key, a pickle that would run code (torch's zip
format and a bare legacy pickle), a config.json that does not parse or is not an object. Each
must give one message naming the file (exit 2, no traceback), write nothing at --dst (nor a
partial folder beside it) and run no code from the file (a marker file the pickle would write
stays absent). The table FAULTS is the count the issue's figures quote.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from etalk_jax import cli, model_io, svd
from etalk_jax.audio import params as audio_params
from etalk_jax.audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config
from etalk_jax.errors import UserError
from etalk_jax.evaluation import face3d_params, i3d_params, inception_params, syncnet_params
from etalk_jax.evaluation.face3d import FACE3D_SMALL, Face3DRecon
from etalk_jax.evaluation.i3d import I3D, I3D_SMALL
from etalk_jax.evaluation.inception import INCEPTION_SMALL, FIDInception
from etalk_jax.evaluation.syncnet import SYNCNET_SMALL, SyncNet
from etalk_jax.svd.config import VAEConfig
from etalk_jax.svd.vae import TemporalVAE
from etalk_jax.vision import params as pdfgc_params
from etalk_jax.vision.pdfgc import PDFGC_SMALL, PDFGCEncoder
from tests.helpers.svd_reference import VAE_TINY

# family -> (its folder's weight file, the .bin the folder may hold instead)
FOLDERS = {"svd": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
           "wav2vec2": ("model.safetensors", "pytorch_model.bin")}
FILES = {  # family -> (our model, its to_torch)
    "pdfgc": (lambda rngs: PDFGCEncoder(PDFGC_SMALL, rngs=rngs), pdfgc_params.to_torch),
    "inception": (lambda rngs: FIDInception(INCEPTION_SMALL, rngs=rngs),
                  inception_params.to_torch),
    "i3d": (lambda rngs: I3D(I3D_SMALL, rngs=rngs), i3d_params.to_torch),
    "syncnet": (lambda rngs: SyncNet(SYNCNET_SMALL, rngs=rngs), syncnet_params.to_torch),
    "face3d": (lambda rngs: Face3DRecon(FACE3D_SMALL, rngs=rngs), face3d_params.to_torch),
}
FAMILIES = tuple(FOLDERS) + tuple(FILES)
EXTRA_KEY = "surprise.weight"
TINY_WAV2VEC2 = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, conv_dim=(8, 8), conv_stride=(5, 2),
                     conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                     num_conv_pos_embedding_groups=2)


def random_model(build, seed: int = 0) -> nnx.Module:
  """`build(rngs)` with NumPy-drawn weights (no compiled initialisers: conversion needs values,
  not good ones)."""
  graphdef, state = nnx.split(model_io.abstract(build))
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(
      lambda leaf: rng.normal(size=leaf.shape).astype(leaf.dtype), state))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
  """family -> a good source, laid out as its upstream releases it."""
  root = tmp_path_factory.mktemp("sources")
  vae = random_model(lambda rngs: TemporalVAE(VAEConfig.from_dict(VAE_TINY), rngs=rngs))
  out = {"svd": svd.export_diffusers(vae, root / "vae")}
  wav2vec2 = random_model(
      lambda rngs: Wav2Vec2(Wav2Vec2Config.from_dict(TINY_WAV2VEC2), rngs=rngs))
  audio_params.export_transformers(wav2vec2, root / "wav2vec2")
  out["wav2vec2"] = root / "wav2vec2"
  for family, (build, to_torch) in FILES.items():
    state = {key: torch.from_numpy(np.array(value))
             for key, value in to_torch(random_model(build)).items()}
    if family == "face3d":  # upstream's epoch_20.pth: the network beside optimizer state
      state = {"net_recon": state, "opt_00": {"state": {}, "param_groups": [{"lr": 1e-4}]}}
    torch.save(state, root / f"{family}.pth")
    out[family] = root / f"{family}.pth"
  return out


# ----------------------------------------------------------------------------------------------
# Reading and writing a source's tensors as their family stores them
# ----------------------------------------------------------------------------------------------


def read_tensors(family: str, source: Path) -> dict[str, np.ndarray]:
  if family in FOLDERS:
    return load_file(source / FOLDERS[family][0])
  state = torch.load(source, weights_only=True)
  state = state["net_recon"] if family == "face3d" else state
  return {key: value.numpy() for key, value in state.items()}


def write_tensors(family: str, target: Path, tensors: dict) -> None:
  """Writes `tensors` (numpy arrays, or any picklable object for a torch file) as the family
  stores its weights, at `target` (a copied folder, or a file)."""
  if family in FOLDERS:
    save_file(tensors, target / FOLDERS[family][0], metadata={"format": "pt"})
    return
  state = {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
           for key, value in tensors.items()}
  if family == "face3d":
    state = {"net_recon": state, "opt_00": {"state": {}, "param_groups": []}}
  torch.save(state, target)


def victim(tensors: dict) -> str:
  """The key a fault damages: a bias, which no converter reads a config from (a missing config
  tensor gives its own, also clear, "not a ... checkpoint" message)."""
  return sorted(key for key in tensors if key.endswith(".bias"))[0]


class RunsCode:
  """Unpickling this writes `marker`: a pickle that would run code."""

  def __init__(self, marker: Path):
    self.marker = Path(marker)

  def __reduce__(self):
    return (Path.write_text, (self.marker, "code from the weight file ran"))


# ----------------------------------------------------------------------------------------------
# The faults: each damages `target`, a copy of the good `source`
# ----------------------------------------------------------------------------------------------


def _weight_file(family: str, target: Path) -> Path:
  return target / FOLDERS[family][0] if family in FOLDERS else target


def truncated(family, source, target, marker):
  file = _weight_file(family, target)
  file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def edited(change: Callable[[dict, str], None]):
  def fault(family, source, target, marker):
    tensors = read_tensors(family, source)
    change(tensors, victim(tensors))
    write_tensors(family, target, tensors)
  return fault


def _misshape(tensors, key):
  tensors[key] = np.zeros(tuple(n + 1 for n in tensors[key].shape), np.float32)


def _integer(tensors, key):
  tensors[key] = np.zeros(tensors[key].shape, np.int64)


def _extra(tensors, key):
  tensors[EXTRA_KEY] = np.zeros(3, np.float32)


def _drop(tensors, key):
  del tensors[key]


def code_pickle(family, source, target, marker):
  """The real tensors and one object whose unpickling runs code, in torch's zip format (for a
  folder: its .bin instead of its safetensors)."""
  tensors = read_tensors(family, source)
  tensors["surprise"] = RunsCode(marker)
  if family in FOLDERS:
    (target / FOLDERS[family][0]).unlink()
    torch.save({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in tensors.items()}, target / FOLDERS[family][1])
  else:
    write_tensors(family, target, tensors)


def legacy_code_pickle(family, source, target, marker):
  """A bare (pre-zip, protocol 2) pickle whose unpickling runs code."""
  file = target
  if family in FOLDERS:
    (target / FOLDERS[family][0]).unlink()
    file = target / FOLDERS[family][1]
  file.write_bytes(pickle.dumps({"weight": RunsCode(marker)}, protocol=2))


def config_text(text: str):
  def fault(family, source, target, marker):
    (target / "config.json").write_text(text)
  return fault


SHAPE = r"1 with the wrong shape.*wrong shape:\n    {key}: file has \(\d+,\), model needs"
DTYPE = (r"1 with the wrong dtype.*wrong dtype:\n    {key}: file has int64, model needs "
         r"floating point \(float32\)")
RUNS_CODE = (r"was refused by torch\.load\(weights_only=True\): loading it would call a Python "
             r"function the file names, i\.e\. run code .*Nothing in it was run")
# (fault, what it does, the message it must give ({key}: the damaged key), the families it
# applies to)
FAULT_KINDS = [
    ("truncated", truncated, r"damaged or incomplete\. Re-download or re-export it", FAMILIES),
    ("mis-shaped tensor", edited(_misshape), SHAPE, FAMILIES),
    ("integer tensor", edited(_integer), DTYPE, FAMILIES),
    ("extra key", edited(_extra), rf"1 unexpected.*unexpected:\n    {EXTRA_KEY}", FAMILIES),
    ("missing key", edited(_drop), r"1 missing.*missing:\n    {key}\n", FAMILIES),
    ("code-running pickle", code_pickle, RUNS_CODE, FAMILIES),
    ("code-running legacy pickle", legacy_code_pickle, RUNS_CODE, FAMILIES),
    ("config.json not JSON", config_text("{\"_class_name\": "),
     r"config\.json is not valid JSON \(.*\); restore the config\.json", tuple(FOLDERS)),
    ("config.json not an object", config_text("[1, 2]"),
     r"config\.json holds a JSON list, not .*; restore the config\.json", tuple(FOLDERS)),
]
FAULTS = [(family, name) for name, _, _, families in FAULT_KINDS for family in families]
_KINDS = {name: (make, expected) for name, make, expected, _ in FAULT_KINDS}


def convert(family: str, src: Path, dst: Path, capsys) -> tuple[int, str]:
  code = cli.main(["convert", family, "--src", str(src), "--dst", str(dst)])
  return code, capsys.readouterr().err


def test_every_good_source_converts(sources, tmp_path, capsys):
  """The control: undamaged, each source converts, so each fault below is what fails."""
  for family in FAMILIES:
    code, err = convert(family, sources[family], tmp_path / family, capsys)
    assert code == 0, err
    assert (tmp_path / family / "config.json").is_file()


@pytest.mark.parametrize("family, fault", FAULTS, ids=[f"{f}-{k}" for f, k in FAULTS])
def test_a_damaged_source_gives_one_message_and_writes_nothing(sources, tmp_path, capsys,
                                                               family, fault):
  source = sources[family]
  src = tmp_path / source.name
  if source.is_dir():
    shutil.copytree(source, src)
  else:
    shutil.copy(source, src)
  key = victim(read_tensors(family, source))
  marker = tmp_path / "code-ran"
  make, expected = _KINDS[fault]
  make(family, source, src, marker)
  dst = tmp_path / "out" / "converted"
  code, err = convert(family, src, dst, capsys)
  assert code == 2, err
  assert err.startswith("etalk convert: error: ") and "Traceback" not in err
  assert str(src) in err  # the message names the damaged input
  assert re.search(expected.format(key=re.escape(key)), err, re.S), err
  assert not marker.exists()  # nothing in the file ran
  assert not dst.exists()
  leftovers = list(dst.parent.iterdir()) if dst.parent.exists() else []
  assert leftovers == []  # no partial folder beside --dst either


def test_the_code_running_pickle_is_real(tmp_path):
  """What the pickle faults would do if loaded unguarded: write the marker (so its absence above
  shows the guard, not a harmless pickle)."""
  marker = tmp_path / "code-ran"
  file = tmp_path / "evil.pth"
  torch.save({"weight": RunsCode(marker)}, file)
  torch.load(file, weights_only=False)
  assert marker.read_text() == "code from the weight file ran"
  marker.unlink()
  pickle.loads(pickle.dumps({"weight": RunsCode(marker)}, protocol=2))
  assert marker.exists()


def test_a_damaged_saved_config_is_one_message(sources, tmp_path, capsys):
  """Our own format read back (`--to diffusers`, the evaluation networks' load) with a
  config.json that does not parse: one message naming it, not a JSONDecodeError."""
  ours = tmp_path / "ours"
  assert convert("pdfgc", sources["pdfgc"], ours, capsys)[0] == 0
  (ours / "config.json").write_text("{\"etalk_format\": ")
  with pytest.raises(UserError, match=r"config\.json is not valid JSON"):
    model_io.read_config(ours)
  with pytest.raises(UserError, match=r"does not hold a converted PD-FGC encoder"):
    pdfgc_params.load_pdfgc(ours)
  (ours / "config.json").write_text(json.dumps(["not", "a", "config"]))
  with pytest.raises(UserError, match=r"holds a JSON list, not a model config"):
    model_io.read_config(ours)
