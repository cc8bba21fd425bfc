"""Process-level settings for long runs, and how records name the device that made them.

glibc raises its mmap threshold each time a large block is freed, after which tensor-sized buffers
come from the heap and fragment it: a forward process of 900 steps grew the resident memory by
~1 GB while live tensors stayed at ~4 MB (benchmarks/forward_process.py). A fixed threshold keeps
such buffers mmap-backed, so freed memory goes back to the system and memory stays flat in T_f.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

__all__ = ["describe_device", "fix_mmap_threshold"]

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
DEFAULT_MMAP_THRESHOLD_BYTES = 64 * 1024


def fix_mmap_threshold(threshold_bytes: int = DEFAULT_MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold; returns False where the C library has no ``mallopt`` (not glibc)."""
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def describe_device(device: torch.device) -> str:
    """``"cuda:0 (NVIDIA H200)"`` for a GPU, ``"cpu"`` otherwise."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
