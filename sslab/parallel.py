"""Independent work — pretraining runs, the cells of a sweep — in worker processes, one thread
each. The lab's models are small: on a 2-core CPU one process on two threads leaves much of the
second core idle (kernel launches, the optimiser, augmentation, Python), so two processes on one
thread each finish a sweep sooner (docs/BENCHMARKS.md measures by how much). Every piece of work
goes through the run store as it would in one process: each result is written under its own
key and lock, so the main process then reads what the workers wrote.

``workers`` (the ``SSLAB_WORKERS`` environment variable by default; 1: everything in this
process, as before): how many worker processes. Each runs one thread and computes as a fresh
interpreter would: no torch thread pool or CUDA state is copied from the process that asks.
Where the platform has it (Linux, macOS), workers are forked from multiprocessing's fork server,
a process that imported torch and the lab's job modules once (:data:`PRELOAD`) and never
computed; elsewhere they are started with ``spawn``. A sweep's workers then start in a few hundredths of a
second instead of the one to two seconds each fresh interpreter spends importing torch, which
every sweep of every notebook paid; :func:`start_early` starts the server before the first
sweep, while a notebook's first cells leave a core free.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Optional, Sequence

from .checks import MAX_COUNT, check_int

WORKERS_VARIABLE = "SSLAB_WORKERS"
# what the fork server imports before it forks the first worker: torch, and the modules of the
# lab's jobs (pretraining runs, sweep cells, embeddings); none of them computes anything on import
PRELOAD = ("torch", "sslab.parallel", "sslab.evaluate.curve", "sslab.lab.runs", "sslab.lab.embeddings")


def default_workers() -> int:
    """``SSLAB_WORKERS`` when set (checked), else 1."""
    text = os.environ.get(WORKERS_VARIABLE)
    if text is None or text == "":
        return 1
    try:
        value = int(text)
    except ValueError:
        value = text
    return check_int(WORKERS_VARIABLE, value, 1, " (worker processes)", maximum=MAX_COUNT)


def _context():
    """The multiprocessing context workers start from: the fork server (:data:`PRELOAD` imported
    in it) where the platform has one, else ``spawn``."""
    import multiprocessing
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(PRELOAD))  # no effect once the server runs
        return context
    return multiprocessing.get_context("spawn")


def start_early() -> None:
    """Start the fork server now, when this process will run sweeps in worker processes
    (:func:`default_workers` > 1) and the platform has one: it imports :data:`PRELOAD` in the
    background, and the first sweep's workers need not wait for it. Nothing otherwise."""
    context = _context()
    if default_workers() > 1 and context.get_start_method() == "forkserver":
        from multiprocessing import forkserver
        forkserver.ensure_running()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's: a reused number, so not the owner
        return False
    return True


def _end_with_parent(owner: int) -> None:
    """End this worker (SIGTERM) when ``owner``, the process whose sweep it works for, ends. A
    sweep killed from outside (SIGTERM or SIGKILL to its own process, not to the group) would
    otherwise leave its workers computing their current cells for minutes, on cores the next run
    needs. Whatever a killed worker had not finished is left unfinished in the store, as a kill of
    one process leaves it, and the next run computes it.

    A spawned worker's parent is ``owner``: Linux's prctl sends the signal when it ends. A worker
    forked by the fork server has the server as its parent, and the server ends only once every
    worker has (each holds the pipe whose end tells the server its clients are gone), so a thread
    waits for ``owner`` itself: on a pidfd where Linux has them, else by asking once a second."""
    import signal
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if not _alive(owner):  # the owner ended before any of this was set up
        os._exit(1)
    if os.getppid() == owner:
        return  # spawned: prctl's signal, where there is one, or the end of the job queue
    import threading
    try:
        handle = os.pidfd_open(owner)
    except (AttributeError, OSError):
        handle = None

    def watch():
        if handle is not None:
            import select
            select.select([handle], [], [])  # readable once the owner has ended
        else:
            while _alive(owner):
                time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sslab-owner-watch", daemon=True).start()


def _one_thread(owner: int, environ: dict) -> None:
    import torch

    from .allocator import keep_freed_memory_here
    _end_with_parent(owner)
    # a forked worker starts with the fork server's environment, from when the server started: it
    # takes the one of the process whose sweep it works for, as a spawned worker does
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    os.environ.update(environ)
    keep_freed_memory_here()  # a worker's steps reuse freed memory (the same results, less system time)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _call(function: Callable, args: tuple, kwargs: dict):
    return function(*args, **kwargs)


def run_all(jobs: Sequence[tuple], workers: int, describe: Optional[Callable] = None, report=None) -> list:
    """Run ``jobs`` — ``(function, args, kwargs)`` of top-level, picklable functions — in
    ``workers`` processes (longest first is the caller's order to choose) and return their
    results in the jobs' order. With one worker, or one job, everything runs here. ``report``
    (e.g. :class:`Progress`) hears of every job as it finishes (``describe(job)`` names it). The
    first job that fails stops the others and its exception is raised here."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(_call(*job))
            if report is not None:
                report.done(describe(job) if describe else "")
        return results
    results: dict = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_context(),
                             initializer=_one_thread, initargs=(os.getpid(), dict(os.environ))) as pool:
        pending = {pool.submit(_call, *job): i for i, job in enumerate(jobs)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    results[i] = future.result()
                    if report is not None:
                        report.done(describe(jobs[i]) if describe else "")
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return [results[i] for i in range(len(jobs))]


def dispatch_order(costs: Sequence[float], workers: int, exhaustive: int = 8) -> list:
    """The order to hand jobs of estimated ``costs`` to ``workers`` processes that each take the
    next job when free (as :func:`run_all` does) so that the last one finishes soonest, by the
    estimates: every order is tried for up to ``exhaustive`` jobs (the first best one, from the
    longest first, is kept), longest first beyond. Longest first is not always best: jobs of cost
    126, 84, 84, 60, 60 on two workers end at 228 that way and at 210 as 126, 60, 60, 84, 84."""
    import itertools
    longest = sorted(range(len(costs)), key=lambda i: -costs[i])
    if workers <= 1 or len(costs) <= workers or len(costs) > exhaustive:
        return longest
    return list(min(itertools.permutations(longest), key=lambda order: _makespan([costs[i] for i in order], workers)))


def _makespan(costs: Sequence[float], workers: int) -> float:
    free = [0.0] * workers
    for cost in costs:
        first = min(range(workers), key=lambda w: free[w])
        free[first] += cost
    return max(free)


class Progress:
    """Lines that say how far a long piece of work is: ``what: 12/30 done (the last one), 95 s``.
    They go to the process's own standard error (``sys.__stderr__``): in a notebook run by
    ``make lab`` that is the terminal running it, so a long cell is a moving count there, not a
    silent stretch. Off unless ``enabled`` (``make lab`` sets ``SSLAB_PROGRESS=1`` for its notebooks)."""

    def __init__(self, what: str, total: int, enabled: Optional[bool] = None):
        self.what, self.total, self.count = what, total, 0
        self.enabled = os.environ.get("SSLAB_PROGRESS") == "1" if enabled is None else enabled
        self.started = time.perf_counter()
        if self.enabled and total:
            self._say(f"{what}: {total} to do")

    def done(self, name: str = "") -> None:
        self.count += 1
        if self.enabled:
            self._say(f"{self.what}: {self.count}/{self.total} done{f' ({name})' if name else ''}, "
                      f"{time.perf_counter() - self.started:.0f} s")

    @staticmethod
    def _say(text: str) -> None:
        stream = sys.__stderr__ or sys.stderr
        stream.write(f"        {text}\n")
        stream.flush()
