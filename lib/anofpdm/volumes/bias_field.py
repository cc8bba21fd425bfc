"""Intensity non-uniformity correction: each brain volume divided by its N4 bias field (Tustison et al., 2010).

A scanner's receive coils leave a smooth multiplicative field over every image, brighter near some coils. The
training slices were drawn with mild fields (and augmented with more); on volumes whose field is stronger, the
FLAIR brightened by it at the brain's edge looks like a lesion to the per-volume rule and to the lesion edges,
which both read the FLAIR. N4, by SimpleITK, fits the field as a B-spline within the brain on a coarse copy of the
volume (the field is smooth), and each sequence is divided by it on its own grid. The field is scaled to a median
of 1 in the brain, so intensities keep their level.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from anofpdm.volumes.checks import check_inputs
from anofpdm.volumes.slicing import brain_voxels, image_like

__all__ = ["BIAS_CORRECTIONS", "BiasCorrection", "bias_field", "correct_bias_fields"]

BIAS_CORRECTIONS = ("none", "n4")  # the default first (docs/evaluation.md, "Bias-field correction")
WORKING_SPACING_MM = 4.0  # the field is fitted on the volume subsampled to about this voxel size
FITTING_ITERATIONS = (50, 50, 30)  # N4's iterations per fitting level (its B-spline grid refined at each)


@dataclass
class BiasCorrection:
    """What the correction did (the report's ``bias_correction`` entry).

    Attributes:
        method: "n4" or "none".
        field_range: per sequence, the field's 1st and 99th percentile in the brain (1: no correction).
        time_s: time taken.
    """

    method: str
    field_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    time_s: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "time_s": round(self.time_s, 3),
                "field_range": {name: [round(v, 3) for v in low_high] for name, low_high in self.field_range.items()}}


def bias_field(data: np.ndarray, spacing_mm: Sequence[float], brain: np.ndarray) -> np.ndarray:
    """The N4 bias field of ``data`` (x, y, z array) fitted on the ``brain`` voxels, scaled to a median of 1 there.

    Args:
        data: the volume, nonnegative.
        spacing_mm: its voxel size per axis.
        brain: boolean, same shape: the voxels the field is fitted on (at least one).
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing_mm])
    mask = sitk.GetImageFromArray(np.ascontiguousarray(brain.transpose(2, 1, 0), dtype=np.uint8))
    mask.CopyInformation(image)
    factors = [max(1, int(round(WORKING_SPACING_MM / s))) for s in spacing_mm]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(FITTING_ITERATIONS))
    n4.Execute(sitk.Shrink(image, factors), sitk.Shrink(mask, factors))
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).transpose(2, 1, 0)
    return np.exp(log_field - np.median(log_field[brain])).astype(np.float32)


def correct_bias_fields(
    images: Mapping[str, nib.spatialimages.SpatialImage], sequences: Sequence[str], method: str
) -> tuple[dict[str, nib.spatialimages.SpatialImage], BiasCorrection]:
    """``sequences`` of skull-stripped ``images`` (one grid) each divided by its own bias field.

    Args:
        images: sequence name -> image, brain voxels above zero and the rest zero.
        sequences: the names to correct, the first the reference grid; the others are returned as they are.
        method: "n4" or "none" (``images`` returned unchanged).

    Raises:
        InputError: the inputs fail ``anofpdm.volumes.checks.check_inputs`` (checked before any fitting).
    """
    if method not in BIAS_CORRECTIONS:
        raise ValueError(f"bias correction must be one of {BIAS_CORRECTIONS}, got {method!r}")
    if method == "none":
        return dict(images), BiasCorrection(method)
    start = time.perf_counter()
    volumes = check_inputs(images, sequences)
    brain = brain_voxels(volumes.values())
    corrected, ranges = dict(images), {}
    for name, data in volumes.items():
        image = images[name]
        fitted = bias_field(data, nib.affines.voxel_sizes(image.affine), brain & (data > 0))
        ranges[name] = tuple(float(q) for q in np.quantile(fitted[brain], (0.01, 0.99)))
        corrected[name] = image_like(image, np.where(data > 0, data / fitted, 0.0), np.float32)
    return corrected, BiasCorrection(method, ranges, time.perf_counter() - start)
