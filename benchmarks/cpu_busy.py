"""How busy the CPU cores are while `make lab` runs, notebook by notebook: how much running
independent work side by side could still save.

    python -m benchmarks.cpu_busy -- .venv/bin/python -m sslab.lab

runs the command, passes its output through, samples the whole machine's CPU time from
/proc/stat once a second, and reads the runner's ``[i/n] NAME`` lines to tell which notebook ran
when. At the end it prints, per notebook, its wall seconds, the share of all cores' time that was
busy, and the idle core-seconds; half of those (on 2 cores) is the most wall time that filling the
idle cores could save. Linux only (/proc/stat); anything else running on the machine counts as busy.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

STARTED = re.compile(r"^\[(\d+)/(\d+)\] (\S+)")


def cpu_times() -> tuple:
    """(busy, total) jiffies of all cores since boot: idle and iowait are not busy."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    total = sum(fields)
    return total - fields[3] - fields[4], total


def busy_table(samples: list, marks: list, end: float, cores: int) -> list:
    """``[(name, seconds, busy share, idle core-seconds)]`` from ``samples`` ``[(time, busy share
    over the second before it)]`` and ``marks`` ``[(time, notebook name)]``, each notebook from its
    mark to the next (the last to ``end``)."""
    rows = []
    for (start, name), stop in zip(marks, [m[0] for m in marks[1:]] + [end]):
        shares = [share for t, share in samples if start < t <= stop]
        if not shares:
            continue
        busy = sum(shares) / len(shares)
        rows.append((name, stop - start, busy, (1 - busy) * cores * (stop - start)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given; e.g. -- .venv/bin/python -m sslab.lab")
    samples, marks, stop = [], [], threading.Event()

    def sample():
        last = cpu_times()
        while not stop.wait(1.0):
            now = cpu_times()
            spent = now[1] - last[1]
            samples.append((time.perf_counter(), (now[0] - last[0]) / spent if spent else 0.0))
            last = now

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in process.stdout:
        sys.stdout.write(line)
        found = STARTED.match(line)
        if found:
            marks.append((time.perf_counter(), found.group(3)))
    code = process.wait()
    end = time.perf_counter()
    stop.set()
    sampler.join()
    cores = os.cpu_count() or 1
    rows = busy_table(samples, marks, end, cores)
    print("\n| notebook | seconds | cores busy | idle core-seconds |\n|---|---|---|---|")
    for name, seconds, busy, idle in rows:
        print(f"| {name} | {seconds:.0f} | {busy:.0%} | {idle:.0f} |")
    if rows:
        seconds = sum(r[1] for r in rows)
        idle = sum(r[3] for r in rows)
        print(f"| **all** | {seconds:.0f} | {1 - idle / (cores * seconds):.0%} | {idle:.0f} |")
    return code


if __name__ == "__main__":
    sys.exit(main())
