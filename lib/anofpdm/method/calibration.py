"""Label-free calibration of c* and Dmax on validation slices (docs/method.md section 4).

Only image-level labels (healthy / unhealthy slice) are used: Dmax[m] is the largest peak divergence
of modality m over unhealthy slices, and c* the cosine threshold with the fewest misclassified
slices. Each serving mode ("fast", "full") is calibrated at its own forward-process settings, since
the curves and so the scores depend on the visited steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from anofpdm.method.decisions import Calibration
from anofpdm.method.forward_process import ForwardProcessConfig, run_on_slices
from anofpdm.method.model import LoadedModel
from anofpdm.progress import ProgressCallback
from anofpdm.runtime import describe_device

__all__ = ["MODES", "choose_cosine_threshold", "fit_unhealthy_frequency", "calibrate_mode", "choose_guidance"]

# The serving modes: "full" is the paper's setting; "fast", the CPU default, visits every 120th step (5 steps) and
# stops 1 visited step after the divergence peak: with the lesion edges redrawn on the input grid it segments as
# well as every 30th step did, 4 times cheaper (docs/performance.md, "Five visited steps"). "fast-ddpm" keeps the
# 20 steps it was calibrated at. The "-ddpm" modes use the stochastic DDPM forward encoding; c* and Dmax depend on
# the encoding, so each has its own calibration.
_FULL = ForwardProcessConfig(guidance=2.0, forward_steps=600, stride=1, encoding="ddim")
_FAST = ForwardProcessConfig(guidance=2.0, forward_steps=600, stride=120, encoding="ddim", early_stop=1)
MODES: dict[str, ForwardProcessConfig] = {
    "full": _FULL,
    "fast": _FAST,
    "full-ddpm": replace(_FULL, encoding="ddpm"),
    "fast-ddpm": replace(_FAST, encoding="ddpm", stride=30, early_stop=4),
}
GUIDANCE_TOLERANCE = 0.99  # the paper keeps the largest w within 99 % of the best validation accuracy
MIN_FREQUENCY_GROUP = 20  # validation slices behind each unhealthy fraction (fit_unhealthy_frequency)


def choose_cosine_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """c* with the fewest misclassified slices, a slice being called unhealthy when score <= c*.

    Candidates are the midpoints between consecutive distinct scores and the two extremes; ties in
    the error count go to the smallest threshold.

    Returns:
        (c*, number of misclassified slices).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of equal length")
    if labels.all() or not labels.any():
        raise ValueError("calibration needs both healthy and unhealthy slices (image-level labels)")
    distinct = np.unique(scores)
    candidates = np.concatenate([[distinct[0] - 1e-6], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1]]])
    errors = np.array([((scores <= c) != labels).sum() for c in candidates])
    best = int(errors.argmin())
    return float(candidates[best]), int(errors[best])


def fit_unhealthy_frequency(
    scores: np.ndarray, labels: np.ndarray, min_group: int = MIN_FREQUENCY_GROUP
) -> tuple[tuple[float, float], ...]:
    """How often validation slices are unhealthy as a function of their cosine score.

    An isotonic fit (pool-adjacent-violators; the fraction is non-increasing in the score, a lower score being
    the more anomalous), whose groups smaller than ``min_group`` slices are then pooled with the neighbour of
    the closer fraction, so no fraction rests on a handful of slices. Pooling neighbours keeps the order.
    (Not ``sklearn.isotonic.IsotonicRegression``: it returns fitted values, not groups, and so merges adjacent
    groups of equal fraction that this fit keeps apart, which changes the pooled table.)

    Returns:
        (highest score of the group, unhealthy fraction) per group, ascending in score.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(float)
    if scores.shape != labels.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError("scores and labels must be 1-D, non-empty and of equal length")
    if min_group < 1:
        raise ValueError(f"min_group must be >= 1, got {min_group}")
    distinct, group = np.unique(scores, return_inverse=True)
    groups: list[tuple[float, float, float]] = []  # (highest score, unhealthy slices, slices)
    for row in zip(distinct, np.bincount(group, labels), np.bincount(group), strict=True):
        groups.append(row)
        while len(groups) > 1 and _fraction(groups[-2]) < _fraction(groups[-1]):
            groups[-2:] = [_pool(*groups[-2:])]
    while len(groups) > 1 and min(g[2] for g in groups) < min_group:
        i = min(range(len(groups)), key=lambda k: groups[k][2])
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(groups)]
        j = min(neighbours, key=lambda k: abs(_fraction(groups[k]) - _fraction(groups[i])))
        low = min(i, j)
        groups[low:low + 2] = [_pool(groups[low], groups[low + 1])]
    return tuple((float(g[0]), round(_fraction(g), 6)) for g in groups)


def _fraction(group: tuple[float, float, float]) -> float:
    return group[1] / group[2]


def _pool(left: tuple[float, float, float], right: tuple[float, float, float]) -> tuple[float, float, float]:
    """Two adjacent groups as one (the right one holds the higher scores)."""
    return right[0], left[1] + right[1], left[2] + right[2]


def calibrate_mode(
    model: LoadedModel,
    images: torch.Tensor,
    labels: Sequence[int],
    config: ForwardProcessConfig,
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
) -> Calibration:
    """Calibrate c* and Dmax for one mode's forward-process settings.

    Args:
        model: the trained model.
        images: N x C x S x S validation slices in the model's sequence order.
        labels: N image-level labels (0 healthy, 1 unhealthy).
        config: the mode's forward-process settings.
        batch_size: slices per network batch.
        progress: called with (visited steps done, planned), summed over chunks.
    """
    labels = np.asarray(labels).astype(int)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} slices but {len(labels)} labels")
    stats = run_on_slices(model, images, config, batch_size, progress)
    scores, peaks = stats.scores.numpy(), stats.max_divergence.numpy()
    threshold, errors = choose_cosine_threshold(scores, labels)
    d_max = peaks[labels.astype(bool)].max(axis=0)
    if (d_max <= 0).any():
        raise ValueError(
            f"guided and unguided predictions never differ on unhealthy validation slices (Dmax {d_max.tolist()}): "
            "the network has not learnt the class conditioning; train it (longer) before calibrating"
        )
    predicted = scores <= threshold
    truth = labels.astype(bool)
    return Calibration(
        cosine_threshold=threshold,
        max_divergence=tuple(float(v) for v in d_max),
        guidance=config.guidance,
        forward_steps=config.forward_steps,
        stride=config.stride,
        encoding=config.encoding,
        early_stop=config.early_stop,
        unhealthy_frequency=fit_unhealthy_frequency(scores, labels),
        validation={
            "slices": int(len(labels)),
            "healthy": int((~truth).sum()),
            "unhealthy": int(truth.sum()),
            "accuracy": round(1.0 - errors / len(labels), 4),
            "true_positive": int((predicted & truth).sum()),
            "false_positive": int((predicted & ~truth).sum()),
            "true_negative": int((~predicted & ~truth).sum()),
            "false_negative": int((~predicted & truth).sum()),
            "seed": config.seed,
            "device": describe_device(model.device),  # scores near c* can move with the device's arithmetic
        },
    )


def choose_guidance(calibrations: Sequence[Calibration]) -> Calibration:
    """The paper's rule: the largest guidance weight whose accuracy is within 99 % of the best."""
    if not calibrations:
        raise ValueError("no calibrations to choose from")
    best = max(c.validation["accuracy"] for c in calibrations)
    eligible = [c for c in calibrations if c.validation["accuracy"] >= GUIDANCE_TOLERANCE * best]
    return max(eligible, key=lambda c: c.guidance)
