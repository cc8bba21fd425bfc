"""Independent random streams from one run seed: a 64-bit seed derived from a tuple of integers.

NumPy's ``SeedSequence`` mixes the tuple, so ``(seed, 0, 5)`` and ``(seed, 1, 5)`` seed unrelated streams and
any stream can be re-created from its tuple alone (exact resume, per-slice noise independent of batching).
"""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 64-bit seed for the random stream named by the non-negative integers ``keys``."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])
