"""Volumes to network slices and back, exactly onto the input grid (docs/method.md section 1).

Any orientation, spacing and field of view: the volume is reoriented to RAS (a lossless axis
permutation/flip), each axial plane is cropped/padded to a square field of view (the network's,
e.g. 240 mm) centred on the brain and resized to the network's image size, and the native slice
positions are kept. The inverse resizes back, un-crops and restores the input orientation, so a
result has the input's shape and affine. Training data preparation and inference both use this
module, so the network sees slices laid out the same way in both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from anofpdm.volumes.checks import InputError, check_inputs
from anofpdm.volumes.intensity import normalise

__all__ = [
    "slices_with_brain",
    "VolumeGeometry",
    "plan_geometry",
    "ras_transform",
    "to_model_slices",
    "to_model_grid",
    "to_input_grid",
    "brain_pixels",
    "brain_voxels",
    "image_like",
]

RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))
MIN_BRAIN_AREA_MM2 = 100.0  # axial planes with less brain than this are not segmented
BACKGROUND = -1.0  # value of non-brain after percentile normalisation
BRAIN_TOLERANCE = 1e-4  # model-grid pixels above BACKGROUND by more than this hold brain


@dataclass(frozen=True)
class VolumeGeometry:
    """How one input grid maps to the network's slices.

    Attributes:
        shape: the input volume shape.
        affine: the input affine.
        to_ras: nibabel orientation transform from input axes to RAS axes.
        window_origin: first (x, y) RAS voxel of the square field of view (may be negative: padding).
        window_size: field-of-view extent in RAS voxels along x and y.
        image_size: network slice side in pixels.
        slices: RAS axial indices that contain enough brain to segment.
        spacing_mm: model-grid voxel size (x, y, z) in mm.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    to_ras: np.ndarray
    window_origin: tuple[int, int]
    window_size: tuple[int, int]
    image_size: int
    slices: tuple[int, ...]
    spacing_mm: tuple[float, float, float]

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        return tuple(int(self.shape[int(axis)]) for axis in np.argsort(self.to_ras[:, 0]))

    @property
    def from_ras(self) -> np.ndarray:
        return nib.orientations.ornt_transform(RAS, nib.orientations.io_orientation(self.affine))


def ras_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform from the axes of ``affine`` to RAS."""
    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), RAS)


def plan_geometry(
    reference: nib.spatialimages.SpatialImage, brain_ras: np.ndarray, image_size: int, field_of_view_mm: float
) -> VolumeGeometry:
    """Place the network's square field of view on each axial plane, centred on the brain.

    Args:
        reference: the input image whose grid results are returned on.
        brain_ras: boolean brain mask in RAS voxel order.
        image_size: network slice side in pixels.
        field_of_view_mm: in-plane extent the network's slices cover.
    """
    to_ras = ras_transform(reference.affine)
    ras_affine = reference.affine @ nib.orientations.inv_ornt_aff(to_ras, reference.shape[:3])
    spacing = np.sqrt((ras_affine[:3, :3] ** 2).sum(axis=0))
    window = tuple(max(1, int(round(field_of_view_mm / s))) for s in spacing[:2])
    xs, ys, zs = np.nonzero(brain_ras)
    centre = ((xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0)
    origin = tuple(int(round(c - (w - 1) / 2.0)) for c, w in zip(centre, window))
    area = brain_ras.sum(axis=(0, 1)) * spacing[0] * spacing[1]
    slices = tuple(int(z) for z in np.nonzero(area >= MIN_BRAIN_AREA_MM2)[0])
    return VolumeGeometry(
        shape=tuple(int(n) for n in reference.shape[:3]),
        affine=np.asarray(reference.affine, dtype=np.float64),
        to_ras=to_ras,
        window_origin=origin,
        window_size=window,
        image_size=image_size,
        slices=slices,
        spacing_mm=(window[0] * spacing[0] / image_size, window[1] * spacing[1] / image_size, float(spacing[2])),
    )


def _crop(volume: np.ndarray, geometry: VolumeGeometry, fill: float) -> np.ndarray:
    """Cut the field-of-view window out of the selected RAS planes, padding with ``fill``."""
    (x0, y0), (wx, wy) = geometry.window_origin, geometry.window_size
    out = np.full((wx, wy, len(geometry.slices)), fill, dtype=np.float32)
    sx, sy = slice(max(x0, 0), min(x0 + wx, volume.shape[0])), slice(max(y0, 0), min(y0 + wy, volume.shape[1]))
    out[sx.start - x0 : sx.stop - x0, sy.start - y0 : sy.stop - y0] = volume[sx, sy][:, :, list(geometry.slices)]
    return out


def _resize_planes(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (anti-aliased when shrinking) resize of X x Y x N planes to size[0] x size[1] x N."""
    tensor = torch.from_numpy(np.ascontiguousarray(planes.transpose(2, 0, 1)))[:, None]
    shrinking = size[0] < planes.shape[0] or size[1] < planes.shape[1]
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return resized[:, 0].numpy().transpose(1, 2, 0)


def to_model_slices(
    images: Mapping[str, nib.spatialimages.SpatialImage],
    sequences: Sequence[str],
    image_size: int,
    field_of_view_mm: float,
    extra: Mapping[str, np.ndarray] | None = None,
    landmarks: Mapping[str, Sequence[float]] | None = None,
) -> tuple[np.ndarray, VolumeGeometry, dict[str, np.ndarray]]:
    """Normalise, reorient and resample input volumes to the network's slices.

    Args:
        images: sequence name -> image, all on one grid; ``sequences[0]`` is the reference.
        sequences: the network's input sequences, in channel order.
        image_size: network slice side.
        field_of_view_mm: in-plane extent of a network slice.
        extra: other arrays on the input grid to resample the same way (e.g. a label mask; linear
            interpolation, returned as floats).
        landmarks: sequence -> the model's histogram-standardisation landmarks (``anofpdm.volumes.intensity``);
            None: percentile scaling only.

    Returns:
        slices N x C x S x S in [-1, 1] (N brain slices, C = len(sequences)), the geometry, and the
        resampled ``extra`` arrays (N x S x S each).
    """
    arrays = check_inputs(images, sequences)
    to_ras = ras_transform(images[sequences[0]].affine)
    ras = {name: nib.orientations.apply_orientation(arrays[name], to_ras) for name in sequences}
    brain = brain_voxels(ras.values())
    geometry = plan_geometry(images[sequences[0]], brain, image_size, field_of_view_mm)
    if not geometry.slices:
        raise InputError(f"no axial slice holds {MIN_BRAIN_AREA_MM2} mm^2 of brain: is this a brain MRI?")
    size = (image_size, image_size)
    landmarks = landmarks or {}
    channels = [_resize_planes(_crop(normalise(ras[name], landmarks.get(name)), geometry, BACKGROUND), size)
                for name in sequences]
    slices = np.stack(channels, axis=0).transpose(3, 0, 1, 2)
    resampled = {name: to_model_grid(array, geometry) for name, array in (extra or {}).items()}
    return np.ascontiguousarray(slices, dtype=np.float32), geometry, resampled


def to_model_grid(array: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """An array on the input grid resampled onto the model grid's N x S x S slices as the images are (linear
    interpolation; 0 outside the input)."""
    oriented = nib.orientations.apply_orientation(np.asarray(array, dtype=np.float32), geometry.to_ras)
    size = (geometry.image_size, geometry.image_size)
    return _resize_planes(_crop(oriented, geometry, 0.0), size).transpose(2, 0, 1)


def to_input_grid(model_volume: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """Map an S x S x N model-grid volume (N = len(geometry.slices)) back onto the input grid.

    Values are resized bilinearly; outside the field of view and on unsegmented slices they are 0.
    Threshold the result at 0.5 to map a binary mask.
    """
    expected = (geometry.image_size, geometry.image_size, len(geometry.slices))
    if model_volume.shape != expected:
        raise ValueError(f"model volume shape {model_volume.shape} != {expected}")
    planes = _resize_planes(model_volume.astype(np.float32), geometry.window_size)
    ras = np.zeros(geometry.ras_shape, dtype=np.float32)
    (x0, y0), (wx, wy) = geometry.window_origin, geometry.window_size
    sx, sy = slice(max(x0, 0), min(x0 + wx, ras.shape[0])), slice(max(y0, 0), min(y0 + wy, ras.shape[1]))
    ras[sx, sy, list(geometry.slices)] = planes[sx.start - x0 : sx.stop - x0, sy.start - y0 : sy.stop - y0]
    return nib.orientations.apply_orientation(ras, geometry.from_ras)


def brain_voxels(volumes: Iterable[np.ndarray]) -> np.ndarray:
    """The brain voxels of skull-stripped volumes on one grid: any of them above zero."""
    volumes = iter(volumes)
    brain = next(volumes) > 0
    for volume in volumes:
        brain |= volume > 0
    return brain


def brain_pixels(slices: np.ndarray) -> np.ndarray:
    """N x S x S brain pixels of N x C x S x S model-grid slices: any sequence above the background."""
    return (slices > BACKGROUND + BRAIN_TOLERANCE).any(axis=1)


def slices_with_brain(slices: np.ndarray, min_fraction: float) -> np.ndarray:
    """N booleans: the slices whose brain area is at least ``min_fraction`` of the largest slice's (0: every slice).

    Args:
        slices: N x C x S x S model-grid slices.
        min_fraction: in [0, 1).
    """
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must lie in [0, 1), got {min_fraction}")
    area = brain_pixels(slices).sum(axis=(1, 2))
    return area >= min_fraction * area.max()


def image_like(reference: nib.spatialimages.SpatialImage, data: np.ndarray, dtype: type) -> nib.Nifti1Image:
    """A NIfTI image of ``data`` on exactly the reference's grid (affine and qform/sform codes)."""
    header = nib.Nifti1Header()
    if isinstance(reference, nib.Nifti1Image):
        header = reference.header.copy()
    image = nib.Nifti1Image(data.astype(dtype), reference.affine, header)
    image.set_data_dtype(dtype)
    image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
    return image
