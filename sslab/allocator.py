"""How the C library's ``malloc`` keeps freed memory, for the lab's processes on Linux (glibc).

A training step allocates and frees the same large buffers (a batch's activations, its
gradients) thousands of times. With glibc's defaults a freed block of more than a few megabytes
goes back to the kernel (``munmap``, or the heap's top trimmed), and the next step's block of the
same size is new memory that the kernel must map and zero page by page: a rotation pretraining
run (1 epoch, 10 000 images, one thread) took 1.6–1.9 million page faults and 2.5–3.5 s of
system time. With freed memory kept for reuse it took 0.22–0.25 million faults and 0.6–1.1 s, and
produced the same model bit for bit (``python -m benchmarks.allocator``, docs/BENCHMARKS.md); the
process held 0.27 GB more at its peak.

The settings (glibc's ``mallopt``, see ``man mallopt``): every block comes from the heap, none
gets a mapping of its own (``M_MMAP_MAX`` 0); the heap's top is handed back only above 1 GB free;
and each time the heap grows it takes 256 MB more than it needs, so growing is rare. They only
change where memory comes from, never a computed value.
"""
from __future__ import annotations

import os

# ``SSLAB_MALLOC=glibc`` leaves glibc's own settings (to compare, or where memory is tight)
CHOICE_VARIABLE = "SSLAB_MALLOC"
CHOICES = ("keep", "glibc")

# mallopt's parameter numbers (malloc.h) and the same settings as environment variables, which a
# process reads when it starts
_MALLOPT = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_MAX": -4}
SETTINGS = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2 ** 30, "M_TOP_PAD": 256 * 2 ** 20}
ENVIRONMENT = {f"MALLOC_{name[2:]}_": str(value) for name, value in SETTINGS.items()}


def wanted(environ=None) -> bool:
    """Whether the lab's settings apply: ``SSLAB_MALLOC`` in ``environ`` (default ``os.environ``)
    unset or ``keep``; ``glibc``: not."""
    choice = (os.environ if environ is None else environ).get(CHOICE_VARIABLE, "") or "keep"
    if choice not in CHOICES:
        raise ValueError(f"{CHOICE_VARIABLE}={choice!r} is not allowed; allowed: {', '.join(CHOICES)}")
    return choice == "keep"


def keep_freed_memory_here() -> bool:
    """Apply :data:`SETTINGS` to this process with glibc's ``mallopt`` unless ``SSLAB_MALLOC`` is
    ``glibc``; False where it did not (that choice, no glibc: macOS, Windows; or glibc refused)."""
    import ctypes
    if not wanted():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(_MALLOPT[name], value) == 1 for name, value in SETTINGS.items())


def keep_freed_memory_in_children(environ=None) -> None:
    """Put :data:`ENVIRONMENT` in ``environ`` (default ``os.environ``) where a variable is not set
    already, so that processes started from here (notebook kernels, worker processes) start with
    the settings. A value the user set wins; nothing with ``SSLAB_MALLOC=glibc``."""
    environ = os.environ if environ is None else environ
    if not wanted(environ):
        return
    for name, value in ENVIRONMENT.items():
        environ.setdefault(name, value)
