"""A small scheduler for the demo's stage graph (`stages.STEPS`): the main process runs its steps
in the graph's order; each side step goes to one spawned side process as soon as the steps it
needs are done, and the main process waits for a side step's result only when a later step needs
it (or at the end). The side process runs its steps one at a time in the order they arrive."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from typing import Any, Callable, Sequence

from etalk_jax.demo.stages import Step

# A step's action: from the results of earlier steps (by name), the function to call and its
# arguments. A side step's function and arguments must pickle (module-level functions).
Action = Callable[[dict[str, Any]], tuple[Callable[..., Any], tuple[Any, ...]]]


class Clock:
  """Prints each phase with its duration."""

  def __init__(self):
    self.started = time.perf_counter()
    self.phases: dict[str, float] = {}

  def phase(self, name: str):
    clock = self

    class _Phase:
      def __enter__(self):
        print(f"\n== {name}", flush=True)
        self.began = time.perf_counter()

      def __exit__(self, *exc):
        seconds = time.perf_counter() - self.began
        clock.phases[name] = round(seconds, 1)
        if exc[0] is None:
          print(f"   {name}: {seconds:.1f} s (total {time.perf_counter() - clock.started:.0f} s)",
                flush=True)
        return False

    return _Phase()


def timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  """(function(*args), seconds it took): what the side process returns."""
  began = time.perf_counter()
  return function(*args), time.perf_counter() - began


def run_steps(steps: Sequence[Step], actions: dict[str, Action], clock: Clock) -> dict[str, Any]:
  """Runs `steps` (each an earlier step's dependant only) with `actions[step.name]`; returns every
  step's result by name. A string result is printed under its phase as a summary line."""
  results: dict[str, Any] = {}
  pending: dict[str, concurrent.futures.Future] = {}
  titles = {step.name: step.title for step in steps}

  def collect(name: str) -> None:
    """A side step's result; its phase is the time it took in the side process (what the main
    process waited for it, often nothing, is said beside)."""
    title = f"{titles[name]} (side process)"
    print(f"\n== {title}", flush=True)
    began = time.perf_counter()
    result, seconds = pending.pop(name).result()
    waited = time.perf_counter() - began
    if isinstance(result, str):
      print(f"   {result}")
    clock.phases[title] = round(seconds, 1)
    print(f"   {title}: {seconds:.1f} s in the side process (waited {waited:.1f} s; total "
          f"{time.perf_counter() - clock.started:.0f} s)", flush=True)
    results[name] = result

  # spawn: JAX does not survive fork.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as side:
    try:
      for step in steps:
        for need in step.needs:
          if need in pending:
            collect(need)
        function, args = actions[step.name](results)
        if step.beside:
          pending[step.name] = side.submit(timed, function, *args)
        elif step.title is None:
          results[step.name] = function(*args)
        else:
          with clock.phase(step.title):
            results[step.name] = function(*args)
            if isinstance(results[step.name], str):
              print(f"   {results[step.name]}", flush=True)
      for name in list(pending):
        collect(name)
    except BaseException:
      # A failed or interrupted step ends the run: the side process gets SIGTERM too (a
      # training stage there saves its step and stops), instead of the executor waiting for
      # its step to finish.
      side.shutdown(wait=False, cancel_futures=True)
      for child in multiprocessing.active_children():
        child.terminate()
      raise
  return results
