"""Sequences onto the FLAIR grid: resampled by patient (world) coordinates, rigidly registered when they do not
line up.

A T2 from another series of the examination shares the scanner's patient space with the FLAIR but not its
grid (other spacing, slice positions, orientation, field of view), and the head may move between the two.
``align_sequences`` resamples every sequence onto the reference (FLAIR) grid by world coordinates with
SimpleITK, measures how well the brain regions overlap (Dice of the nonzero voxels), and under the
``registration`` option registers the sequence rigidly to the FLAIR (Mattes mutual information, multi-
resolution, Euler transform initialised on the brain centroids):

- ``auto`` (default): when the overlap is below ``AUTO_REGISTRATION_OVERLAP``;
- ``always``: every time (also for a pair on one grid);
- ``never``: never; the sequence is used resampled (or as is).

A registration that lowers the overlap (by more than ``OVERLAP_LOSS_TOLERANCE``) is discarded: the sequence is
then used resampled, with a warning.
A pair whose overlap stays below ``MIN_BRAIN_OVERLAP``, or that only a correction beyond head motion
(``MAX_ROTATION_DEG``, ``MAX_TRANSLATION_MM``) would line up, is refused with the figures. The FLAIR grid is the
output grid, unchanged; a sequence on exactly that grid is not resampled unless it is registered.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from anofpdm.volumes.reading import LPS_TO_RAS
from anofpdm.volumes.overlap import dice
from anofpdm.volumes.checks import MIN_BRAIN_OVERLAP, InputError, check_sequence, same_grid

__all__ = [
    "REGISTRATION_MODES",
    "AUTO_REGISTRATION_OVERLAP",
    "Alignment",
    "RegistrationSettings",
    "align_sequences",
    "align_to_reference",
    "nifti_to_itk",
    "register_rigid",
    "rigid_matrix",
    "rigid_motion",
]

REGISTRATION_MODES = ("auto", "always", "never")
# brain-mask Dice below which ``auto`` registers (docs/t2-alignment.md has the measurements): one brain mask on
# one grid gives 1.0, a T2 moved by 0.5 mm and 0.5 degrees 0.98 already, and an aligned T2 resampled from another
# grid 0.98-0.99, which the overlap cannot tell from a moved one: such a T2 is registered (the error is ~0.2 mm)
AUTO_REGISTRATION_OVERLAP = 0.99
# a registration is discarded when it lowers the overlap by more than this (a right one may lower it a little: the
# overlap measures the masks' edges, which resampling blurs, not the alignment itself)
OVERLAP_LOSS_TOLERANCE = 0.01
# a correction beyond what head motion between two series of one examination usually is (a few mm or degrees)
LARGE_ROTATION_DEG = 5.0
LARGE_TRANSLATION_MM = 5.0
# beyond this, a correction is no head motion: wrong headers, or volumes of two examinations (refused)
MAX_ROTATION_DEG = 15.0
MAX_TRANSLATION_MM = 20.0
USED_AS_IS, RESAMPLED, REGISTERED = "used as is", "resampled", "registered"


@dataclass(frozen=True)
class RegistrationSettings:
    """How the rigid registration runs (fast: coarse levels only, a sample of the voxels, bounded iterations).

    Args:
        working_spacing_mm: both images are first reduced by whole-voxel block averaging (``BinShrink``) to
            about this voxel size, so that the pyramid and the metric's set-up handle few voxels.
        shrink_factors: per-level downsampling of the reduced images, coarse to fine.
        smoothing_sigmas_mm: per-level Gaussian smoothing (physical units).
        samples: how many of the FLAIR's voxels the metric samples at random per level (all on small levels):
            a number, not a fraction, so that a small volume is not registered on a handful of voxels.
        histogram_bins: Mattes mutual-information joint histogram bins.
        iterations: optimiser iterations per level, at most.
        seed: the metric sampling seed (one seed, one result).
    """

    working_spacing_mm: float = 2.0
    shrink_factors: tuple[int, ...] = (2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0)
    samples: int = 30_000
    histogram_bins: int = 32
    iterations: int = 100
    seed: int = 1

    def __post_init__(self) -> None:
        if not self.shrink_factors or len(self.shrink_factors) != len(self.smoothing_sigmas_mm):
            raise ValueError(f"one smoothing sigma per shrink factor: got {self.shrink_factors} and "
                             f"{self.smoothing_sigmas_mm}")
        if any(f < 1 for f in self.shrink_factors) or any(s < 0 for s in self.smoothing_sigmas_mm):
            raise ValueError("shrink factors must be >= 1 and smoothing sigmas >= 0")
        if self.working_spacing_mm <= 0:
            raise ValueError(f"working_spacing_mm must be > 0, got {self.working_spacing_mm}")
        if self.samples < 1000:
            raise ValueError(f"samples must be >= 1000, got {self.samples}")
        if self.histogram_bins < 4 or self.iterations < 1:
            raise ValueError(f"need histogram_bins >= 4 and iterations >= 1, got {self.histogram_bins}, "
                             f"{self.iterations}")


@dataclass
class Alignment:
    """What was done to one sequence to put it on the reference grid (the report's ``alignment`` entry).

    Attributes:
        action: "used as is" (on the reference grid, not registered), "resampled" (by world coordinates) or
            "registered" (rigidly, then resampled).
        registration: the option it ran under ("auto", "always", "never").
        source_shape, source_spacing_mm: the sequence's own grid.
        overlap_before: brain-mask Dice with the reference after resampling by world coordinates alone.
        overlap_after: the same after registration (equal to ``overlap_before`` when not registered).
        rotation_deg, translation_mm: the rigid correction applied (0 when not registered): rotation angle,
            and the shift of the reference brain's centre.
        translation_ras_mm: that shift as a vector (RAS axes).
        transform_ras: the 4 x 4 matrix mapping reference (FLAIR) world points (RAS mm) to the points of the
            sequence's own volume that were sampled there (identity when not registered).
        time_s: time taken (resampling, measuring, registering).
        warnings: a large correction, or a registration discarded.
    """

    action: str
    registration: str
    source_shape: tuple[int, int, int]
    source_spacing_mm: tuple[float, float, float]
    overlap_before: float
    overlap_after: float
    rotation_deg: float = 0.0
    translation_mm: float = 0.0
    translation_ras_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    transform_ras: list[list[float]] = field(default_factory=lambda: np.eye(4).tolist())
    time_s: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, rounded."""
        out = asdict(self)
        for key in ("overlap_before", "overlap_after"):
            out[key] = round(out[key], 4)
        for key in ("rotation_deg", "translation_mm", "time_s"):
            out[key] = round(out[key], 3)
        out["translation_ras_mm"] = [round(v, 3) for v in self.translation_ras_mm]
        out["source_spacing_mm"] = [round(v, 4) for v in self.source_spacing_mm]
        out["source_shape"] = list(self.source_shape)
        out["transform_ras"] = [[round(v, 6) for v in row] for row in self.transform_ras]
        return out


def nifti_to_itk(data: np.ndarray, affine: np.ndarray, what: str) -> sitk.Image:
    """A 3-D array (x, y, z) on a NIfTI (RAS) affine as an ITK image (LPS physical space).

    Raises:
        InputError: the affine is sheared or singular (ITK grids are rotations times spacings).
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)  # the flip is its own inverse
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    if not np.all(spacing > 0):
        raise InputError(f"{what} has a singular affine (voxel sizes {spacing.round(4).tolist()})")
    direction = lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(f"{what} has a sheared affine: its voxel axes are not perpendicular")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def _to_array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _resample(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform, nearest: bool) -> np.ndarray:
    """``moving`` on the reference grid (x, y, z array); outside ``moving``'s field of view is 0."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return _to_array(sitk.Resample(moving, reference, transform, interpolator, 0.0, moving.GetPixelID()))


def _mask_on_reference(moving: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """The sequence's brain mask (nonzero voxels) on the reference grid, nearest-neighbour resampled: its edge
    does not grow by the reach of a linear interpolation."""
    return _resample(sitk.Cast(moving > 0, sitk.sitkUInt8), reference, transform, True) > 0


def _reduce(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``image`` block-averaged by whole voxels to about ``spacing_mm`` per axis (not below its own spacing)."""
    factors = [max(1, int(round(spacing_mm / s))) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def register_rigid(fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings) -> sitk.Euler3DTransform:
    """The rigid transform mapping ``fixed`` (FLAIR) points to ``moving`` (T2) points that maximises their
    Mattes mutual information, initialised by the brain (nonzero) centroids."""
    fixed, moving = (_reduce(image, settings.working_spacing_mm) for image in (fixed, moving))
    initial = sitk.CenteredTransformInitializer(
        sitk.Cast(fixed > 0, sitk.sitkFloat32), sitk.Cast(moving > 0, sitk.sitkFloat32), sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    voxels = np.prod(fixed.GetSize())
    method.SetMetricSamplingPercentagePerLevel(
        [min(1.0, settings.samples * factor**3 / voxels) for factor in settings.shrink_factors], settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=settings.iterations, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving)
    return initial


def rigid_matrix(transform: sitk.Euler3DTransform) -> np.ndarray:
    """A rigid ITK transform as a 4 x 4 matrix in RAS world coordinates."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(transform.GetMatrix(), (3, 3))
    centre = np.asarray(transform.GetCenter())
    matrix[:3, 3] = np.asarray(transform.TransformPoint(centre.tolist())) - matrix[:3, :3] @ centre
    return LPS_TO_RAS @ matrix @ LPS_TO_RAS


def rigid_motion(matrix: np.ndarray, centre: np.ndarray) -> tuple[float, np.ndarray]:
    """Rotation angle (degrees) of a 4 x 4 rigid matrix and the shift it gives the point ``centre``."""
    angle = np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1.0) / 2.0, -1.0, 1.0)))
    return float(angle), matrix[:3, :3] @ centre + matrix[:3, 3] - centre


def _register_onto(
    fixed: sitk.Image,
    moving: sitk.Image,
    reference_mask: np.ndarray,
    record: Alignment,
    names: tuple[str, str],
    settings: RegistrationSettings,
) -> sitk.Transform | None:
    """Register ``moving`` to ``fixed``, filling in ``record``; None (with a warning in ``record``) when the
    registration fails or lowers the brain overlap.

    Raises:
        InputError: lining the two up takes more than head motion between series.
    """
    name, reference_name = names
    overlap = record.overlap_before
    try:
        transform = register_rigid(fixed, moving, settings)
    except RuntimeError as exc:  # ITK refuses e.g. a constant image (no intensity range for the histogram)
        reason = str(exc).strip().splitlines()[-1]
        record.warnings.append(f"rigid registration of {name} to {reference_name} failed ({reason}): {name} is "
                               f"used {record.action}, as it came")
        return None
    matrix = rigid_matrix(transform)
    angle, shift = rigid_motion(matrix, LPS_TO_RAS[:3, :3] @ np.asarray(transform.GetCenter()))
    distance = float(np.linalg.norm(shift))
    if angle > MAX_ROTATION_DEG or distance > MAX_TRANSLATION_MM:
        raise InputError(
            f"{name} and {reference_name} are not two series of one examination as their headers place them: "
            f"their brain regions overlap with Dice {overlap:.2f} and lining them up takes {angle:.1f} degrees and "
            f"{distance:.1f} mm, more than a head moves between series (at most {MAX_ROTATION_DEG:.0f} degrees, "
            f"{MAX_TRANSLATION_MM:.0f} mm): check that both are of one patient and their headers are right"
        )
    overlap_after = dice(_mask_on_reference(moving, fixed, transform), reference_mask)
    if overlap_after < overlap - OVERLAP_LOSS_TOLERANCE:
        record.warnings.append(
            f"registering {name} to {reference_name} lowered their brain overlap ({overlap:.3f} -> "
            f"{overlap_after:.3f}): the registration failed and {name} is used {record.action}, as it came"
        )
        return None
    record.action, record.overlap_after, record.rotation_deg, record.translation_mm = (
        REGISTERED, overlap_after, angle, distance)
    record.translation_ras_mm, record.transform_ras = tuple(float(v) for v in shift), matrix.tolist()
    if angle > LARGE_ROTATION_DEG or distance > LARGE_TRANSLATION_MM:
        record.warnings.append(
            f"{name} was registered to {reference_name} by a large correction ({angle:.1f} degrees, {distance:.1f} "
            f"mm; brain overlap {overlap:.3f} -> {overlap_after:.3f}): check that {name} lines up with "
            f"{reference_name} on the result"
        )
    return transform


def align_to_reference(
    image: nib.spatialimages.SpatialImage,
    reference: nib.spatialimages.SpatialImage,
    registration: str = "auto",
    name: str = "t2",
    reference_name: str = "flair",
    settings: RegistrationSettings | None = None,
) -> tuple[nib.Nifti1Image | nib.spatialimages.SpatialImage, Alignment]:
    """``image`` on the grid of ``reference``, resampled by world coordinates and registered as ``registration``
    says (see the module docstring); the input image itself when it is used as is.

    Raises:
        InputError: either volume is not a valid brain volume, ``registration`` is unknown, the brain regions
            overlap less than ``MIN_BRAIN_OVERLAP`` (Dice) even after registration, or registration would move
            the sequence further than a head moves.
    """
    if registration not in REGISTRATION_MODES:
        raise InputError(f"registration must be one of {REGISTRATION_MODES}, got {registration!r}")
    settings = settings or RegistrationSettings()
    start = time.perf_counter()
    reference_data, data = check_sequence(reference_name, reference), check_sequence(name, image)
    reference_mask = reference_data > 0
    fixed = nifti_to_itk(reference_data, reference.affine, reference_name)
    moving = nifti_to_itk(data, image.affine, name)
    on_grid = same_grid(image, reference)
    transform: sitk.Transform = sitk.Euler3DTransform()  # identity
    overlap = dice(data > 0 if on_grid else _mask_on_reference(moving, fixed, transform), reference_mask)
    record = Alignment(USED_AS_IS if on_grid else RESAMPLED, registration, tuple(int(n) for n in data.shape),
                       tuple(float(s) for s in moving.GetSpacing()), overlap, overlap)
    identical = on_grid and np.array_equal(data, reference_data)  # one file given twice: check_inputs says so
    if not identical and (registration == "always" or (registration == "auto" and overlap < AUTO_REGISTRATION_OVERLAP)):
        registered = _register_onto(fixed, moving, reference_mask, record, (name, reference_name), settings)
        transform = transform if registered is None else registered
    if record.overlap_after < MIN_BRAIN_OVERLAP:
        hint = ("registration is off (registration=never): try auto" if registration == "never" else
                "are they two series of one examination, of one patient?")
        raise InputError(
            f"the brain regions (nonzero voxels) of {name} and {reference_name} do not overlap: Dice "
            f"{record.overlap_before:.2f} on the {reference_name} grid"
            + ("" if record.action != REGISTERED else f", {record.overlap_after:.2f} after rigid registration")
            + f" (at least {MIN_BRAIN_OVERLAP} needed): {hint}"
        )
    if record.action == USED_AS_IS:
        record.time_s = time.perf_counter() - start
        return image, record
    # linear intensities inside the nearest-neighbour mask: background exactly 0, as skull-stripped volumes have it
    aligned = _resample(moving, fixed, transform, False) * _mask_on_reference(moving, fixed, transform)
    record.time_s = time.perf_counter() - start
    return nib.Nifti1Image(aligned.astype(np.float32), reference.affine), record


def align_sequences(
    images: Mapping[str, nib.spatialimages.SpatialImage],
    sequences: Sequence[str],
    registration: str = "auto",
    settings: RegistrationSettings | None = None,
) -> tuple[dict[str, nib.spatialimages.SpatialImage], dict[str, Alignment]]:
    """Every sequence of ``sequences`` after the first (the reference) on the reference's grid.

    Sequences missing from ``images`` are left for ``anofpdm.volumes.checks.check_inputs`` to name.

    Returns:
        the images (the reference and sequences used as is unchanged) and an ``Alignment`` per other sequence.
    """
    reference = sequences[0]
    aligned, records = dict(images), {}
    if reference not in images:
        return aligned, records
    for name in sequences[1:]:
        if name in images:
            aligned[name], records[name] = align_to_reference(images[name], images[reference], registration, name,
                                                              reference, settings)
    return aligned, records
