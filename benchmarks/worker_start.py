"""How long a sweep waits for its worker processes before the first job runs: ``run_all`` of two
jobs that only import what a sweep's cells import (the lab's curve module, torch with it), on two
workers, each way multiprocessing can start them:

- ``spawn``: a fresh interpreter per worker, which imports torch and the lab itself;
- ``forkserver``: workers forked from a fork server that imported them once (:data:`sslab.parallel.PRELOAD`);
  the first batch waits for the server's own imports unless it was started early
  (:func:`sslab.parallel.start_early`), every later batch forks at once.

    python -m benchmarks.worker_start            # 5 batches each way, medians

Each way runs in a process of its own, so neither finds the other's modules imported."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SCRIPT = """
import json, sys, time
from sslab import parallel
if sys.argv[1] == "spawn":
    parallel._context = lambda: __import__("multiprocessing").get_context("spawn")
if sys.argv[2] == "early":
    parallel.start_early()
    time.sleep(float(sys.argv[4]))  # what a notebook's first cells take before its first sweep
seconds = []
for _ in range(int(sys.argv[3])):
    began = time.perf_counter()
    parallel.run_all([(exec, ("import sslab.evaluate.curve",), {})] * 2, 2)
    seconds.append(time.perf_counter() - began)
print(json.dumps(seconds))
"""


def batches(way: str, early: bool, repeats: int, head_start: float) -> list:
    """Seconds of each of ``repeats`` two-job batches in one fresh process."""
    env = {**os.environ, "SSLAB_WORKERS": "2"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, way, "early" if early else "late", str(repeats),
                           str(head_start)], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="batches per process (default 5)")
    parser.add_argument("--head-start", type=float, default=3.0,
                        help="seconds between starting the fork server early and the first batch (default 3)")
    args = parser.parse_args(argv)
    print("| workers started by | first batch (s) | later batches, median (s) |")
    print("|---|---|---|")
    ways = (("spawn", False, "spawn"), ("forkserver", False, "fork server, started by the first batch"),
            ("forkserver", True, f"fork server, started {args.head_start:g} s before it"))
    for way, early, label in ways:
        seconds = batches(way, early, args.repeats, args.head_start)
        print(f"| {label} | {seconds[0]:.2f} | {statistics.median(seconds[1:]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
