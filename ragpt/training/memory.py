"""Give the trainer's freed heap back to the system now and then (glibc malloc; a no-op elsewhere).

glibc keeps memory that a step freed for the next one: between steps the trainer stays at the
size of its largest step so far. That size grows over the first steps of a run, as longer length
groups come up, and then stays: benchmarks/train_memory.py measured a deep prompt at 8 x 640
tokens reach a 10.9 GB peak by step 10 and keep it to step 30; it is the working set of the
largest batch, not a leak. Trimming every TRIM_EVERY steps returns the freed heap between steps
(resident 1.2 GB at those points) for a few percent of speed, and hardly lowers the peak (10.3 GB).
Trimming after every step, or a fixed mmap threshold, cost more speed (the next step faults its
working set in again) for little more.
"""

from __future__ import annotations

import ctypes
import sys

# "ragpt": trim every TRIM_EVERY steps; "trim": after every step; "mmap": a fixed mmap threshold
# and a trim after every step; "default": glibc as it is (benchmarks/train_memory.py compares them).
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
