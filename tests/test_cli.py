"""`etalk`'s error handling: the project's user errors (`etalk_jax.errors.UserError` and its
subclasses) print one line and exit 2; any other exception, a ValueError included, is a bug and
keeps its traceback. Every option has its help; `--version` names the installed version."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys

import pytest

from etalk_jax import cli
from etalk_jax.emotion import codebook
from etalk_jax.errors import InputNotFound, UserError


def test_an_internal_value_error_keeps_its_traceback(monkeypatch, tmp_path):
  def broken(*args, **kwargs):
    raise ValueError("shape (3, 4) does not broadcast to (4, 3)")

  monkeypatch.setattr(codebook, "codebook_build_command", broken)
  with pytest.raises(ValueError, match="shape"):
    cli.main(["codebook", "build", "--data", str(tmp_path), "--dst", str(tmp_path / "c.json")])


def test_a_user_error_prints_one_line_and_exits_2(monkeypatch, tmp_path, capsys):
  def missing(*args, **kwargs):
    raise InputNotFound(f"{tmp_path / 'data'} does not exist; run `etalk prepare` first.")

  monkeypatch.setattr(codebook, "codebook_build_command", missing)
  argv = ["codebook", "build", "--data", str(tmp_path / "data"), "--dst", str(tmp_path / "c.json")]
  assert cli.main(argv) == 2
  assert capsys.readouterr().err == (f"etalk codebook: error: {tmp_path / 'data'} does not exist; "
                                     "run `etalk prepare` first.\n")
  with pytest.raises(FileNotFoundError):  # --verbose: the traceback too
    cli.main(["--verbose"] + argv)


def test_bad_input_from_the_commands_themselves_exits_2(tmp_path, capsys):
  taken = tmp_path / "codebook.json"
  taken.write_text("{}")
  assert cli.main(["codebook", "build", "--data", str(tmp_path), "--dst", str(taken)]) == 2
  assert "already exists" in capsys.readouterr().err
  assert cli.main(["precompute", "--data", "d", "--dst", "o", "--codec", "pixel_shuffle",
                   "--audio-encoder", "a", "--vision-encoders", "v",
                   "--audio-features", "{not json"]) == 2
  assert "--audio-features" in capsys.readouterr().err


def test_user_errors_are_the_built_in_errors_they_replace():
  assert issubclass(UserError, ValueError) and issubclass(InputNotFound, FileNotFoundError)
  assert cli.USER_ERRORS == (UserError,)


def test_every_option_of_every_command_has_help():
  def undocumented(parser, command):
    for action in parser._actions:
      if isinstance(action, argparse._SubParsersAction):
        for name, subparser in action.choices.items():
          yield from undocumented(subparser, f"{command} {name}")
      elif not action.help:
        yield f"{command} {'/'.join(action.option_strings) or action.dest}"

  assert list(undocumented(cli.build_parser(), "etalk")) == []


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--version"])
  assert exit_info.value.code == 0
  assert capsys.readouterr().out.strip() == f"etalk {importlib.metadata.version('etalk-jax')}"


@pytest.mark.parametrize("wrong, message", [
    (["--emotion", "joyful"], '--emotion-text "joyful"'),
    (["--emotion", "sad", "--intensity", "2"], "intensity 2.0 is out of range"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--guidance", "0.5"], "guidance must be a number of at least 1"),
])
def test_sample_arguments_are_checked_before_anything_loads(tmp_path, capsys, wrong, message):
  """No checkpoint, portrait or speech exists here: the argument is refused first."""
  missing = tmp_path / "missing"
  argv = ["sample", "--portrait", str(missing / "p.png"), "--audio", str(missing / "a.wav"),
          "--checkpoint", str(missing), "--out", str(tmp_path / "out.mp4"), "--no-progress"]
  assert cli.main(argv + wrong) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out.mp4").exists()


def _cache_folder(environment: dict) -> list[str]:
  """`use_compilation_cache()` and jax's setting after it, in a fresh process."""
  code = ("import jax; from etalk_jax import cli; print(cli.use_compilation_cache()); "
          "print(jax.config.jax_compilation_cache_dir); "
          "print(jax.config.jax_persistent_cache_min_compile_time_secs)")
  completed = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True,
                             text=True, timeout=120, check=True)
  return completed.stdout.split()


def test_the_cli_keeps_compiled_programs_in_a_persistent_cache(tmp_path):
  environment = {name: value for name, value in os.environ.items() if name not in (
      "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
  default = str(tmp_path / "etalk-jax" / "xla")
  # Every program is kept (JAX's default keeps those that took over 1 s to compile).
  assert _cache_folder(dict(environment, XDG_CACHE_HOME=str(tmp_path))) == [default, default,
                                                                            "0.0"]
  # JAX's own variables win, as JAX reads them.
  chosen = str(tmp_path / "chosen")
  assert _cache_folder(dict(environment, JAX_COMPILATION_CACHE_DIR=chosen,
                            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="2")) == [chosen, chosen,
                                                                                  "2.0"]
