"""Small versioned JSON records on disk (a pipeline's `pipeline.json`, the emotion codebook):
one reader that checks a record's format name and version, and one atomic text write."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etalk_jax.errors import InputNotFound, UserError


def read_record(path: str | Path, *, format: str, version: int, what: str, fix: str,
                required: Sequence[str] = ()) -> dict[str, Any]:
  """The JSON object at `path`, checked to be `what` (e.g. "an emotion codebook"): its "format"
  is `format`, its "version" `version`, and it has every key of `required`. Anything else raises
  one user error naming the file, what is wrong and `fix` (a sentence: what to do)."""
  path = Path(path)
  if not path.is_file():
    raise InputNotFound(f"{path} is not {what}: the file does not exist. {fix}")
  try:
    record = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{path} is not {what} (not valid JSON: {error}). {fix}") from None
  if not isinstance(record, dict) or record.get("format") != format:
    raise UserError(f"{path} is not {what} (it has no \"format\": \"{format}\"). {fix}")
  if record.get("version") != version:
    raise UserError(f"{path} is {what} of version {record.get('version')!r}; this etalk-jax "
                    f"reads version {version}. {fix}")
  missing = [key for key in required if key not in record]
  if missing:
    raise UserError(f"{path}: {what} that lacks {', '.join(missing)}. {fix}")
  return record


def read_json_object(path: str | Path, *, what: str, fix: str,
                     error: type[UserError] = UserError) -> dict[str, Any]:
  """The JSON object in the file at `path` (which exists), or one `error` naming the file, why
  it cannot be read (not JSON, or JSON but not an object) and `fix` (a sentence)."""
  path = Path(path)
  try:
    fields = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as reason:
    raise error(f"{path} is not valid JSON ({reason}); {fix}") from None
  if not isinstance(fields, dict):
    raise error(f"{path} holds a JSON {type(fields).__name__}, not {what}; {fix}")
  return fields


def write_text_atomically(path: str | Path, text: str) -> Path:
  """Writes `text` to `path` through a temporary file beside it and a rename, so a reader (or a
  crash) never sees half a file; returns the absolute path."""
  path = Path(path).absolute()
  path.parent.mkdir(parents=True, exist_ok=True)
  handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial",
                                       dir=path.parent)
  try:
    with os.fdopen(handle, "w") as file:
      file.write(text)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.unlink(temporary)
  return path
