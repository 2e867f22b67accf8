"""The glibc malloc tuning the training loop applies (bertforge/allocator.py)."""

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
from bertforge import allocator
tuned = allocator.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):                      # the same 64 MB block freed and allocated again, as in a training step
    block = bytearray(64 << 20)
    del block
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_kept_between_steps():
    tuned, faults = probe()
    untuned, untuned_faults = probe(BERTFORGE_MALLOC_TUNING="0")
    assert tuned and not untuned
    # Untuned, every 64 MB allocation is a fresh mmap whose 16k pages are faulted in again; tuned, only the first.
    assert untuned_faults > 10 * 16_000 and faults < 3 * 16_000, (faults, untuned_faults)
