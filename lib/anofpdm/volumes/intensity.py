"""Intensity normalisation shared by data preparation, calibration and inference (docs/method.md section 1).

Two steps per volume and sequence:

1. ``percentile_normalise``: divide by the 99th percentile of the brain (nonzero) voxels, clip to [0, 1]
   (the paper's normalisation; it removes the scanner's global scale);
2. with a model's reference landmarks, ``standardise`` (piecewise-linear histogram standardisation in the
   manner of Nyul and Udupa): the brain's intensity percentiles ``LANDMARK_PERCENTILES`` are moved onto the
   reference values, the mean landmarks of the model's training volumes, so a scanner's other tissue
   contrast reaches the network as the contrast it was trained on. On training-like volumes the map is close
   to the identity. Intensities beyond the outer landmarks follow the outer segments' slopes, so a bright
   lesion keeps its contrast to the tissue around it.

Finally [0, 1] maps to [-1, 1] (background 0 becomes -1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LANDMARK_PERCENTILES", "percentile_normalise", "brain_landmarks", "standardise", "normalise"]

LANDMARK_PERCENTILES = (2.0, 10.0, 25.0, 50.0, 75.0)  # healthy tissue: above 75 % a large tumour may lie
MIN_LANDMARK_STEP = 1e-4  # landmarks are made strictly increasing by at least this much


def percentile_normalise(volume: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Scale one sequence of one volume to [0, 1] by a brain-intensity percentile.

    The volume is divided by the ``percentile`` of its nonzero (brain) voxels and clipped to [0, 1].

    Args:
        volume: the image array of one sequence (any shape).
        percentile: the brain-intensity percentile that maps to 1.

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
    return np.clip(np.maximum(data, 0) / scale, 0.0, 1.0).astype(np.float32)


def brain_landmarks(scaled: np.ndarray) -> np.ndarray:
    """The ``LANDMARK_PERCENTILES`` of the brain (nonzero) voxels of a ``percentile_normalise``-d volume."""
    brain = scaled[scaled > 0]
    if brain.size == 0:
        raise ValueError("volume has no positive (brain) voxel: it is empty or all zero")
    return _increasing(np.percentile(brain, LANDMARK_PERCENTILES))


def _increasing(landmarks: np.ndarray) -> np.ndarray:
    steps = np.arange(len(landmarks)) * MIN_LANDMARK_STEP
    return np.maximum.accumulate(np.asarray(landmarks, dtype=np.float64) - steps) + steps


def standardise(scaled: np.ndarray, reference: Sequence[float]) -> np.ndarray:
    """Move the brain's landmarks of a ``percentile_normalise``-d volume onto ``reference`` (piecewise linear).

    Args:
        scaled: the volume in [0, 1], background 0.
        reference: one value per ``LANDMARK_PERCENTILES``, increasing.

    Returns:
        float32 array in [0, 1]; background stays 0.
    """
    target = np.asarray(reference, dtype=np.float64)
    if target.shape != (len(LANDMARK_PERCENTILES),) or np.any(np.diff(target) <= 0):
        raise ValueError(f"reference must be {len(LANDMARK_PERCENTILES)} increasing landmarks, got {reference}")
    own = brain_landmarks(scaled)
    brain = scaled > 0
    values = scaled[brain].astype(np.float64)
    mapped = np.interp(values, own, target)
    low_slope = (target[1] - target[0]) / (own[1] - own[0])
    high_slope = (target[-1] - target[-2]) / (own[-1] - own[-2])
    mapped = np.where(values < own[0], target[0] + (values - own[0]) * low_slope, mapped)
    mapped = np.where(values > own[-1], target[-1] + (values - own[-1]) * high_slope, mapped)
    out = np.zeros(scaled.shape, dtype=np.float32)
    out[brain] = np.clip(mapped, np.finfo(np.float32).tiny, 1.0)  # brain stays above the background's 0
    return out


def normalise(volume: np.ndarray, reference: Sequence[float] | None = None) -> np.ndarray:
    """One sequence of one volume as the network sees it, in [-1, 1] (background -1).

    Args:
        volume: the image array (any shape), background 0.
        reference: the model's landmarks for this sequence (``standardise``); None: percentile scaling only.
    """
    scaled = percentile_normalise(volume)
    if reference is not None:
        scaled = standardise(scaled, reference)
    return (scaled * 2.0 - 1.0).astype(np.float32)
