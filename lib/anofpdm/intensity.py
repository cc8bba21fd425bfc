"""Intensity normalisation shared by data preparation and inference (docs/method.md section 1)."""

from __future__ import annotations

import numpy as np

__all__ = ["percentile_normalise"]


def percentile_normalise(volume: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Scale one sequence of one volume to [-1, 1].

    The volume is divided by the ``percentile`` of its nonzero (brain) voxels, clipped to [0, 1] and
    mapped linearly to [-1, 1], so background (0) becomes -1.

    Args:
        volume: the image array of one sequence (any shape).
        percentile: the brain-intensity percentile that maps to the top of the range.

    Returns:
        float32 array of the same shape.

    Raises:
        ValueError: if the volume holds NaN/Inf, negative values only, or no nonzero voxel.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    data = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(data).all():
        raise ValueError("volume contains NaN or Inf values")
    brain = data[data > 0]
    if brain.size == 0:
        raise ValueError("volume has no positive (brain) voxel: it is empty or all zero")
    scale = float(np.percentile(brain, percentile))
    if scale <= 0:
        raise ValueError("volume brain intensities are not positive")
    return (np.clip(np.maximum(data, 0) / scale, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)
