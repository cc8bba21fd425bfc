"""3-D post-processing of a restacked volume and the lesion table (docs/method.md section 5), and the 2-D
median of the slice-level evaluation protocol.

The whole tumour as BraTS defines it holds the necrotic core, which is dark on FLAIR and often not anomalous to a
FLAIR-driven map: a mask that rings it is filled (``fill_lesion_holes``). A mask decided on the network's coarse grid
gets each lesion's edge redrawn on the input grid where its FLAIR crosses half the contrast to the brain around it
(``refine_lesion_boundaries``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["TUMOUR", "UNCERTAIN_TUMOUR", "BRAIN_LABEL", "FINDINGS_LABEL", "LABEL_NAMES", "SHOWN_NAMES", "LESION_HOLES",
           "median_filter_2d", "median_filter_3d", "lesion_components", "fill_lesion_holes", "LESION_BOUNDARIES",
           "EDGE_CONTRAST", "LESION_LEVEL_QUANTILE", "refine_lesion_boundaries", "widened_box",
           "remove_small_components", "mark_uncertain_lesions", "lesion_table"]

MM3_PER_ML = 1000.0
TUMOUR, UNCERTAIN_TUMOUR = 1, 2  # values of the returned label map
BRAIN_LABEL = 3  # the app's label map may also show the extracted brain (its other voxels), on request
FINDINGS_LABEL = 4  # ... and the periventricular findings left out of the tumour mask (anofpdm.method.periventricular)
LABEL_NAMES = {"tumour": TUMOUR, "tumour (uncertain)": UNCERTAIN_TUMOUR}
SHOWN_NAMES = {"brain": BRAIN_LABEL, "periventricular finding (not tumour)": FINDINGS_LABEL}  # what else it may show
# what becomes of the holes a lesion encloses, the default first: "axial" fills those closed in 3-D and those closed
# within an axial slice (open above or below), "3d" the first only, "keep" none (docs/evaluation.md, "The whole
# tumour as BraTS defines it": on the validation cases "axial" never did worse than the others)
LESION_HOLES = ("axial", "3d", "keep")
# where a lesion's edge is drawn, the default first: "half-contrast" redraws it on the input grid
# (``refine_lesion_boundaries``), "model-grid" keeps the network grid's mask resampled (docs/evaluation.md, "Lesion
# edges at the input's resolution")
LESION_BOUNDARIES = ("half-contrast", "model-grid")
EDGE_CONTRAST = 0.5  # the edge lies where the FLAIR is halfway from the surroundings' level to the lesion's
LESION_LEVEL_QUANTILE = 0.75  # a lesion's FLAIR level: this quantile over its voxels (a dark necrotic core aside)
SURROUNDINGS_MM = 5.0  # the surroundings' level: median FLAIR of the brain this far beyond the searched region


def median_filter_2d(maps: np.ndarray, kernel_size: int) -> np.ndarray:
    """k x k median filter of each of N x H x W maps, in-plane only (borders mirrored: c b | a b c | b a)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"median kernel size must be odd and positive, got {kernel_size}")
    if maps.ndim != 3:
        raise ValueError(f"expected N x H x W maps, got shape {maps.shape}")
    return ndimage.median_filter(maps, size=(1, kernel_size, kernel_size), mode="mirror")


def median_filter_3d(volume: np.ndarray, kernel_size: int) -> np.ndarray:
    """Median filter with a cubic ``kernel_size`` window (edges replicated)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"median kernel size must be odd and positive, got {kernel_size}")
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    return ndimage.median_filter(volume, size=kernel_size, mode="nearest")


def lesion_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a binary mask, labelled 1..n, and n (the 3-D analogue of the authors'
    8-connected 2-D filter; evaluation counts lesions the same way)."""
    return ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))


def fill_lesion_holes(mask: np.ndarray, holes: str) -> np.ndarray:
    """The mask with the holes its lesions enclose filled, as ``holes`` (``LESION_HOLES``) says.

    A hole is background that cannot reach the volume's border through face neighbours (the complement of
    26-connected lesions); "axial" fills, besides, what each plane along the last axis encloses in-plane.
    """
    if holes not in LESION_HOLES:
        raise ValueError(f"holes must be one of {LESION_HOLES}, got {holes!r}")
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {mask.shape}")
    mask = mask.astype(bool)
    if holes == "keep":
        return mask
    filled = ndimage.binary_fill_holes(mask)
    if holes == "axial":
        for k in range(filled.shape[2]):
            filled[:, :, k] = ndimage.binary_fill_holes(filled[:, :, k])
    return filled


def _ellipsoid(radius_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """A structuring element: the voxels within ``radius_mm`` of the centre on a grid of ``spacing_mm``."""
    radii = radius_mm / np.asarray(spacing_mm, dtype=np.float64)
    grid = np.mgrid[tuple(slice(-int(r), int(r) + 1) for r in np.floor(radii))]
    return sum((axis / r) ** 2 for axis, r in zip(grid, radii)) <= 1.0


def refine_lesion_boundaries(
    mask: np.ndarray,
    flair: np.ndarray,
    brain: np.ndarray,
    spacing_mm: Sequence[float],
    reach_mm: float,
    contrast: float = EDGE_CONTRAST,
    lesion_quantile: float = LESION_LEVEL_QUANTILE,
) -> np.ndarray:
    """Each lesion's edge redrawn at the grid's own resolution, where its FLAIR is halfway to its surroundings'.

    The decisions are made on the network's grid (3.75 mm pixels at 64 px), so a mask resampled from it is blocky
    and runs up to a pixel past or short of the lesion. For each lesion, the brain voxels within ``reach_mm`` of it
    are searched; its FLAIR level is the ``lesion_quantile`` of its own voxels, its surroundings' the median of the
    brain within ``SURROUNDINGS_MM`` beyond the searched region; the lesion becomes the searched voxels at least
    ``contrast`` of the way from the one to the other (by default half: the half-maximum edge), 3 x 3 x 3
    median-filtered, together with its inside deeper than ``reach_mm`` (a FLAIR-dark necrotic core stays, whether
    or not the bright tissue rings it). A lesion no brighter than its surroundings has no such edge and is kept as
    it was.

    Args:
        mask: binary mask on the grid; its 26-connected components are the lesions.
        flair: the FLAIR on the same grid (any linear scale: only differences of levels count).
        brain: brain voxels on the same grid.
        spacing_mm: voxel size along each axis.
        reach_mm: how far beyond its resampled mask a lesion's edge may move (e.g. one network pixel).
        contrast: where between the surroundings' level (0) and the lesion's (1) the edge lies.
        lesion_quantile: the quantile of a lesion's FLAIR taken as its level.

    Returns:
        The redrawn mask (bool); a lesion's edge moves by at most ``reach_mm``; lesions may merge or split.
    """
    if not mask.shape == flair.shape == brain.shape:
        raise ValueError(f"mask {mask.shape}, FLAIR {flair.shape} and brain {brain.shape} differ in shape")
    if len(spacing_mm) != mask.ndim or min(spacing_mm) <= 0:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not fit a {mask.ndim}-D mask")
    if not reach_mm > 0:
        raise ValueError(f"reach_mm must be > 0, got {reach_mm}")
    if not (0.0 < contrast < 1.0 and 0.0 <= lesion_quantile <= 1.0):
        raise ValueError(f"contrast must lie in (0, 1) and lesion_quantile in [0, 1], got {contrast} and "
                         f"{lesion_quantile}")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    searching, surrounding = _ellipsoid(reach_mm, spacing), _ellipsoid(SURROUNDINGS_MM, spacing)
    margin = [int(m) for m in np.ceil((reach_mm + SURROUNDINGS_MM) / spacing) + 2]
    redrawn = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return redrawn
    near = np.zeros(mask.shape, dtype=bool)  # every lesion's searched region, dilated within the lesions' box only
    extent = widened_box(ndimage.find_objects(mask.astype(np.uint8))[0], margin, mask.shape)
    near[extent] = ndimage.binary_dilation(mask[extent], searching)
    # lesions whose searched regions touch are redrawn together, at the levels of their union (and a mask of many
    # specks costs a few groups, not one pass each)
    for region, group in _lesions(near):
        box = widened_box(region, margin, mask.shape)
        searched = np.zeros([s.stop - s.start for s in box], dtype=bool)
        searched[tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, box))] = group
        in_brain, values = brain[box], flair[box]
        lesion = mask[box] & searched
        searched &= in_brain
        around = ndimage.binary_dilation(searched, surrounding) & in_brain & ~searched
        lesion_level = np.quantile(values[lesion], lesion_quantile)
        if not around.any() or not lesion_level > (around_level := np.median(values[around])):
            redrawn[box] |= lesion
            continue
        edge = around_level + contrast * (lesion_level - around_level)
        bright = ndimage.median_filter((searched & (values >= edge)).astype(np.uint8), size=3) > 0
        redrawn[box] |= bright | (ndimage.binary_erosion(lesion, searching) & in_brain)  # its inside, out of reach
    return redrawn


def widened_box(region: tuple[slice, ...], margin: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    """``region`` widened by ``margin`` voxels on each side, within a grid of ``shape``."""
    return tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, m, n in zip(region, margin, shape))


def _lesions(mask: np.ndarray) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Each component of ``mask``: its bounding box and, within it, its voxels.

    Working box by box keeps memory to the lesions' size: whole-volume lookups by label copy the labels as int64
    (the traced peak of a 0.5 mm volume's post-processing was 2.6 GB with them, 1.6 GB without).
    """
    labels, _ = lesion_components(mask.astype(bool, copy=False))  # labelled before the first lesion is yielded
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        yield region, labels[region] == index


def remove_small_components(
    mask: np.ndarray, spacing_mm: Sequence[float], min_size_mm3: float
) -> tuple[np.ndarray, int]:
    """Drop connected components whose volume is at most ``min_size_mm3``.

    Args:
        mask: 3-D binary mask.
        spacing_mm: voxel size along each axis.
        min_size_mm3: components of this volume or less are removed (0 keeps everything).

    Returns:
        The filtered mask (bool) and the number of components removed.
    """
    if min_size_mm3 < 0:
        raise ValueError(f"min_size_mm3 must be >= 0, got {min_size_mm3}")
    if len(spacing_mm) != mask.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not match a {mask.ndim}-D mask")
    voxel_mm3 = float(np.prod(spacing_mm))
    kept, removed = mask.astype(bool), 0
    for region, inside in _lesions(kept):
        if inside.sum() * voxel_mm3 <= min_size_mm3:
            kept[region][inside] = False
            removed += 1
    return kept, removed


def mark_uncertain_lesions(mask: np.ndarray, unhealthy_probability: np.ndarray, confident: float) -> np.ndarray:
    """The label map of ``mask``: ``TUMOUR`` for lesions whose slices reach an unhealthy probability of
    ``confident``, ``UNCERTAIN_TUMOUR`` for the others.

    Args:
        mask: binary mask whose 26-connected components are the lesions.
        unhealthy_probability: per-voxel unhealthy probability of the voxel's slice, on the mask's grid.
        confident: the probability from which a lesion counts as a confident finding.
    """
    if unhealthy_probability.shape != mask.shape:
        raise ValueError(f"mask {mask.shape} and unhealthy probability {unhealthy_probability.shape} differ in shape")
    marked = np.zeros(mask.shape, dtype=np.uint8)
    for region, inside in _lesions(mask):
        confident_lesion = unhealthy_probability[region][inside].max() >= confident
        marked[region][inside] = TUMOUR if confident_lesion else UNCERTAIN_TUMOUR
    return marked


def lesion_table(
    mask: np.ndarray, anomaly_map: np.ndarray, affine: np.ndarray, unhealthy_probability: np.ndarray | None = None
) -> list[dict[str, object]]:
    """One row per connected lesion: label value, volume (mL), centroid (world mm), mean and peak anomaly score.

    Args:
        mask: binary mask or label map whose 26-connected nonzero components are the lesions.
        anomaly_map: anomaly scores on the mask's grid.
        affine: the grid's voxel-to-world affine.
        unhealthy_probability: optional per-voxel unhealthy probability of the voxel's slice; each row then
            also gives the highest over the lesion.

    Rows are sorted by volume, largest first.
    """
    if mask.shape != anomaly_map.shape:
        raise ValueError(f"mask {mask.shape} and anomaly map {anomaly_map.shape} differ in shape")
    if unhealthy_probability is not None and unhealthy_probability.shape != mask.shape:
        raise ValueError(f"mask {mask.shape} and unhealthy probability {unhealthy_probability.shape} differ in shape")
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    for region, inside in _lesions(mask):
        voxels = np.argwhere(inside) + [s.start for s in region]
        centroid = affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3]
        scores = anomaly_map[region][inside]
        rows.append(
            {
                "label": int(mask[region][inside].max()),
                "volume_ml": round(inside.sum() * voxel_mm3 / MM3_PER_ML, 3),
                "centroid_mm": [round(float(c), 1) for c in centroid],
                "mean_anomaly": float(scores.mean()),
                "peak_anomaly": float(scores.max()),
            }
        )
        if unhealthy_probability is not None:
            rows[-1]["unhealthy_probability"] = round(float(unhealthy_probability[region][inside].max()), 4)
    return sorted(rows, key=lambda row: -row["volume_ml"])
