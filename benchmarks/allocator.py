"""What glibc's malloc keeping freed memory (sslab.allocator) does to a pretraining run: the same
command with glibc's defaults and with the lab's settings, alternating, one thread each, in fresh
output folders; wall, user and system seconds, page faults and peak memory of each, and whether
the two settings trained the same model bit for bit.

    python -m benchmarks.allocator            # rotation, 1 epoch on 10 000 images, 3 pairs
"""
from __future__ import annotations

import argparse
import filecmp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sslab.allocator import ENVIRONMENT  # the lab's own settings, left out of the runs' environment


def one_run(settings: bool, out: Path, method: str, epochs: int, limit: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    env.update(OMP_NUM_THREADS="1", SSLAB_MALLOC="keep" if settings else "glibc")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # in a child process that only waits for the run, so that RUSAGE_CHILDREN counts the run alone
    subprocess.run([sys.executable, "-m", "sslab", "pretrain", "--method", method, "--epochs", str(epochs),
                    "--limit", str(limit), "--device", "cpu", "--out", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dict(wall=wall, user=after.ru_utime - before.ru_utime, system=after.ru_stime - before.ru_stime,
                faults=after.ru_minflt - before.ru_minflt, peak_gb=after.ru_maxrss / 2 ** 20,
                model=next(out.glob("runs/*/model.pt")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="rotation")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args(argv)
    print("| malloc | wall s | user s | system s | page faults | peak GB (largest so far) |\n|---|---|---|---|---|---|")
    same = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            rows = {}
            for settings in (False, True):
                name = "kept (sslab.allocator)" if settings else "glibc's defaults"
                row = rows[settings] = one_run(settings, Path(tmp) / f"{pair}-{int(settings)}", args.method,
                                               args.epochs, args.limit)
                print(f"| {name} | {row['wall']:.1f} | {row['user']:.1f} | {row['system']:.2f} | "
                      f"{row['faults'] / 1e6:.2f} M | {row['peak_gb']:.2f} |")
            same.append(filecmp.cmp(rows[False]["model"], rows[True]["model"], shallow=False))
    print(f"\nthe same model.pt bit for bit in {sum(same)} of {len(same)} pairs")
    return 0 if all(same) else 1


if __name__ == "__main__":
    raise SystemExit(main())
