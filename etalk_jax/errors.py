"""The project's user errors: input a person gave that is wrong and that they can fix (a missing
file, a bad argument, a checkpoint that does not fit), as against bugs.

`etalk` prints a `UserError` as one line and exits 2; every other exception keeps its traceback.
Each type also derives from the built-in error it replaces, so `except ValueError` /
`except FileNotFoundError` callers keep working. This module imports nothing, so the data
layer (`data_pipeline`) raises these too.
"""


class UserError(ValueError):
  """Input a user gave cannot be used; the message names the input and the fix."""


class InputNotFound(UserError, FileNotFoundError):
  """A path the user gave (or one inside a folder they gave) does not exist."""


class OutputExists(UserError, FileExistsError):
  """The output path exists already and replacing it was not asked for."""


class WrongPathKind(UserError, IsADirectoryError):
  """A folder was given where a file is needed, or the other way round."""


class MissingDependency(UserError, ImportError):
  """An optional dependency that the asked-for feature needs is not installed."""
