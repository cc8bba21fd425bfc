"""Overlap of a binary prediction with the truth: Dice, IoU, precision and recall.

They count true positives TP, false positives FP and false negatives FN of a binary prediction against the
truth: Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN), precision = TP / (TP + FP),
recall = TP / (TP + FN). Where a denominator is zero the value is 1 when prediction and truth are both
empty, else 0 (an empty prediction on an empty truth is right; a missed or invented lesion is wrong).

Evaluation (:mod:`anofpdm.evaluation.metrics`) scores results with them; input checks
(:mod:`anofpdm.volumes.checks`) compare
the brain regions of two sequences with the Dice.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OVERLAP_NAMES", "check_pair", "overlap_scores", "dice", "iou", "precision", "recall"]

OVERLAP_NAMES = ("dice", "iou", "precision", "recall")


def check_pair(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as boolean arrays, refused unless their shapes are equal."""
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} != truth shape {truth.shape}")
    return prediction.astype(bool), truth.astype(bool)


def overlap_scores(prediction: np.ndarray, truth: np.ndarray, batch_dims: int = 0) -> dict[str, np.ndarray]:
    """Dice, IoU, precision and recall of binary masks, optionally per item of leading batch dimensions.

    Args:
        prediction: binary prediction.
        truth: binary truth of the same shape.
        batch_dims: number of leading dimensions that index separate items (e.g. 1 for N x H x W slices,
            giving N values per metric); the other dimensions are pooled.

    Returns:
        metric name -> array of shape ``prediction.shape[:batch_dims]`` (0-d for ``batch_dims=0``).
    """
    prediction, truth = check_pair(prediction, truth)
    if not 0 <= batch_dims <= prediction.ndim:
        raise ValueError(f"batch_dims must be in [0, {prediction.ndim}], got {batch_dims}")
    axes = tuple(range(batch_dims, prediction.ndim))
    tp = (prediction & truth).sum(axis=axes, dtype=np.float64)
    fp = (prediction & ~truth).sum(axis=axes, dtype=np.float64)
    fn = (~prediction & truth).sum(axis=axes, dtype=np.float64)
    both_empty = (tp + fp + fn) == 0

    def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        safe = np.where(denominator > 0, denominator, 1.0)
        return np.where(denominator > 0, numerator / safe, both_empty.astype(np.float64))

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2 TP / (2 TP + FP + FN); 1 for an empty prediction on an empty truth."""
    return float(overlap_scores(prediction, truth)["dice"])


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """TP / (TP + FP + FN) (Jaccard); 1 for an empty prediction on an empty truth."""
    return float(overlap_scores(prediction, truth)["iou"])


def precision(prediction: np.ndarray, truth: np.ndarray) -> float:
    """TP / (TP + FP): the fraction of predicted voxels that are tumour."""
    return float(overlap_scores(prediction, truth)["precision"])


def recall(prediction: np.ndarray, truth: np.ndarray) -> float:
    """TP / (TP + FN): the fraction of tumour voxels that are predicted (sensitivity)."""
    return float(overlap_scores(prediction, truth)["recall"])
