"""The `etalk` command's stderr filter: XLA's slow-operation alarms go, everything else stays."""

import os
import subprocess
import sys
import textwrap

from etalk_jax.native_log import AlarmFilter

# XLA's banner as it prints it (slow_operation_alarm.cc; the text of openxla/xla#23924).
_STARS = "*" * 32
_ADVICE = ("[Compiling module jit_step] Very slow compile? If you want to file a bug, run with "
           "envvar XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.")
BANNER = "\n".join([
    "2025-03-19 07:30:02.045318: E external/xla/xla/service/slow_operation_alarm.cc:73] ",
    _STARS, _ADVICE, _STARS,
    "2025-03-19 07:30:14.895694: E external/xla/xla/service/slow_operation_alarm.cc:140] The "
    "operation took 2m12.850942799s",
    "", _STARS, _ADVICE, _STARS, ""])
OTHER = ("2025-03-19 07:30:15.000001: W external/xla/xla/pjrt/cpu/cpu_client.cc:12] a real "
         "warning\n")


def test_filter_drops_the_alarm_blocks_and_keeps_the_rest():
  lines = ("before\n" + BANNER + OTHER + "after\n").encode().split(b"\n")
  alarm_filter = AlarmFilter()
  kept = [line.decode() for line in lines if alarm_filter.keep(line)]
  assert kept == ["before", OTHER.rstrip("\n"), "after", ""]


def test_an_alarm_without_its_block_ends_at_the_next_record():
  # "Constant folding ... is taking > 1s" has no rows of stars: its lines go up to the next record.
  text = ("I0000 00:00:00.1 1 note.cc:1] first\n"
          "2025-01-01 00:00:00.000001: E external/local_xla/xla/service/slow_operation_alarm.cc:65]"
          " Constant folding an instruction is taking > 1s:\n"
          "  %reduce = f32[8] reduce(...)\n"
          "W0000 00:00:01.2 1 next.cc:2] kept\n")
  alarm_filter = AlarmFilter()
  kept = [line for line in text.encode().split(b"\n") if alarm_filter.keep(line)]
  assert kept == [b"I0000 00:00:00.1 1 note.cc:1] first", b"W0000 00:00:01.2 1 next.cc:2] kept",
                  b""]


SCRIPT = textwrap.dedent("""\
    import os, sys
    from etalk_jax import native_log
    print("installed", native_log.hide_slow_operation_alarms(), flush=True)
    os.write(2, sys.argv[1].encode())
    os.write(2, b"a native line\\n")
    print("a python line", file=sys.stderr)
    raise RuntimeError("a bug keeps its traceback")
    """)


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
  env = {**os.environ, **env_extra}
  return subprocess.run([sys.executable, "-c", SCRIPT, BANNER], capture_output=True, text=True,
                        env=env, timeout=60)


def test_the_command_hides_the_banner_but_not_native_lines_or_tracebacks():
  result = _run({})
  assert result.returncode == 1
  assert "installed True" in result.stdout
  assert "Very slow compile" not in result.stderr
  assert "a native line" in result.stderr
  assert "a python line" in result.stderr
  assert "RuntimeError: a bug keeps its traceback" in result.stderr


def test_a_user_dumping_xla_sees_the_banner():
  result = _run({"XLA_FLAGS": "--xla_dump_to=/tmp/xla_dump"})
  assert "installed False" in result.stdout
  assert "Very slow compile" in result.stderr
  assert "RuntimeError" in result.stderr


def test_a_terminal_that_went_away_does_not_block_native_writes():
  # 256 KiB of native writes with nobody reading stderr any more (`etalk ... 2>&1 | head`): the
  # forwarder keeps draining its pipe, so the writes, and the process, finish.
  script = textwrap.dedent("""\
      import os
      from etalk_jax import native_log
      native_log.hide_slow_operation_alarms()
      for _ in range(4096):
        os.write(2, b"x" * 63 + b"\\n")
      print("done", flush=True)
      """)
  process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
  process.stderr.close()
  out, _ = process.communicate(timeout=60)
  assert process.returncode == 0 and out == b"done\n"
