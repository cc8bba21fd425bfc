"""Checks of input volumes with clear errors: dimensionality, finite values, emptiness, one grid, one brain.

Every refusal is an ``InputError`` whose message names the sequence and the figure that failed, so the app
can answer it as a 422 and the command line as one line on stderr.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from anofpdm.volumes.overlap import dice

__all__ = ["InputError", "check_inputs", "check_sequence", "same_grid", "voxel_ml"]

AFFINE_TOLERANCE_MM = 1e-3
# Plausibility of skull-stripped, co-registered inputs as BraTS ships them (the model knows nothing else):
MAX_BRAIN_ML = 3000.0  # intracranial volumes are ~1.1-1.9 L; a head with skull and scalp or a noisy background is more
MAX_NEGATIVE_SHARE = 0.05  # of the nonzero voxels; interpolation ringing stays far below, z-scored volumes far above
MIN_BRAIN_OVERLAP = 0.8  # Dice of two sequences' nonzero regions; one brain mask on all sequences gives 1
# A T1 given as the FLAIR: grey and white matter are told apart by the T2 (white matter darkest, CSF brightest), and
# the FLAIR's grey/white median ratio is ~1.1-1.3 in FLAIR (synthetic shifted-domain volumes down to 0.90 at 3 mm) and
# ~0.7 in T1 (synthetic: 0.70-0.90): at or below this the FLAIR is refused as a T1
T1_LIKE_GREY_WHITE_RATIO = 0.8
T2_TISSUE_QUANTILES = (0.3, 0.45, 0.7)  # brain T2 below the first: white-matter-like; between the others: grey-like
MIN_TISSUE_VOXELS = 500  # fewer voxels in either class: the check is skipped (too little brain to tell)


class InputError(ValueError):
    """The input volumes cannot be segmented; the message names the problem."""


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel of ``affine`` in mL."""
    return abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def as_3d(name: str, image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The image's data as a float32 3-D array (a trailing axis of 1 dropped); refused when not 3-D."""
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{name} has {data.ndim} dimensions {data.shape}; expected a 3-D volume")
    return data.astype(np.float32, copy=False)


def check_inputs(
    images: Mapping[str, nib.spatialimages.SpatialImage], required: Sequence[str]
) -> dict[str, np.ndarray]:
    """Validate co-registered input volumes and return their arrays (float32, input orientation).

    Args:
        images: sequence name -> image.
        required: sequence names the model needs (e.g. ("flair", "t2")); the first is the reference grid.

    Raises:
        InputError: a sequence is missing, not 3-D, off the reference grid, non-finite, empty, negative
            (z-scored), not skull-stripped, not the same brain as the reference, or the reference itself.
    """
    missing = [name for name in required if name not in images]
    if missing:
        raise InputError(f"missing input sequence(s): {', '.join(missing)} (need {', '.join(required)})")
    reference = required[0]
    ref_image = images[reference]
    arrays: dict[str, np.ndarray] = {}
    for name in required:
        arrays[name] = check_sequence(name, images[name])
        if name != reference and not same_grid(images[name], ref_image):
            raise InputError(
                f"{name} grid {arrays[name].shape} does not match {reference} grid {arrays[reference].shape} (or "
                "their affines differ): resample the sequences onto one grid first (anofpdm.volumes.alignment does)"
            )
    for name in required[1:]:
        _check_same_brain(name, arrays[name], reference, arrays[reference])
    if "flair" in arrays and "t2" in arrays:
        _check_flair_contrast(arrays["flair"], arrays["t2"])
    return arrays


def same_grid(image: nib.spatialimages.SpatialImage, reference: nib.spatialimages.SpatialImage) -> bool:
    """Whether ``image`` has the voxel grid of ``reference``: same 3-D shape and affine (within 1 um)."""
    return tuple(image.shape[:3]) == tuple(reference.shape[:3]) and np.allclose(
        image.affine, reference.affine, atol=AFFINE_TOLERANCE_MM)


def check_sequence(name: str, image: nib.spatialimages.SpatialImage) -> np.ndarray:
    """One sequence's array (float32), refused if not 3-D, non-finite, empty or unlike a skull-stripped brain.

    Raises:
        InputError: naming ``name`` and the problem.
    """
    data = as_3d(name, image)
    bad = int(np.size(data) - np.isfinite(data).sum())
    if bad:
        raise InputError(f"{name} contains {bad} NaN/Inf voxels")
    if not (data > 0).any():
        raise InputError(f"{name} is empty: no voxel is above zero")
    _check_brain_like(name, data, image.affine)
    return data


def _check_brain_like(name: str, data: np.ndarray, affine: np.ndarray) -> None:
    """Refuse intensities and extents that no skull-stripped brain volume has (see ``MAX_BRAIN_ML``)."""
    negative, nonzero = int((data < 0).sum()), int((data != 0).sum())
    if negative > MAX_NEGATIVE_SHARE * nonzero:
        raise InputError(
            f"{name} has {negative / nonzero:.0%} negative voxels (minimum {data.min():.4g}): the model expects "
            "intensities as scanners and BraTS store them, non-negative with background 0; z-scored or shifted "
            "volumes cannot be normalised as in training"
        )
    brain_ml = float((data > 0).sum()) * voxel_ml(affine)
    if brain_ml > MAX_BRAIN_ML:
        raise InputError(
            f"{name} has {brain_ml:.0f} mL of nonzero voxels, more than any skull-stripped brain ({MAX_BRAIN_ML:.0f} "
            "mL at most): a head with skull and scalp; let the brain be extracted (brain_extraction auto or always) or "
            "skull-strip the volumes (background exactly 0) yourself"
        )


def _check_same_brain(name: str, data: np.ndarray, reference: str, reference_data: np.ndarray) -> None:
    """Refuse sequences whose brain regions do not coincide (not co-registered, or another patient) and a
    sequence that is the reference volume itself (one file given twice)."""
    if np.array_equal(data, reference_data):
        raise InputError(
            f"{name} and {reference} are the same volume, voxel for voxel: one file was given for both sequences"
        )
    overlap = dice(data > 0, reference_data > 0)
    if overlap < MIN_BRAIN_OVERLAP:
        raise InputError(
            f"the brain regions (nonzero voxels) of {name} and {reference} overlap with Dice {overlap:.2f} only "
            f"(at least {MIN_BRAIN_OVERLAP} expected): co-register the sequences and apply one brain mask to all "
            "(or was a segmentation loaded as an image?)"
        )


def grey_white_ratio(image: np.ndarray, t2: np.ndarray) -> float | None:
    """Median of ``image`` in grey-matter-like over white-matter-like brain voxels, the tissues told apart by the
    T2 (``T2_TISSUE_QUANTILES``); None when the brain is too small or the T2 too flat to tell them apart."""
    brain = (image > 0) & (t2 > 0)
    values, reference = image[brain], t2[brain]
    if values.size < 2 * MIN_TISSUE_VOXELS:
        return None
    low, grey_low, grey_high = np.quantile(reference, T2_TISSUE_QUANTILES)
    white, grey = values[reference <= low], values[(reference > grey_low) & (reference <= grey_high)]
    if min(white.size, grey.size) < MIN_TISSUE_VOXELS or not np.median(white) > 0:
        return None
    return float(np.median(grey) / np.median(white))


def _check_flair_contrast(flair: np.ndarray, t2: np.ndarray) -> None:
    """Refuse a FLAIR whose grey matter is darker than its white matter as in a T1 (``T1_LIKE_GREY_WHITE_RATIO``)."""
    ratio = grey_white_ratio(flair, t2)
    if ratio is not None and ratio <= T1_LIKE_GREY_WHITE_RATIO:
        raise InputError(
            f"flair does not look like a FLAIR: its grey matter is {ratio:.2f} times as bright as its white matter "
            f"(the two told apart by the T2), where a FLAIR shows grey matter brighter (about 1.1-1.3) and a T1 "
            f"darker (about 0.7; refused at {T1_LIKE_GREY_WHITE_RATIO} or below): was a T1 given as the FLAIR?"
        )
