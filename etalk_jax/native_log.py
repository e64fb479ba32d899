"""Keeps XLA's slow-operation alarms off the user's terminal (the `etalk` command only).

XLA's C++ side writes "Very slow compile? If you want to file a bug, run with envvar
XLA_FLAGS=--xla_dump_to=/tmp/foo ..." to file descriptor 2 whenever one compilation takes over a
couple of minutes, which a 2-core machine under load does for `etalk demo`'s training steps. It
is advice for XLA's developers, not a fault, and no flag or environment variable of XLA turns it
off (openxla/xla#9828, jax-ml/jax#26098). `hide_slow_operation_alarms` moves Python's stderr to a
copy of the terminal's descriptor and reads descriptor 2, where only native code (and child
processes) still write, through a pipe: every line passes on unchanged except the alarm blocks.
Python tracebacks and `faulthandler` dumps never pass the pipe, so a crash loses nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import re
import sys
import threading

# "2024-06-17 11:40:02.931165: E external/xla/xla/service/slow_operation_alarm.cc:65] ..." (the
# path prefix varies with the build: external/xla, external/local_xla, tensorflow/compiler).
ALARM = re.compile(rb"slow_operation_alarm\.cc:\d+\]")
# Any other native log record starts a new entry: absl's "2024-... : W path:line]" or glog's
# "W0000 00:00:... path:line]".
RECORD = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |[IWEF]\d{4} )")
STARS = re.compile(rb"^\*{8,}\s*$")
MAX_ALARM_LINES = 16  # an alarm's block is a few lines; a longer one is not only the alarm


class AlarmFilter:
  """Line-by-line: drops an alarm's record line and its block (the lines up to its second row of
  stars, or up to the next log record, at most MAX_ALARM_LINES), keeps every other line."""

  def __init__(self):
    self._dropping = 0  # lines dropped in the current alarm block; 0: not in one
    self._stars = 0

  def keep(self, line: bytes) -> bool:
    if ALARM.search(line):
      self._dropping, self._stars = 1, 0
      return False
    if self._dropping:
      if RECORD.match(line) or self._dropping >= MAX_ALARM_LINES:
        self._dropping = 0
        return True
      self._dropping += 1
      if STARS.match(line):
        self._stars += 1
        if self._stars == 2:  # the banner's closing row
          self._dropping = 0
      return False
    return True


def _write_all(fd: int, data: bytes) -> None:
  while data:
    data = data[os.write(fd, data):]


def _forward(read_fd: int, terminal_fd: int) -> None:
  """Copies the pipe to the terminal through the filter until every writer has closed it. A
  terminal that went away (a closed pipe after `| head`) stops the copying, not the draining:
  a full pipe would block every native write of the process."""
  alarm_filter = AlarmFilter()
  writable = True
  with os.fdopen(read_fd, "rb", buffering=0) as pipe:
    pending = b""
    while chunk := pipe.read(65536):
      pending += chunk
      *lines, pending = pending.split(b"\n")
      kept = b"".join(line + b"\n" for line in lines if alarm_filter.keep(line))
      if writable and kept:
        try:
          _write_all(terminal_fd, kept)
        except OSError:
          writable = False
    if writable and pending and alarm_filter.keep(pending):
      with contextlib.suppress(OSError):
        _write_all(terminal_fd, pending)


def hide_slow_operation_alarms() -> bool:
  """Installs the filter for the rest of this process (and the children it starts, which inherit
  descriptor 2); returns whether it did. Not when XLA_FLAGS asks for a dump (--xla_dump_to: the
  user is debugging XLA and wants its advice) or descriptor 2 is not open."""
  if "xla_dump_to" in os.environ.get("XLA_FLAGS", ""):
    return False
  try:
    terminal_fd = os.dup(2)
  except OSError:
    return False
  sys.stderr.flush()
  read_fd, write_fd = os.pipe()
  os.dup2(write_fd, 2)
  os.close(write_fd)
  # Python's own writes (tracebacks, warnings, progress bars) go straight to the terminal.
  sys.stderr = open(terminal_fd, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                    errors="backslashreplace", closefd=False)
  if faulthandler.is_enabled():  # its dump must not wait in a pipe of a dying process
    faulthandler.enable(file=sys.stderr)
  forwarder = threading.Thread(target=_forward, args=(read_fd, terminal_fd), daemon=True,
                               name="native-stderr")
  forwarder.start()

  def restore() -> None:
    # Descriptor 2 back to the terminal closes the pipe's last writer (unless a child still
    # holds it): the forwarder reads to the end and stops.
    sys.stderr.flush()
    os.dup2(terminal_fd, 2)
    forwarder.join(timeout=2.0)

  atexit.register(restore)
  return True
