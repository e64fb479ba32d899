"""Loader throughput: training windows per second (512², 120 frames, audio, reference, masks) with
0, 1 and 2 Grain worker processes and 1 or 2 read threads, on the synthetic `res512` dataset (built
on first use).

  python benchmarks/loader.py [--data-dir /tmp/etalk-bench] [--windows 16] [--workers 0 1 2]

Prints one line per (workers, threads); the goal is >= 2 windows/s with 2 workers on a 2-core
machine.
Figures only: nothing is asserted.
"""

import argparse
import time

from data_pipeline import loader
from data_pipeline.builders import synthetic_talking_heads


def measure(dataset_dir: str, workers: int, threads: int, windows: int,
            window: int) -> tuple[float, float]:
  config = loader.LoaderConfig(window=window, batch_size=1, seed=0, num_workers=workers,
                               read_threads=threads, shard_index=0, shard_count=1)
  started = time.perf_counter()
  iterator = iter(loader.make_dataset(dataset_dir, "train", config))
  next(iterator)  # start-up: worker processes, first decode
  first = time.perf_counter() - started
  started = time.perf_counter()
  for _ in range(windows):
    batch = next(iterator)
  elapsed = time.perf_counter() - started
  assert batch["frames"].shape[1:] == (window, 512, 512, 3)
  return windows / elapsed, first


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data-dir", default="/tmp/etalk-bench")
  parser.add_argument("--windows", type=int, default=16)
  parser.add_argument("--window", type=int, default=120)
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                      help="read threads (per process)")
  args = parser.parse_args()

  started = time.perf_counter()
  dataset_dir = synthetic_talking_heads.build(args.data_dir, "res512")
  print(f"dataset {dataset_dir} ready in {time.perf_counter() - started:.1f} s")
  for workers in args.workers:
    for threads in args.threads:
      rate, first = measure(dataset_dir, workers, threads, args.windows, args.window)
      print(f"workers={workers} threads={threads}: {rate:.2f} windows/s ({args.window} frames "
            f"512², audio, reference, masks; first window after {first:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
