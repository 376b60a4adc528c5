"""Keep the trainer's resident memory flat over a run (glibc malloc tuning; a no-op elsewhere).

glibc serves a large block with mmap and gives it back on free, until the first time such a
block is freed: then it raises its mmap threshold to that size (up to 32 MB on 64-bit), and
from there on blocks of a few MB come from the heap. The trainer's activations change shape
every step (length groups of different sizes), so the heap fragments and the process's RSS
climbs step after step while the memory in use does not. A fixed threshold keeps activations
on mmap (returned on free), and trimming after each step returns the heap's free top.
"""

from __future__ import annotations

import ctypes
import sys

# "ragpt": trim every TRIM_EVERY steps; "trim": after every step; "mmap": a fixed mmap threshold
# and a trim after every step; "default": glibc as it is. benchmarks/train_memory.py compares them:
# a trim makes the next step fault its working set in again, and mmapped activations do so on
# every allocation, so both cost speed; trimming now and then bounds the growth for little.
HEAP_MODE = "ragpt"
TRIM_EVERY = 10
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks from 1 MiB up are mmapped, whatever was freed before
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libc.so.6")
                lib.mallopt, lib.malloc_trim  # noqa: B018 - both exist only in glibc
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc or None


def fix_mmap_threshold() -> bool:
    """Stop glibc from raising its mmap threshold (see the module doc). True if applied."""
    lib = _glibc()
    if lib is None or HEAP_MODE != "mmap":
        return False
    return bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim_heap(step: int) -> None:
    """Return the heap's free memory to the system, after training step `step` (from 1)."""
    lib = _glibc()
    if lib is None or HEAP_MODE == "default" or (HEAP_MODE == "ragpt" and step % TRIM_EVERY):
        return
    lib.malloc_trim(0)
