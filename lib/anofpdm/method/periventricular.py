"""Periventricular findings: thin lesions that line the lateral ventricles (docs/evaluation.md, "Periventricular
findings").

Caps at the horns' tips, a pencil-thin lining and a smooth halo around the lateral ventricles are FLAIR-bright and
T2-bright like oedema, and common at the age of glioma patients (Fazekas grades 1-2); the network repairs them as it
repairs a tumour, so the anomaly map alone cannot tell them apart. Their place and shape can: radiology calls a
white-matter lesion periventricular when it lies within 10 mm of the ventricles' wall (the distance rule of
Griffanti et al., NeuroImage 2018), and a cap or halo is a sheet a few millimetres
thick, where a glioma with its oedema is a mass. A lesion of the mask that lies almost whole within that distance of
the ventricles and is nowhere thicker than ``PeriventricularRule.max_thickness_mm`` is reported as a periventricular
finding and left out of the tumour mask.

The ventricles are found on the FLAIR alone: the cerebrospinal fluid is its darkest tissue (FLAIR is
fluid-suppressed), and the ventricles are the large pieces of it deep inside the brain, away from the sulci.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from anofpdm.method.postprocess import MM3_PER_ML, lesion_components, widened_box

__all__ = ["PERIVENTRICULAR_FINDINGS", "PeriventricularRule", "find_ventricles", "lesion_figures",
           "periventricular_lesions"]

# what becomes of the periventricular findings, the default first: left out of the tumour mask (and listed in the
# report) or kept in it as the map found them
PERIVENTRICULAR_FINDINGS = ("leave-out", "keep")
FLUID_FLAIR_RATIO = 0.6  # fluid: FLAIR below this fraction of the brain's median (suppressed CSF: about 0.2-0.4)
VENTRICLE_DEPTH_MM = 10.0  # fluid this far inside the brain's outline: the ventricles, not the sulci
VENTRICLE_MIN_ML = 2.0  # a piece of deep fluid at least this large (lacunes, 3-15 mm, are smaller)
ENCLOSED_SHARE = 0.9  # a piece of fluid this much inside a lesion is the lesion's own (a cyst, a necrotic core)
SEARCH_VOXEL_MM = 2.0  # the ventricles and the distance to them are found on a grid of about this voxel size


@dataclass(frozen=True)
class PeriventricularRule:
    """Which lesions count as periventricular findings.

    Args:
        reach_mm: a voxel within this distance of the ventricles' fluid is periventricular.
        share: a lesion is a finding when at least this share of its voxels is periventricular...
        max_thickness_mm: ...and it is nowhere thicker than this (twice the largest distance from a lesion voxel to
            the lesion's outside)...
        tumour_margin_mm: ...and no lesion that stays in the tumour mask lies within this distance of it: beside a
            tumour, signal along the ventricle wall may be the tumour's own spread (subependymal), or a piece of it.
    """

    reach_mm: float = 10.0
    share: float = 0.8
    max_thickness_mm: float = 10.0
    tumour_margin_mm: float = 10.0

    def __post_init__(self) -> None:
        if not self.reach_mm > 0 or not self.max_thickness_mm > 0:
            raise ValueError(f"reach_mm and max_thickness_mm must be > 0, got {self.reach_mm} and "
                             f"{self.max_thickness_mm}")
        if not self.tumour_margin_mm >= 0:
            raise ValueError(f"tumour_margin_mm must be >= 0, got {self.tumour_margin_mm}")
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"share must lie in (0, 1], got {self.share}")


def _search_strides(spacing_mm: Sequence[float]) -> tuple[int, ...]:
    """Per axis, the voxel step that brings the grid nearest to ``SEARCH_VOXEL_MM`` (at least 1)."""
    return tuple(max(1, int(round(SEARCH_VOXEL_MM / s))) for s in spacing_mm)


def find_ventricles(flair: np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float]) -> tuple[np.ndarray, float]:
    """The pieces of ventricular fluid, labelled 1..n on a grid coarsened to about ``SEARCH_VOXEL_MM``
    (``flair[::s0, ::s1, ::s2]`` for the strides of ``_search_strides``), and the FLAIR level below which a voxel is
    fluid: brain voxels darker than ``FLUID_FLAIR_RATIO`` of the brain's median FLAIR, at least
    ``VENTRICLE_DEPTH_MM`` inside the brain's outline, in 26-connected pieces of ``VENTRICLE_MIN_ML`` or more.

    Args:
        flair: the FLAIR (any linear scale).
        brain: brain voxels on the same grid.
        spacing_mm: voxel size along each axis.
    """
    if flair.shape != brain.shape or flair.ndim != 3:
        raise ValueError(f"FLAIR {flair.shape} and brain {brain.shape} must be one 3-D grid")
    strides = _search_strides(spacing_mm)
    coarse = tuple(slice(None, None, s) for s in strides)
    brain_coarse, flair_coarse = brain[coarse].astype(bool), flair[coarse]
    if not brain_coarse.any():
        return np.zeros(brain_coarse.shape, dtype=np.int32), 0.0
    spacing = np.asarray(spacing_mm, dtype=np.float64) * strides
    level = FLUID_FLAIR_RATIO * float(np.median(flair_coarse[brain_coarse]))
    depth = ndimage.distance_transform_edt(np.pad(brain_coarse, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    labels, count = lesion_components(brain_coarse & (flair_coarse < level) & (depth >= VENTRICLE_DEPTH_MM))
    volumes_ml = np.bincount(labels.ravel(), minlength=count + 1)[1:] * float(np.prod(spacing)) / MM3_PER_ML
    kept = np.flatnonzero(volumes_ml >= VENTRICLE_MIN_ML) + 1
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[kept] = np.arange(1, len(kept) + 1)
    return relabel[labels], level


def lesion_figures(
    labels: np.ndarray, flair: np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float], reach_mm: float
) -> list[tuple[float, float]]:
    """Per lesion (1..n of ``labels``), the share of its voxels within ``reach_mm`` of the ventricles (0 where none
    is found) and its thickness in mm: twice the largest distance from one of its voxels to its outside, the
    ventricular fluid it holds (a halo's filled hole) left out. A piece of fluid that lies almost whole
    (``ENCLOSED_SHARE``) inside the lesion is its own (a cyst or necrotic core), not a ventricle.

    Args:
        labels: lesions labelled 1..n (``anofpdm.method.postprocess.lesion_components``).
        flair: the FLAIR on the same grid.
        brain: brain voxels on the same grid.
        spacing_mm: voxel size along each axis.
        reach_mm: the distance from the ventricles within which a voxel is periventricular.
    """
    if not labels.shape == flair.shape == brain.shape:
        raise ValueError(f"lesions {labels.shape}, FLAIR {flair.shape} and brain {brain.shape} differ in shape")
    regions = ndimage.find_objects(labels)
    if not regions:
        return []
    ventricles, fluid_level = find_ventricles(flair, brain, spacing_mm)
    strides = _search_strides(spacing_mm)
    coarse_spacing = np.asarray(spacing_mm, dtype=np.float64) * strides
    pieces = np.bincount(ventricles.ravel())
    every_distance = ndimage.distance_transform_edt(ventricles == 0, sampling=coarse_spacing)
    figures = []
    for index, region in enumerate(regions, start=1):
        inside = labels[region] == index
        coarse = tuple((v + r.start) // s for v, r, s in zip(np.nonzero(inside), region, strides))
        held = np.zeros(ventricles.shape, dtype=bool)
        held[coarse] = True
        enclosed = np.flatnonzero(np.bincount(ventricles[held], minlength=len(pieces)) >= ENCLOSED_SHARE * pieces)
        around, distance = ventricles > 0, every_distance
        if enclosed[enclosed > 0].size:  # the lesion's own fluid: the distance to the other pieces only
            around &= ~np.isin(ventricles, enclosed)
            distance = ndimage.distance_transform_edt(~around, sampling=coarse_spacing)
        share = float(np.mean(distance[coarse] <= reach_mm)) if around.any() else 0.0
        tissue = inside.copy()
        tissue[inside] = ~(around[coarse] & (flair[region][inside] < fluid_level))
        thickness = 2.0 * float(ndimage.distance_transform_edt(np.pad(tissue, 1), sampling=spacing_mm).max())
        figures.append((share, thickness))
    return figures


def periventricular_lesions(
    mask: np.ndarray, flair: np.ndarray, brain: np.ndarray, spacing_mm: Sequence[float], rule: PeriventricularRule
) -> np.ndarray:
    """The lesions of ``mask`` that are periventricular findings under ``rule`` (a boolean mask of them): at least
    ``rule.share`` within ``rule.reach_mm`` of the ventricles, at most ``rule.max_thickness_mm`` thick
    (``lesion_figures``), and farther than ``rule.tumour_margin_mm`` from every lesion that is not one.

    Args:
        mask: binary mask whose 26-connected components are the lesions.
        flair: the FLAIR on the same grid.
        brain: brain voxels on the same grid.
        spacing_mm: voxel size along each axis.
        rule: the distance, share, thickness and margin that make a finding.
    """
    if not mask.shape == flair.shape == brain.shape:
        raise ValueError(f"mask {mask.shape}, FLAIR {flair.shape} and brain {brain.shape} differ in shape")
    labels, _ = lesion_components(mask.astype(bool))
    figures = lesion_figures(labels, flair, brain, spacing_mm, rule.reach_mm)
    candidate = np.asarray([False] + [share >= rule.share and thickness <= rule.max_thickness_mm
                                      for share, thickness in figures])
    findings = candidate[labels]
    others = (labels > 0) & ~findings
    if not others.any():
        return findings
    margin = [int(np.ceil(rule.tumour_margin_mm / s)) + 1 for s in spacing_mm]
    regions = ndimage.find_objects(labels)
    for index in np.flatnonzero(candidate):
        box = widened_box(regions[index - 1], margin, labels.shape)
        if not others[box].any():
            continue
        lesion = labels[box] == index
        distance = ndimage.distance_transform_edt(~others[box], sampling=spacing_mm)
        if distance[lesion].min() <= rule.tumour_margin_mm:  # beside a tumour: perhaps its spread, or a piece of it
            findings[box][lesion] = False
    return findings
