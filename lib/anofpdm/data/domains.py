"""Where synthetic cases are drawn from: anatomy, tumour and acquisition ranges, and the output grid.

``TRAINING`` is the domain the shipped model was trained, calibrated and selected on (small warps of the
MNI152 template, BraTS grid). ``SHIFTED`` is a test domain the project never trains, calibrates or selects
on: it lies outside ``TRAINING`` in every range it sets, the way another person's brain on another scanner
does. Stronger and coarser deformations, larger heads, enlarged or smaller ventricles, cortical atrophy
(widened sulci), other tissue contrasts, stronger bias fields, more blur and noise, another global scanner
gain, smaller tumours, and other grids: a 181 x 217 x 181 1 mm RAS grid, thick axial slices, an oblique
grid and a sagittally stored 3-D acquisition. It is a proxy for an unseen brain, not a replacement: the
anatomy is still the MNI152 template's (no other brain ships in a package that installs here). The head grown
around the brain when heads are on (``HeadShape``) varies more widely there: its ranges enclose the training ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "OutputGrid", "HeadShape", "Domain", "TRAINING", "SHIFTED", "DOMAINS", "grid_affine", "reslice", "reslice_labels",
]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass(frozen=True)
class OutputGrid:
    """A scanner grid a case is resampled onto from the 1 mm BraTS grid it is synthesised on.

    Args:
        name: short name, written to the manifest.
        shape: voxels per axis.
        spacing_mm: voxel size per axis; a slice thicker than 1 mm is simulated with a Gaussian slice
            profile of that full width at half maximum.
        tilt_deg: rotation of the grid about the left-right axis (an oblique acquisition).
        axes: which RAS axis each voxel axis runs along, e.g. (0, 1, 2) axial, (1, 2, 0) sagittal storage.
    """

    name: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    tilt_deg: float = 0.0
    axes: tuple[int, int, int] = (0, 1, 2)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"grid {self.name}: shape must be three positive sizes, got {self.shape}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"grid {self.name}: spacing_mm must be three positive sizes, got {self.spacing_mm}")
        if sorted(self.axes) != [0, 1, 2]:
            raise ValueError(f"grid {self.name}: axes must be a permutation of (0, 1, 2), got {self.axes}")


@dataclass(frozen=True)
class HeadShape:
    """Ranges of the head grown around the brain when heads are on (``(low, high)`` pairs are uniform draws).

    Args:
        subarachnoid_mm: CSF between the brain and the skull.
        skull_mm: skull thickness (inner and outer tables of cortical bone, diploic marrow between them).
        temporalis_mm: largest thickness of the temporal muscles over the sides of the skull.
        fat_mm: subcutaneous fat under the skin.
        skin_mm: skin and galea.
        thickness_variation: relative smooth spatial variation of every layer's thickness.
        face_scale: size of the face (orbits, nose, jaw) and neck relative to the nominal one.
        eye_offset_mm: largest shift of each eye from its nominal place, per axis.
        contrast_jitter: relative per-case jitter of each head tissue's contrast.
    """

    subarachnoid_mm: tuple[float, float] = (1.5, 3.5)
    skull_mm: tuple[float, float] = (4.5, 7.5)
    temporalis_mm: tuple[float, float] = (5.0, 10.0)
    fat_mm: tuple[float, float] = (2.5, 6.0)
    skin_mm: tuple[float, float] = (1.5, 2.5)
    thickness_variation: float = 0.25
    face_scale: tuple[float, float] = (0.95, 1.05)
    eye_offset_mm: float = 2.0
    contrast_jitter: float = 0.08

    def __post_init__(self) -> None:
        for name in ("subarachnoid_mm", "skull_mm", "temporalis_mm", "fat_mm", "skin_mm", "face_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high < np.inf:
                raise ValueError(f"head shape: {name} must be (low, high) with 0 < low <= high, got {(low, high)}")
        for name in ("thickness_variation", "eye_offset_mm", "contrast_jitter"):
            if not 0 <= getattr(self, name) < np.inf:
                raise ValueError(f"head shape: {name} must be finite and non-negative, got {getattr(self, name)}")


@dataclass(frozen=True)
class Domain:
    """Ranges the generator draws from (``(low, high)`` pairs are uniform draws).

    Args:
        name: short name (``anofpdm synth --domain``).
        rotation_sd_deg, rotation_max_deg: head rotation per axis (normal, clipped).
        zoom_range: brain size relative to the template; anisotropy_range: extra per-axis zoom.
        translation_mm: largest shift per axis.
        deformation_sd_mm, deformation_control_mm: smooth random deformation, amplitude and spacing.
        ventricle_expansion: fractional pull towards (positive: larger) or push away from (negative:
            smaller) the lateral ventricles' centre; (0, 0) leaves them as in the template.
        cortical_atrophy: largest fraction of grey matter next to CSF turned into CSF (widened sulci).
        tissue_jitter: relative per-case jitter of each tissue's contrast.
        scanner_gain: global intensity gain on top of the per-sequence scanner scale.
        scale_jitter: relative per-sequence jitter of the scanner scale.
        bias_amplitude, blur_sigma_mm, noise_fraction: bias field, blur and Rician noise ranges.
        tumour_volume_ml: nominal whole-tumour volume range (log-uniform).
        grids: output grids, cycled over case indices; empty: the BraTS grid.
        head: ranges of the head grown around the brain when heads are on (not part of ``to_dict``: the
            manifest of cases without heads stays as it was).
    """

    name: str
    rotation_sd_deg: float = 4.0
    rotation_max_deg: float = 10.0
    zoom_range: tuple[float, float] = (0.88, 0.99)
    anisotropy_range: tuple[float, float] = (0.96, 1.04)
    translation_mm: float = 4.0
    deformation_sd_mm: float = 2.5
    deformation_control_mm: float = 40.0
    ventricle_expansion: tuple[float, float] = (0.0, 0.0)
    cortical_atrophy: tuple[float, float] = (0.0, 0.0)
    tissue_jitter: float = 0.05
    scanner_gain: tuple[float, float] = (1.0, 1.0)
    scale_jitter: float = 0.2
    bias_amplitude: tuple[float, float] = (0.04, 0.15)
    blur_sigma_mm: tuple[float, float] = (0.3, 0.7)
    noise_fraction: tuple[float, float] = (0.015, 0.04)
    tumour_volume_ml: tuple[float, float] = (8.0, 250.0)
    grids: tuple[OutputGrid, ...] = ()
    head: HeadShape = HeadShape()

    def to_dict(self) -> dict[str, Any]:
        """The ranges of the brain and the acquisition (the head's: ``asdict(domain.head)``)."""
        return {name: value for name, value in asdict(self).items() if name != "head"}


TRAINING = Domain(name="training")
SHIFTED = Domain(
    name="shifted",
    rotation_sd_deg=7.0,
    rotation_max_deg=15.0,
    zoom_range=(0.97, 1.1),
    anisotropy_range=(0.9, 1.1),
    translation_mm=8.0,
    deformation_sd_mm=4.5,
    deformation_control_mm=28.0,
    ventricle_expansion=(-0.25, 0.5),
    cortical_atrophy=(0.3, 0.8),
    tissue_jitter=0.12,
    scanner_gain=(0.3, 3.0),
    scale_jitter=0.3,
    bias_amplitude=(0.15, 0.35),
    blur_sigma_mm=(0.6, 1.2),
    noise_fraction=(0.03, 0.07),
    tumour_volume_ml=(3.0, 110.0),
    grids=(
        OutputGrid("ras_1mm", (181, 217, 181), (1.0, 1.0, 1.0)),
        OutputGrid("axial_thick", (240, 240, 36), (0.9375, 0.9375, 4.5)),
        OutputGrid("oblique_1p2mm", (200, 200, 150), (1.2, 1.2, 1.2), tilt_deg=14.0),
        OutputGrid("sagittal_3d", (240, 240, 176), (1.0, 1.0, 1.0), axes=(1, 2, 0)),
    ),
    head=HeadShape(
        subarachnoid_mm=(1.0, 6.0),  # atrophy widens it
        skull_mm=(3.0, 10.0),
        temporalis_mm=(3.0, 15.0),
        fat_mm=(1.5, 11.0),
        skin_mm=(1.0, 3.5),
        thickness_variation=0.4,
        face_scale=(0.85, 1.15),
        eye_offset_mm=4.0,
        contrast_jitter=0.2,
    ),
)
DOMAINS = {domain.name: domain for domain in (TRAINING, SHIFTED)}


def grid_affine(grid: OutputGrid, centre_ras: np.ndarray) -> np.ndarray:
    """The RAS affine of ``grid`` centred on ``centre_ras`` (mm)."""
    tilt = np.deg2rad(grid.tilt_deg)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(tilt), -np.sin(tilt)], [0.0, np.sin(tilt), np.cos(tilt)]])
    directions = rotation[:, list(grid.axes)]  # voxel axis i runs along RAS axis axes[i] (then tilted)
    affine = np.eye(4)
    affine[:3, :3] = directions * np.asarray(grid.spacing_mm)
    affine[:3, 3] = centre_ras - affine[:3, :3] @ ((np.asarray(grid.shape) - 1) / 2.0)
    return affine


def reslice(
    images: dict[str, np.ndarray], seg: np.ndarray, affine: np.ndarray, grid: OutputGrid
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Resample a 1 mm case onto ``grid`` (centred on the source grid's centre), with thick-slice profiles.

    Images are blurred by each output voxel's extent along its axes (Gaussian of that FWHM beyond the
    1 mm source), then sampled linearly; the segmentation is sampled by nearest neighbour.

    Returns:
        The resampled images (same dtype), segmentation and the grid's affine.
    """
    source_shape = np.asarray(seg.shape)
    centre = (affine @ np.append((source_shape - 1) / 2.0, 1.0))[:3]
    target = grid_affine(grid, centre)
    to_source = np.linalg.inv(affine) @ target  # target voxel -> source voxel
    source_step = np.abs(np.linalg.inv(affine)[:3, :3]).sum(axis=1)  # source voxels per mm, per source axis
    # the output voxel's extent along each source axis (voxel axes of both grids are near-aligned or swapped)
    extent = np.abs(to_source[:3, :3]).max(axis=1) / source_step
    sigma = np.sqrt(np.maximum(extent**2 - 1.0, 0.0)) / FWHM_PER_SIGMA
    resliced = {}
    for name, image in images.items():
        blurred = ndimage.gaussian_filter(image.astype(np.float32), sigma) if sigma.max() > 0 else image
        out = ndimage.affine_transform(blurred.astype(np.float32), to_source[:3, :3], to_source[:3, 3],
                                       output_shape=grid.shape, order=1, mode="constant", cval=0.0)
        resliced[name] = np.rint(np.maximum(out, 0.0)).astype(image.dtype)
    return resliced, reslice_labels(seg, affine, grid), target


def reslice_labels(labels: np.ndarray, affine: np.ndarray, grid: OutputGrid) -> np.ndarray:
    """Resample a 1 mm label map (a segmentation, a brain mask) onto ``grid`` by nearest neighbour, as ``reslice``."""
    centre = (affine @ np.append((np.asarray(labels.shape) - 1) / 2.0, 1.0))[:3]
    to_source = np.linalg.inv(affine) @ grid_affine(grid, centre)
    out = ndimage.affine_transform(labels, to_source[:3, :3], to_source[:3, 3], output_shape=grid.shape, order=0,
                                   mode="constant", cval=0)
    return out.astype(labels.dtype)
