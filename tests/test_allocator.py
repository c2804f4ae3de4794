"""glibc's malloc keeping freed memory (sslab.allocator): where it applies, a large buffer freed and
allocated again is not mapped and zeroed again by the kernel."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sslab import allocator

# Allocate, fill and free a 64 MB tensor 20 times; print the page faults each time took.
FAULTS = """
import resource, sys, torch
if sys.argv[1] == "on":
    from sslab.allocator import keep_freed_memory_here
    assert keep_freed_memory_here()
torch.ones(1)
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2 ** 20)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults(mode: str) -> list:
    env = {k: v for k, v in os.environ.items() if k not in allocator.ENVIRONMENT}  # glibc's own at the start
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True, env=env)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_a_freed_large_buffer_is_reused_not_mapped_again():
    off, on = _faults("off"), _faults("on")
    # by default every buffer is new memory, faulted in page by page (its own mapping, unmapped when
    # freed): 16 384 faults of 4 kB pages, or 32 where the kernel maps 2 MB pages
    assert min(off) >= 32
    # kept: once the heap has grown (the first few), the same memory again without a fault
    assert sum(on[10:]) <= min(off) // 10


def test_children_get_the_settings_unless_set_already():
    environ = {"MALLOC_TOP_PAD_": "4096"}
    allocator.keep_freed_memory_in_children(environ)
    assert environ == {"MALLOC_TOP_PAD_": "4096", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 30)}


def test_sslab_malloc_glibc_leaves_glibcs_settings(monkeypatch):
    monkeypatch.setenv("SSLAB_MALLOC", "glibc")
    assert allocator.keep_freed_memory_here() is False
    environ = {"SSLAB_MALLOC": "glibc"}
    allocator.keep_freed_memory_in_children(environ)
    assert environ == {"SSLAB_MALLOC": "glibc"}
    monkeypatch.setenv("SSLAB_MALLOC", "tcmalloc")
    with pytest.raises(ValueError, match=r"SSLAB_MALLOC='tcmalloc' is not allowed; allowed: keep, glibc"):
        allocator.keep_freed_memory_here()


def test_the_environment_says_what_mallopt_sets():
    # glibc reads MALLOC_<NAME>_ at a process's start for the mallopt parameter M_<NAME>
    assert allocator.ENVIRONMENT == {f"MALLOC_{name[2:]}_": str(value) for name, value in allocator.SETTINGS.items()}
    assert allocator.SETTINGS == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2 ** 30, "M_TOP_PAD": 256 * 2 ** 20}
