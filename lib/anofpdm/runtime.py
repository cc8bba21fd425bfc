"""Process-level helpers for long runs, the default device, and how records name the device that made them.

glibc keeps memory freed between network calls in its heap, and over a long forward process the
heap fragments: at batch 8 the resident memory peaked at 1.05 GB over 600 visited steps while live
tensors stayed at a few MB (benchmarks/forward_process.py before the trimming).
``release_free_memory`` (``malloc_trim``) hands the free pages back; the forward process calls it
every few dozen steps. (Fixing glibc's mmap threshold also keeps memory flat, but every tensor buffer
then becomes a fresh mmap whose pages fault in on each call: 2.7 times slower on a 2-core CPU.)

The opposite trouble comes with large batches: glibc serves every allocation above its mmap ceiling
(32 MB on 64-bit) with a fresh mapping, and a CPU training step at batch 256 allocates and frees
hundreds of such activation buffers, each paging in zeroed memory again: 44 % of the run's CPU time
went to the kernel. ``reuse_heap_memory`` makes glibc keep them in its heap for reuse (CPU
preset at batch 256 on 2 cores: 0.04 -> 0.09 iterations/s), in one heap for all threads: with a heap per thread
(glibc's arenas) the forward process's chunk workers each kept their own freed buffers, and a volume's peak resident
memory rose from 0.89 to 1.09 GB at the same speed (demo study SYN_00000, 47.7 s either way). The process's entry
points call it.

A one-off pass over large buffers (brain extraction: deepbet's networks on a 256^3 volume) fragments that heap
instead: the same code's peak resident memory went 0.87-1.04 GB over runs of the demo head SYN_00003 (``anofpdm
segment``). ``mapped_large_buffers`` serves allocations over 128 kB by their own mappings for such a pass (returned
on free), then the heap again: 0.78-0.85 GB at the same speed (docs/performance.md, "A head in under 1 GB").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

import torch

__all__ = ["default_device", "describe_device", "mapped_large_buffers", "release_free_memory", "reuse_heap_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP_FREED_BYTES = 2**31 - 1  # the largest value mallopt takes: free space at the heap's top is kept up to 2 GB
_GLIBC_MMAP_MAX = 65536  # glibc's default most mappings (M_MMAP_MAX)
_heap_reuse = {"on": False}  # whether reuse_heap_memory took effect in this process


@functools.cache
def _libc_function(name: str):
    library = ctypes.util.find_library("c")
    libc = ctypes.CDLL(library) if library else None
    return getattr(libc, name, None)


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system; False where the C library has no ``malloc_trim`` (not glibc)."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def reuse_heap_memory() -> bool:
    """Serve all allocations, large ones included, from one C heap shared by all threads, and keep freed memory there
    for reuse.

    Process-wide; memory goes back to the system only through ``release_free_memory`` (or once over
    2 GB lie free at the heap's top). False where the C library has no ``mallopt`` (not glibc) or
    refuses a setting.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    _heap_reuse["on"] = all(bool(mallopt(parameter, value)) for parameter, value in
                            ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES), (_M_ARENA_MAX, 1)))
    return _heap_reuse["on"]


@contextlib.contextmanager
def mapped_large_buffers() -> Iterator[None]:
    """Within the block, allocations over glibc's mmap threshold (128 kB) get mappings of their own, returned to the
    system when freed, as without ``reuse_heap_memory``; after it, the heap again. Nothing changes where
    ``reuse_heap_memory`` did not take effect. Process-wide while it lasts (other threads' allocations too)."""
    mallopt = _libc_function("mallopt")
    if not _heap_reuse["on"] or mallopt is None:
        yield
        return
    mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, 0)


def default_device() -> str:
    """The device used when none is named: ``"cuda"`` where CUDA is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(device: torch.device) -> str:
    """``"cuda:0 (NVIDIA H200)"`` for a GPU, ``"cpu"`` otherwise."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
