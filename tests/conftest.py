import os
from pathlib import Path

# Tests run on the CPU in fp32; keep XLA from grabbing every core of a shared CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole run, set before jax is imported so that both
# xdist workers, the subprocesses tests start (which inherit the environment) and the slow
# subset after `make test` all read it: a resumed training run, the 8-device subprocesses and
# module fixtures rebuilt on the other worker compile the same programs again. Cache keys hold
# the program, the compile options and the jax / jaxlib versions, so a code change misses
# rather than reuses. A fresh clone starts empty (CI measures cold); `make clean` empties it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".jax_cache" / "tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
