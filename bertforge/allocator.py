"""Keep freed host memory in the process between training steps (glibc malloc tuning).

A training step on the CPU allocates and frees the same large tensors every step (activations, gradients, the
(V, H) word-embedding gradient). glibc serves blocks above its mmap threshold with fresh `mmap`s and gives them
back on `free`, so every step pays again for the kernel to fault in and zero those pages (hundreds of thousands of
minor page faults per step for `base`). Serving every block from the heap and never trimming it keeps the pages
mapped, which removes nearly all of those faults (`python benchmarks/step_breakdown.py`; figures in
docs/benchmarks.md). The cost is that the process keeps its peak heap until it exits, which a training process
does anyway.

Only glibc on Linux is tuned; elsewhere this does nothing. `BERTFORGE_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4   # glibc <malloc.h> parameter numbers


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process (see the module docstring); True if it was tuned."""
    if not sys.platform.startswith("linux") or os.environ.get("BERTFORGE_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all((mallopt(_M_MMAP_MAX, 0),                    # no mmap-backed blocks: everything from the heap
                mallopt(_M_MMAP_THRESHOLD, 1 << 30),
                mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)))     # never give the heap top back between steps
