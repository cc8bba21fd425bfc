"""Process helpers: the C heap's free pages go back to the system (bounds memory over long forward processes)."""

import platform

import numpy as np

from anofpdm.runtime import release_free_memory


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def test_free_heap_pages_are_returned_on_glibc():
    assert platform.libc_ver()[0] == "glibc"  # the machines this project runs on
    blocks = [np.ones(4096) for _ in range(4000)]  # 125 MB of 32 kB heap blocks (below glibc's mmap threshold)
    del blocks[:-1]  # the last block pins the heap's top, so free() alone returns nothing
    before = _resident_mb()
    assert release_free_memory() is True
    assert before - _resident_mb() > 100
