"""Process helpers: the C heap's free pages go back to the system (bounds memory over long forward processes),
and large buffers can be kept in the heap for reuse (fast large-batch CPU training)."""

import platform
import subprocess
import sys

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


_HEAP_PROBE = """
import sys
import torch
from anofpdm.runtime import mapped_large_buffers, reuse_heap_memory
if sys.argv[1] != "default":
    assert reuse_heap_memory() is True

def in_heap():
    buffer = torch.empty(64 * 2**20, dtype=torch.uint8)  # above glibc's 32 MB mmap ceiling
    address = buffer.data_ptr()
    with open("/proc/self/maps") as maps:
        heap = [line.split()[0].split("-") for line in maps if line.rstrip().endswith("[heap]")]
    return any(int(start, 16) <= address < int(end, 16) for start, end in heap)

if sys.argv[1] == "mapped":
    with mapped_large_buffers():
        print(in_heap(), end=" ")
print(in_heap())
"""


def _in_heap(mode: str) -> str:
    run = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True)
    return run.stdout.strip()


def test_large_buffers_come_from_the_heap_only_after_reuse_heap_memory():
    """glibc maps each buffer above 32 MB afresh (pages fault in on every use); after the call the heap serves it."""
    assert _in_heap("default") == "False"
    assert _in_heap("reuse") == "True"


def test_mapped_large_buffers_maps_them_for_its_block_only():
    """Brain extraction's one-off large buffers: mapped (returned to the system on free) inside, the heap after."""
    assert _in_heap("mapped") == "False True"
